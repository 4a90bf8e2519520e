"""Where a prefill step's time goes under a GPU-memory budget: wall time vs GPU kernel time vs H2D copy time.

    python benchmarks/profile_prefill.py --random-weights llama-2-13b --gpu-memory 6GiB --lm-head-bits 8
        [--prompt-len 512] [--repeats 5] [--trace out.json]

Each repeat adds one fresh prompt and times the engine steps until its first token is returned (wall, synchronized;
with async scheduling that is one decode step after the prefill, so the figures include one decode step: about 3 ms
of kernels and one more pass of the streamed layers' copies); the last repeat runs under the torch profiler, which gives the sum of kernel times (compute stream and others), the sum of
host-to-device copy times (the streamed layers' weights) and the top kernels. With streamed layers the copies and
the compute overlap: wall ~ max(copies, compute) when the pipeline keeps both busy; more is time both wait (on
the host, or on each other). Prints markdown.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict

import torch

from vramwise.argtypes import size
from vramwise.config import CacheConfig, EngineConfig, MemoryBudgetConfig, SchedulerConfig
from vramwise.engine.llm_engine import LLMEngine
from vramwise.sampling_params import SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--random-weights", default="llama-2-13b")
    ap.add_argument("--quantization", default="int4")
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--gpu-memory", type=size, default=None, help="budget, e.g. 6GiB")
    ap.add_argument("--lm-head-bits", type=int, default=None, choices=(4, 8, 16))
    ap.add_argument("--kv-cache-dtype", default="auto")
    ap.add_argument("--cpu-weights", default="fp32", choices=("fp32", "bf16", "packed"))
    ap.add_argument("--prefill-offload", action="store_true", help="CPU layers run on the GPU for long steps")
    ap.add_argument("--trace", default=None, help="also write a Chrome trace of the profiled prefill here")
    ap.add_argument("--dequant-v1", action="store_true",
                    help="the long-prefill dequantize as before session 7 (v1 kernel) for an A/B")
    args = ap.parse_args()
    if args.dequant_v1:
        from vramwise.kernels import w4a16

        default = w4a16._default_choice

        def v1(*a, **k):
            cfg = default(*a, **k)
            return w4a16.DequantConfig(1) if isinstance(cfg, w4a16.DequantConfig) else cfg

        w4a16._default_choice = v1

    max_len = args.prompt_len + 128
    budget = MemoryBudgetConfig(gpu_memory=args.gpu_memory) if args.gpu_memory else MemoryBudgetConfig()
    eng = LLMEngine(EngineConfig(
        model=f"random:{args.random_weights}", device="cuda", quantization=args.quantization, show_progress=False,
        memory=budget, lm_head_bits=args.lm_head_bits, cache=CacheConfig(cache_dtype=args.kv_cache_dtype),
        cpu_weights=args.cpu_weights, prefill_offload=args.prefill_offload,
        scheduler=SchedulerConfig(max_num_seqs=1, max_model_len=max_len, max_num_batched_tokens=4096),
    ))
    vocab = eng.model_config.vocab_size
    params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)

    def prefill(i: int) -> float:
        """Seconds from adding a prompt to its first token (the engine idle before)."""
        eng.add_request(f"p{i}", [(13 * i + 7 * j) % (vocab - 3) + 3 for j in range(args.prompt_len)], params)
        torch.cuda.synchronize()
        t = time.perf_counter()
        while not any(len(s.seq.output_token_ids) for r in eng._requests.values() for s in r.seqs):
            eng.step()
        torch.cuda.synchronize()
        return time.perf_counter() - t

    def finish() -> None:
        while eng.has_unfinished_requests():
            eng.step()

    walls = []
    for i in range(-1, args.repeats):  # -1: warm-up (first-use compiles)
        w = prefill(i)
        finish()
        if i >= 0:
            walls.append(w)

    # Host time per decoder layer: perf_counter at each layer's start during one more (unprofiled) prefill. In an
    # eager step the host issues a layer's launches and moves on unless something syncs, so the gap between two
    # resident layers' starts is the host time of the first while the GPU trails behind (the planner's
    # eager-launch term, costmodel.DeviceProfile.eager_launch_s, is calibrated from it).
    layers = eng.runner.model.model.layers
    starts: list[tuple[int, float]] = []
    hooks = [layer.register_forward_pre_hook(lambda m, a, i=i: starts.append((i, time.perf_counter())))
             for i, layer in enumerate(layers)]
    prefill(args.repeats + 1)
    finish()
    for h in hooks:
        h.remove()
    drv = getattr(eng, "offload", None)
    places = drv.placements if drv is not None else ["resident"] * len(layers)
    gaps = [(t1 - t0) * 1e3 for (i, t0), (j, t1) in zip(starts, starts[1:])
            if j == i + 1 and places[i] == "resident" and places[j] == "resident"]
    host_layer_ms = statistics.median(gaps) if gaps else float("nan")

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        prof_wall = prefill(args.repeats)
    finish()
    if args.trace:
        prof.export_chrome_trace(args.trace)
    kern: dict[str, float] = defaultdict(float)
    count: dict[str, int] = defaultdict(int)
    copy_us = 0.0
    for e in prof.events():
        if e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        us = e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
        if "Memcpy HtoD" in e.name:
            copy_us += us
            continue
        kern[e.name] += us
        count[e.name] += 1
    busy = sum(kern.values())
    placement = getattr(getattr(eng, "offload", None), "summary", lambda: "all resident")()
    print(f"### Prefill profile: {args.random_weights} {args.quantization}, {args.prompt_len}-token prompt, "
          f"{torch.cuda.get_device_name()}; {placement}\n")
    print("| what | ms |\n|---|---:|")
    print(f"| prefill wall to the first token (median of {args.repeats}) | {statistics.median(walls) * 1e3:.1f} |")
    print(f"| the profiled prefill's wall | {prof_wall * 1e3:.1f} |")
    print(f"| GPU kernel time (sum) | {busy / 1e3:.1f} |")
    print(f"| H2D copy time (sum) | {copy_us / 1e3:.1f} |")
    print(f"| host time per resident decoder layer (median of {len(gaps)}, unprofiled) | {host_layer_ms:.3f} |")
    n_kernels = sum(count.values())
    print(f"| kernels launched in the profiled prefill (incl. copies: {sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA and 'Memcpy' in e.name)}) | {n_kernels} |\n")
    print("| kernel | calls | ms | share |\n|---|---:|---:|---:|")
    for name, us in sorted(kern.items(), key=lambda kv: -kv[1])[:15]:
        print(f"| {name[:90]} | {count[name]} | {us / 1e3:.2f} | {us / busy:.1%} |")


if __name__ == "__main__":
    main()
