"""Where a decode step's time goes: wall time per engine step vs GPU busy time, split by phase and kernel.

    python benchmarks/profile_decode.py --random-weights llama-2-7b --quantization int4 [--batch 1] [--steps 40]
        [--no-gemv-epilogues]

Prints (markdown): median wall ms per decode step (engine.step), the host time of its phases (schedule,
runner.run, postprocess/detokenize), the GPU busy time per step from the torch profiler (sum of kernel
durations, CUDA graphs included), and the top kernels by GPU time. wall - GPU busy = time the GPU waits
for the host (the step syncs once to read the sampled tokens).
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
    ap.add_argument("--random-weights", default="llama-2-7b")
    ap.add_argument("--quantization", default="int4")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--gpu-memory", type=size, default=None, help="budget, e.g. 6GiB (the planner places the layers)")
    ap.add_argument("--kv-cache-dtype", default="auto")
    ap.add_argument("--stream-buffers", type=int, default=2)
    ap.add_argument("--lm-head-bits", type=int, default=None, choices=(4, 8, 16))
    ap.add_argument("--trace", default=None, help="also write a Chrome trace of the profiled steps here")
    ap.add_argument("--offload", default=None, help="force a placement, e.g. r:27,s:8,c:5 (else the planner's)")
    ap.add_argument("--cpu-weights", default="fp32", choices=("fp32", "bf16", "packed"))
    ap.add_argument("--prefill-offload", action="store_true", help="CPU layers run on the GPU for long steps")
    ap.add_argument("--no-gemv-epilogues", action="store_true",
                    help="separate kernels for the MLP's residual add and SwiGLU (w4a16.EPILOGUES = False)")
    args = ap.parse_args()
    if args.no_gemv_epilogues:
        from vramwise.kernels import w4a16

        w4a16.EPILOGUES = False  # before the engine captures its decode graphs

    max_len = args.prompt_len + 2 * args.steps + 16
    budget = MemoryBudgetConfig(gpu_memory=args.gpu_memory) if args.gpu_memory else MemoryBudgetConfig()
    eng = LLMEngine(EngineConfig(
        model=f"random:{args.random_weights}", device="cuda", quantization=args.quantization, show_progress=False,
        enforce_eager=args.enforce_eager, memory=budget, num_stream_buffers=args.stream_buffers,
        lm_head_bits=args.lm_head_bits, offload=args.offload, cpu_weights=args.cpu_weights,
        prefill_offload=args.prefill_offload,
        cache=CacheConfig(cache_dtype=args.kv_cache_dtype,
                          kv_cache_memory=None if args.gpu_memory else (args.batch * max_len * 820_000) + (256 << 20)),
        scheduler=SchedulerConfig(max_num_seqs=args.batch, max_model_len=max_len, max_num_batched_tokens=4096),
    ))
    vocab = eng.model_config.vocab_size
    params = SamplingParams(temperature=0, max_tokens=2 * args.steps + 8, ignore_eos=True)
    for i in range(args.batch):
        eng.add_request(f"r{i}", [(7 * i + j) % (vocab - 3) + 3 for j in range(args.prompt_len)], params)
    while any(len(s.seq.output_token_ids) == 0 for r in eng._requests.values() for s in r.seqs):
        eng.step()  # prefill
    for _ in range(5):
        eng.step()  # warm

    # phases, host side: wrap schedule / run / postprocess
    phase: dict[str, list[float]] = defaultdict(list)
    sched, run, post = eng.scheduler.schedule, eng.runner.run, eng.scheduler.postprocess

    def timed(name, fn):
        def w(*a, **k):
            t = time.perf_counter()
            r = fn(*a, **k)
            phase[name].append(time.perf_counter() - t)
            return r
        return w

    # CPU-computed layers (a mixed placement): host time each step spends waiting for the GPU before them
    # (the hidden state's D2H) and computing them (incl. the H2D of their output).
    from vramwise.memory.offload import CPU, driver_of

    drv = driver_of(eng.runner.model)
    cpu_units = [i for i, p in enumerate(drv.placements) if p == CPU] if drv is not None else []
    layers = eng.runner.model.model.layers
    mark: dict[str, float] = {}

    def cpu_pre(module, args):
        t = time.perf_counter()
        torch.cuda.synchronize()
        mark["t"] = time.perf_counter()
        phase["CPU layers: wait for the GPU before them"].append(mark["t"] - t)

    def cpu_post(module, args, out):
        phase["CPU layers: compute + H2D"].append(time.perf_counter() - mark["t"])

    for i in cpu_units:
        if i < len(layers):
            layers[i].register_forward_pre_hook(cpu_pre, prepend=True)
            layers[i].register_forward_hook(cpu_post)
    eng.scheduler.schedule = timed("schedule", sched)
    eng.runner.run = timed("runner.run (incl. the sync)", run)
    eng.scheduler.postprocess = timed("scheduler.postprocess", post)
    walls = []
    for _ in range(args.steps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        eng.step()
        walls.append(time.perf_counter() - t)

    from torch.profiler import ProfilerActivity, profile

    n_prof = 10
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(n_prof):
            eng.step()
        torch.cuda.synchronize()
    if args.trace:
        prof.export_chrome_trace(args.trace)
    kern: dict[str, float] = defaultdict(float)
    count: dict[str, int] = defaultdict(int)
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            kern[e.name] += e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
            count[e.name] += 1
    busy_us = sum(kern.values()) / n_prof
    wall_ms = statistics.median(walls) * 1e3
    print(f"### Decode step profile: {args.random_weights} {args.quantization}, batch {args.batch}, "
          f"context ~{args.prompt_len}, {torch.cuda.get_device_name()}, path: "
          f"{'eager' if eng.runner.graphs is None else 'graphs'}\n")
    print("| what | ms per step |\n|---|---:|")
    print(f"| engine.step wall (median of {args.steps}) | {wall_ms:.3f} |")
    for k, v in phase.items():
        per_step = len(cpu_units) if k.startswith("CPU layers") else 1
        print(f"| host: {k} | {statistics.median(v) * 1e3 * per_step:.3f} |")
    if cpu_units:
        print(f"| (CPU layers: {cpu_units}, medians x {len(cpu_units)}) | |")
    print(f"| GPU busy (sum of kernel times, profiler) | {busy_us / 1e3:.3f} |")
    print(f"| GPU idle per step (wall - busy) | {wall_ms - busy_us / 1e3:.3f} |")
    print(f"\ntokens/s at this wall time: {args.batch / (wall_ms / 1e3):.1f}\n")
    if args.gpu_memory:
        rep = eng.memory_report()
        print(f"placement {getattr(eng, 'placement_name', '?')}, preemptions "
              f"{getattr(eng.scheduler, 'num_preemptions', '?')}; budget terms (MiB): "
              + ", ".join(f"{k} {v / 2**20:.0f}" for k, v in rep.items() if isinstance(v, (int, float))) + "\n")
    print("| kernel | calls/step | us/step | share |\n|---|---:|---:|---:|")
    for name, us in sorted(kern.items(), key=lambda kv: -kv[1])[:18]:
        print(f"| {name[:90]} | {count[name] / n_prof:.0f} | {us / n_prof:.1f} | {us / n_prof / busy_us:.1%} |")


if __name__ == "__main__":
    main()
