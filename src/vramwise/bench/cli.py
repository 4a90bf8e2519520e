"""`vramwise bench` (offline, this process) and `vramwise bench serve` (online, against a URL)."""

from __future__ import annotations

import argparse
import json
import os
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
    p.add_argument("--json", default=None, metavar="FILE|DIR/",
                   help="write the full report as JSON; a directory (existing, or ending in /) gets a name that "
                        "states the scenario, e.g. DIR/bench-llama-2-13b-int4-6GiB-b1-p512-g128.json, where "
                        "benchmarks/peers/table.py finds it")
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


def bench_settings(args: argparse.Namespace) -> dict:
    """The settings that define the measured scenario, stored in the report (JSON-safe values)."""
    keys = ("model", "random_weights", "quantization", "gpu_memory", "offload", "cpu_weights", "prefill_offload", "kv_cache_memory",
            "num_kv_blocks", "max_num_seqs", "max_num_batched_tokens", "max_model_len", "dtype", "device")
    return {k: getattr(args, k, None) for k in keys}


def json_path(target: str, settings: dict, batch: list[int], prompt_len: int, gen_len: int) -> str:
    """--json FILE as given; --json DIR/ (or an existing directory) gets the scenario's default name."""
    from vramwise.bench.offline import default_json_name

    if target.endswith(("/", os.sep)) or os.path.isdir(target):
        os.makedirs(target, exist_ok=True)
        return os.path.join(target, default_json_name(settings, batch, prompt_len, gen_len))
    parent = os.path.dirname(target)
    if parent and not os.path.isdir(parent):
        raise ValueError(f"--json {target}: directory {parent!r} does not exist")
    return target


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
    settings = bench_settings(args)
    # resolve the JSON path before the (long) run, so that a bad path fails at once
    out_json = json_path(args.json, settings, args.batch, args.prompt_len, args.gen_len) if args.json else None
    cfg = make_engine_config(args, show_progress=not args.no_progress)
    name = args.model or "SmolLM2-135M-Instruct (bundled)"
    if args.random_weights:
        name = f"{args.random_weights} (random weights)"
    report = run_offline_bench(
        lambda: LLMEngine(cfg), args.batch, args.prompt_len, args.gen_len, name, progress=not args.no_progress,
        settings=settings,
    )
    print(format_table(report))
    if out_json:
        with open(out_json, "w") as f:
            json.dump(report.to_dict(), f, indent=2)
        print(f"wrote {out_json}", file=sys.stderr)
    if args.plot:
        write_plot(report, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0
