"""`vramwise bench` (offline, this process) and `vramwise bench serve` (online, against a URL)."""

from __future__ import annotations

import argparse
import json
import sys

from vramwise.argtypes import positive_int, positive_int_list


def _shapes() -> list[str]:
    from vramwise.models.shapes import MODEL_SHAPES

    return list(MODEL_SHAPES)


def register(sub: argparse._SubParsersAction) -> None:
    from vramwise.cli import add_engine_args

    p = sub.add_parser(
        "bench",
        help="measure TTFT, prefill/decode speed and real GPU memory (`bench serve --url` for a live server)",
        description="Offline benchmark in this process. For a running OpenAI-compatible server: vramwise bench serve --url URL",
    )
    p.add_argument("bench_model", nargs="?", default=None, metavar="MODEL", help="model (default: --model or bundled)")
    p.add_argument("--random-weights", default=None, metavar="SHAPE",
                   help="random weights of a real shape: " + ", ".join(_shapes()))
    p.add_argument("--batch", type=positive_int_list, default=[1, 8, 32], help="batch sizes, e.g. 1,8,32 (default)")
    p.add_argument("--prompt-len", type=positive_int, default=512)
    p.add_argument("--gen-len", type=positive_int, default=128)
    p.add_argument("--json", default=None, metavar="FILE", help="write the full report as JSON")
    p.add_argument("--plot", default=None, metavar="FILE.png", help="write tokens/s and memory vs batch")
    p.add_argument("--no-progress", action="store_true")
    add_engine_args(p)
    p.set_defaults(func=cmd_bench)

    try:
        from vramwise.bench.serve import add_serve_parser
    except ImportError:
        return
    # `serve` at the top level is the server; vramwise.cli.main routes `bench serve ...` to `bench-serve`.
    add_serve_parser(sub, name="bench-serve", prog="vramwise bench serve")


def cmd_bench(args: argparse.Namespace) -> int:
    from vramwise.bench.offline import format_table, run_offline_bench, write_plot
    from vramwise.cli import make_engine_config
    from vramwise.engine.llm_engine import LLMEngine

    if args.bench_model is not None:
        if args.model is not None and args.model != args.bench_model:
            raise ValueError(f"two models given: {args.bench_model!r} and --model {args.model!r}")
        args.model = args.bench_model
    if args.random_weights is not None:
        if args.model is not None:
            raise ValueError("give either a model or --random-weights, not both")
        if args.random_weights.lower() not in _shapes():
            raise ValueError(f"unknown shape {args.random_weights!r} for --random-weights; known: {', '.join(_shapes())}")
        args.model = f"random:{args.random_weights.lower()}"
    longest = args.prompt_len + args.gen_len
    if longest > args.max_model_len:
        args.max_model_len = longest  # the benchmark's own lengths decide the context it needs
    cfg = make_engine_config(args, show_progress=not args.no_progress)
    name = args.model or "SmolLM2-135M-Instruct (bundled)"
    if args.random_weights:
        name = f"{args.random_weights} (random weights)"
    report = run_offline_bench(
        lambda: LLMEngine(cfg), args.batch, args.prompt_len, args.gen_len, name, progress=not args.no_progress
    )
    print(format_table(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report.to_dict(), f, indent=2)
        print(f"wrote {args.json}", file=sys.stderr)
    if args.plot:
        write_plot(report, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0
