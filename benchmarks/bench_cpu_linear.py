"""CPU linear layers for CPU-computed decoder layers: fp32 dequantized vs bf16 vs packed int4/int8.

What a CPU layer of the offload driver reads per decode step (memory/offload.py, --cpu-weights): for
Llama-2-13B layer shapes (N x K: q 5120x5120, up 13824x5120, down 5120x13824) and M = 1 and 16 tokens, times

    fp32    F.linear with the weight dequantized to fp32 (--cpu-weights fp32, the default)
    bf16    F.linear with a bf16 weight (--cpu-weights bf16)
    int4    CpuPackedLinear from our int4 g128 weight (torch's _weight_int4pack_mm_for_cpu)
    int8    CpuPackedLinear from our int8 per-channel weight (torch's _weight_int8pack_mm)

and prints ms per call and GB/s of the weight bytes each reads (scales included), a markdown table last.
Each timed call starts cold: a 512 MiB buffer is read between calls (not timed), so the weights come from
DRAM as in a decode step, not from the last-level cache (an int4 q_proj is 13 MB). Median of the calls.

    python benchmarks/bench_cpu_linear.py             # 13B shapes; < 60 s on 16 cores
    python benchmarks/bench_cpu_linear.py --quick     # shapes / 4, fewer calls: a smoke run on a laptop
    python benchmarks/bench_cpu_linear.py --threads 8
Threads: torch.get_num_threads() (set with --threads).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from vramwise.quant.cpu_packed import CpuPackedLinear
from vramwise.quant.formats import make_int4, make_int8

#: Llama-2-13B decoder-layer linears (name, N = out_features, K = in_features).
SHAPES_13B = (("q_proj", 5120, 5120), ("up_proj", 13824, 5120), ("down_proj", 5120, 13824))
METHODS = ("fp32", "bf16", "int4", "int8")


def _weights(n: int, k: int, seed: int) -> dict[str, tuple[Callable[[torch.Tensor, torch.Tensor], torch.Tensor], int]]:
    """Per method: (fn(x fp32 (M, K), x bf16 (M, K)) -> (M, N), bytes of weight it reads). Random codes (the
    kernels' speed does not depend on the values), built through our formats as the driver builds them."""
    g = torch.Generator().manual_seed(seed)
    scales = (torch.rand(k // 128, n, generator=g) * 0.01 + 0.001).half()  # (K // 128, N)
    w4 = make_int4(torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8), scales, -8 * scales.float(), 128)
    w8 = make_int8(torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8),
                   torch.rand(1, n, generator=g) * 0.01 + 0.001)
    m4, m8 = CpuPackedLinear.from_packed(w4), CpuPackedLinear.from_packed(w8)
    fp32 = w4.dequantize(torch.float32)  # (N, K): what --cpu-weights fp32 holds
    bf16 = fp32.to(torch.bfloat16)  # --cpu-weights bf16: the layer's hidden states are bf16 already
    return {
        "fp32": (lambda x, xb: F.linear(x, fp32), fp32.numel() * 4),
        "bf16": (lambda x, xb: F.linear(xb, bf16), bf16.numel() * 2),
        # fp32 in and out, as in a packed CPU layer (its norms and KV stay fp32): the casts are counted
        "int4": (lambda x, xb: m4(x), m4.nbytes()),
        "int8": (lambda x, xb: m8(x), m8.nbytes()),
    }


def _time_cold(fn: Callable[[], torch.Tensor], calls: int, flush: torch.Tensor) -> float:
    """Median seconds of fn() over `calls` calls, each after reading `flush` (evicts the weights)."""
    fn()  # warm-up: first-call allocations, oneDNN primitive creation
    times = []
    for _ in range(calls):
        flush.sum()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="shapes divided by 4, 5 calls each (a smoke run)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--calls", type=int, default=None, help="timed calls per case (default 15; 5 with --quick)")
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 16], help="M values (default: 1 16)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    scale = 4 if args.quick else 1
    calls = args.calls or (5 if args.quick else 15)
    shapes = [(name, n // scale, k // scale) for name, n, k in SHAPES_13B]
    flush = torch.ones((64 if args.quick else 512) << 18, dtype=torch.float32)  # 64 / 512 MiB
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}; {'quick: shapes / 4, ' if args.quick else ''}"
          f"{calls} cold calls per case (median)")
    rows = []
    t_start = time.perf_counter()
    for i, (name, n, k) in enumerate(shapes):
        t0 = time.perf_counter()
        methods = _weights(n, k, seed=i)
        print(f"{name} {n}x{k}: weights built in {time.perf_counter() - t0:.1f} s")
        for m in args.tokens:
            x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
            xb = x.to(torch.bfloat16)
            row = {"shape": f"{name} {n}x{k}", "M": m}
            for method in METHODS:
                fn, nbytes = methods[method]
                sec = _time_cold(lambda: fn(x, xb), calls, flush)
                row[method] = (sec * 1e3, nbytes / sec / 1e9)
                print(f"  M={m:<3d} {method:5s} {sec * 1e3:8.3f} ms  {nbytes / sec / 1e9:7.1f} GB/s  "
                      f"({nbytes / 2**20:.1f} MiB)")
            rows.append(row)
        del methods
    print(f"\ntotal {time.perf_counter() - t_start:.1f} s\n")
    head = "| shape (N x K) | M | " + " | ".join(f"{m} ms | {m} GB/s" for m in METHODS) + " | int4 / fp32 speed-up |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for r in rows:
        cells = " | ".join(f"{r[m][0]:.3f} | {r[m][1]:.1f}" for m in METHODS)
        print(f"| {r['shape']} | {r['M']} | {cells} | {r['fp32'][0] / r['int4'][0]:.1f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
