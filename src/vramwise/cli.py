"""Command line: vramwise generate | chat | info (| serve | quantize | eval | bench | plan | doctor)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

from vramwise.argtypes import fraction, positive_int
from vramwise.argtypes import size
from vramwise.config import format_size


def add_engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    g.add_argument("--model", "-m", default=None, help="HF directory, .gguf file or hub id (default: bundled SmolLM2-135M-Instruct)")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    g.add_argument("--dtype", default="auto", help="auto | float32 | float16 | bfloat16 (default: auto)")
    g.add_argument("--max-model-len", type=positive_int, default=2048, help="context length cap (default: 2048)")
    g.add_argument("--max-num-seqs", type=positive_int, default=64, help="sequences batched at once (default: 64)")
    g.add_argument("--max-num-batched-tokens", type=positive_int, default=4096, help="tokens per step (default: 4096)")
    g.add_argument("--kv-cache-memory", type=size, default=None, help="bytes for the KV pool, e.g. 1GiB")
    g.add_argument("--num-kv-blocks", type=positive_int, default=None, help="KV pool size in blocks of 16 tokens")
    g.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp16", "bf16", "int8", "fp8"],
                   help="KV pages: auto (the model dtype) | fp16 | bf16 | int8 or fp8 (e4m3) with per-token-head "
                        "scales, half of fp16")
    g.add_argument("--swap-space", type=size, default=0, metavar="SIZE",
                   help="host memory for preempted sequences' KV, e.g. 4GiB (default: 0 = recompute them)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--offload", default=None, metavar="PLACEMENT",
                   help="layer placement: streamed | cpu | resident:20,streamed:20 | r,s,c,... (default: all on the device)")
    g.add_argument("--stream-buffers", type=positive_int, default=2, help="GPU slots for streamed layers (default: 2)")
    g.add_argument("--cpu-weights", default="auto", choices=("auto", "fp32", "bf16", "packed"),
                   help="how CPU-computed layers (--offload / --gpu-memory) hold weights: fp32 or bf16 "
                        "(dequantized), or packed int4/int8 (torch's packed CPU kernels, bf16 activations; "
                        "1/8 of the fp32 bytes at int4); the planner costs the same (default auto: packed under "
                        "--gpu-memory on a GPU, else fp32)")
    g.add_argument("--prefill-offload", action=argparse.BooleanOptionalAction, default=None,
                   help="long prefill steps run the CPU-computed layers on the GPU (their weights copied in through "
                        "the stream buffers, their KV through one layer's device pages); the planner costs it "
                        "(default: on under --gpu-memory on a GPU)")
    g.add_argument("--prefill-offload-min-tokens", type=positive_int, default=None, metavar="N",
                   help="with --prefill-offload: steps of at least N tokens are offloaded (default: the planner's "
                        "threshold under --gpu-memory, else 128)")
    g.add_argument("--gpu-memory", type=size, default=None, metavar="SIZE",
                   help="GPU-memory budget of the whole process (NVML's figure), e.g. 6GiB: the planner places "
                        "layers (resident / streamed / CPU) and sizes the KV pool to fit; start-up refuses a "
                        "budget it cannot meet (default: no budget)")
    g.add_argument("--gpu-memory-utilization", type=fraction, default=None, metavar="F",
                   help="the budget as a fraction of the card's total memory, in (0, 1]")
    g.add_argument("--device-profile", default=None, metavar="NAME|PATH",
                   help="speeds the planner costs placements with: h100 | rtx2060 | PATH.json "
                        "(default: `vramwise doctor`'s cached measurements, else h100)")
    g.add_argument("--quantization", default=None,
                   help="weights: auto (checkpoint's own; dequantized on CPU) | native (keep packed) | none | "
                        "int8 | int4 | int4-g32/g64/g128 (RTN at load) (default: auto)")
    g.add_argument("--lm-head-bits", type=int, default=None, choices=(4, 8, 16),
                   help="lm_head weights: 8 = int8 per channel, 4 = int4 g128 (RTN at load), 16 = float "
                        "(default: as loaded; a head tied to the embeddings stays float)")
    g.add_argument("--enforce-eager", action="store_true",
                   help="run decode steps eagerly: no CUDA-graph capture (less startup time and GPU memory)")
    g.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=True,
                   help="launch each step before the previous one's tokens are read back, so that the host's work "
                        "overlaps the GPU (default: on; same greedy and seeded outputs either way)")
    g.add_argument("--dequant-pipeline", action=argparse.BooleanOptionalAction, default=False,
                   help="experimental: long prefills of a resident int4 model dequantize the next weight on a side "
                        "stream while cuBLAS runs the current one (default: off; never under --gpu-memory or with "
                        "offload)")


def add_sampling_args(p: argparse.ArgumentParser, max_tokens: int = 256) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=positive_int, default=max_tokens)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--sampling-seed", type=int, default=None, help="seed for this generation's sampling")
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def make_llm(args: argparse.Namespace, show_progress: bool = True):
    from vramwise.llm import LLM

    return LLM(engine_config=make_engine_config(args, show_progress))


def make_engine_config(args: argparse.Namespace, show_progress: bool = True):
    """EngineConfig from the engine flags (add_engine_args)."""
    from vramwise.config import CacheConfig, EngineConfig, MemoryBudgetConfig, SchedulerConfig

    extra = {}
    if getattr(args, "quantization", None) is not None:
        extra["quantization"] = args.quantization
    if getattr(args, "lm_head_bits", None) is not None:
        extra["lm_head_bits"] = args.lm_head_bits
    gpu_memory, utilization = getattr(args, "gpu_memory", None), getattr(args, "gpu_memory_utilization", None)
    if gpu_memory is not None and utilization is not None:
        raise ValueError("give either --gpu-memory or --gpu-memory-utilization, not both")
    extra["memory"] = MemoryBudgetConfig(gpu_memory=gpu_memory, gpu_memory_utilization=utilization,
                                         device_profile=getattr(args, "device_profile", None))
    return EngineConfig(
        model=args.model,
        device=args.device,
        dtype=args.dtype,
        seed=args.seed,
        cache=CacheConfig(
            num_gpu_blocks=args.num_kv_blocks, kv_cache_memory=args.kv_cache_memory,
            cache_dtype=getattr(args, "kv_cache_dtype", "auto"), swap_space=getattr(args, "swap_space", 0) or 0,
        ),
        scheduler=SchedulerConfig(
            max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens,
            max_model_len=args.max_model_len,
        ),
        show_progress=show_progress,
        offload=getattr(args, "offload", None),
        num_stream_buffers=getattr(args, "stream_buffers", 2),
        cpu_weights=getattr(args, "cpu_weights", "auto"),
        prefill_offload=getattr(args, "prefill_offload", None),
        prefill_offload_min_tokens=getattr(args, "prefill_offload_min_tokens", None),
        enforce_eager=bool(getattr(args, "enforce_eager", False)),
        async_scheduling=bool(getattr(args, "async_scheduling", True)),
        dequant_pipeline=bool(getattr(args, "dequant_pipeline", False)),
        **extra,
    )


def make_sampling_params(args: argparse.Namespace):
    from vramwise.sampling_params import SamplingParams

    return SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.sampling_seed,
        stop=args.stop,
    )


def cmd_generate(args: argparse.Namespace) -> int:
    llm = make_llm(args)
    params = make_sampling_params(args)
    prompt = args.prompt
    if args.chat:
        prompt = llm.chat_prompt([{"role": "user", "content": args.prompt}])
    for out in llm.stream(prompt, params):
        sys.stdout.write(out.outputs[0].text_delta)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    llm = make_llm(args)
    params = make_sampling_params(args)
    messages: list[dict[str, str]] = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    interactive = sys.stdin.isatty()
    if interactive:
        print("vramwise chat — empty line or Ctrl-D to quit, /reset to forget the conversation", file=sys.stderr)
    while True:
        try:
            line = input("> " if interactive else "")
        except (EOFError, KeyboardInterrupt):
            break
        if not line.strip():
            if interactive:
                break
            continue
        if line.strip() == "/reset":
            messages = messages[:1] if args.system else []
            continue
        messages.append({"role": "user", "content": line})
        try:
            prompt = llm.chat_prompt(messages)
            reply = ""
            for out in llm.stream(prompt, params):
                sys.stdout.write(out.outputs[0].text_delta)
                sys.stdout.flush()
                reply = out.outputs[0].text
        except ValueError as e:  # e.g. the conversation outgrew the context
            print(f"\nerror: {e}", file=sys.stderr)
            messages.pop()
            continue
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": reply})
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from vramwise.models.registry import supported_architectures
    from vramwise.weights import open_weights

    src = open_weights(args.model, show_progress=False)
    cfg = src.config
    n = cfg.num_parameters()
    supported = cfg.architecture in supported_architectures()
    rows = [
        ("model", src.path),
        ("architecture", cfg.architecture + ("" if supported else "  (NOT supported)")),
        ("parameters", f"{n:,} ({n / 1e9:.2f} B)"),
        ("layers", cfg.num_hidden_layers),
        ("hidden / intermediate", f"{cfg.hidden_size} / {cfg.intermediate_size}"),
        ("heads / kv heads / head dim", f"{cfg.num_attention_heads} / {cfg.num_key_value_heads} / {cfg.head_dim}"),
        ("vocab", cfg.vocab_size),
        ("context length", cfg.max_position_embeddings),
        ("rope", f"theta={cfg.rope_theta:g} scaling={cfg.rope_scaling.kind}"),
        ("tied embeddings", cfg.tie_word_embeddings),
        ("tensor dtypes", ", ".join(f"{k}: {v}" for k, v in sorted(src.tensor_dtypes().items()))),
        ("size on disk", format_size(src.disk_size_bytes())),
        ("size in memory fp16", format_size(2 * n)),
        ("size in memory fp32", format_size(4 * n)),
        ("KV cache per token fp16", format_size(2 * 2 * cfg.num_hidden_layers * cfg.kv_size)),
    ]
    w = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{w}}  {v}")
    return 0


COMMANDS: dict[str, tuple[str, Callable[[argparse.Namespace], int]]] = {}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vramwise", description="Run LLMs on GPUs too small for them.")
    p.add_argument("--log-level", default="WARNING")
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="complete one prompt and print the text as it streams")
    g.add_argument("prompt")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    add_engine_args(g)
    add_sampling_args(g)
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("chat", help="interactive chat with the model's chat template")
    c.add_argument("--system", default=None, help="system prompt")
    add_engine_args(c)
    add_sampling_args(c, max_tokens=512)
    c.set_defaults(func=cmd_chat)

    i = sub.add_parser("info", help="architecture, size and context of a model")
    i.add_argument("model", nargs="?", default=None)
    i.set_defaults(func=cmd_info)

    for name, register in _extra_commands():
        register(sub)
    return p


def _extra_commands():
    """Subcommands that live beside their subsystems (server, quantization, bench, planner)."""
    import importlib

    for name, mod in (
        ("serve", "vramwise.server.cli"),
        ("quantize", "vramwise.quant.cli"),
        ("eval", "vramwise.eval.cli"),
        ("bench", "vramwise.bench.cli"),
        ("plan", "vramwise.memory.cli"),
    ):
        try:
            m = importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name and (mod == e.name or mod.startswith(e.name + ".")):  # the subsystem is not there yet
                continue
            raise
        yield name, m.register


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:2] == ["bench", "serve"]:  # `bench MODEL` takes a positional, so route `bench serve` by hand
        argv = ["bench-serve", *argv[2:]]
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    from vramwise.weights.base import WeightsError

    try:
        return args.func(args)
    except (WeightsError, ValueError, FileNotFoundError) as e:
        print(f"vramwise: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
