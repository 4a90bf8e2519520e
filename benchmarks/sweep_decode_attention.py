"""Decode attention launch parameters at short contexts, as a CUDA-graph decode step sees them.

    python benchmarks/sweep_decode_attention.py [--heads 32] [--kv-heads 32] [--context 520] [--bound 640]

One decode step of a Llama-2-7B-shaped model calls the kernel once per layer: here 32 calls, each on its own
layer's cache (so K/V are not in L2), captured in a CUDA graph and replayed; the context bound is the one
the graphs pass (max_model_len rounded to whole blocks). Prints us per call for each (partition size,
block_n, num_warps) and the K/V bytes per call as a share of the measured copy ceiling. Markdown table last.
"""

from __future__ import annotations

import argparse
import itertools

import torch

from vramwise.kernels.paged_attention_triton import choose_partition_size, paged_attention_decode


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=32)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--context", type=int, default=520)
    ap.add_argument("--bound", type=int, default=640)
    ap.add_argument("--layers", type=int, default=32)
    args = ap.parse_args()
    dev = torch.device("cuda", torch.cuda.current_device())
    bs, d, hkv = 16, args.head_dim, args.kv_heads
    nblk = -(-args.bound // bs)
    caches = [(torch.randn(nblk + 1, bs, hkv, d, device=dev, dtype=torch.float16),
               torch.randn(nblk + 1, bs, hkv, d, device=dev, dtype=torch.float16)) for _ in range(args.layers)]
    q = torch.randn(1, args.heads, d, device=dev, dtype=torch.float16)
    bt = torch.arange(nblk, device=dev, dtype=torch.int32)[None, :]
    ctx = torch.tensor([args.context], device=dev, dtype=torch.int32)
    out = torch.empty_like(q)
    a = torch.empty(1 << 30, dtype=torch.uint8, device=dev)
    b = torch.empty_like(a)
    b.copy_(a)
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record(); b.copy_(a); e.record(); e.synchronize()
    ceiling = 2 * a.numel() / (s.elapsed_time(e) / 1e3)
    del a, b
    kv_bytes = 2 * args.context * hkv * d * 2
    default_p = choose_partition_size(1, hkv, args.bound, dev, 64)
    rows = []
    for part, bn, warps in itertools.product(dict.fromkeys((default_p, 64, 128, 256, args.bound)), (16, 32, 64), (2, 4, 8)):
        def step():
            for k, v in caches:
                paged_attention_decode(q, k, v, bt, ctx, d**-0.5, max_context_len=args.bound, partition_size=part,
                                       block_n=bn, num_warps=warps, out=out)
        try:
            step()
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                step()
            g.replay()
            torch.cuda.synchronize()
            times = []
            for _ in range(20):
                s.record(); g.replay(); e.record(); e.synchronize()
                times.append(s.elapsed_time(e) * 1e3 / args.layers)
            us = sorted(times)[len(times) // 2]
            rows.append((us, part, bn, warps))
        except Exception as ex:  # noqa: BLE001 - a config that cannot compile is reported, not fatal
            print(f"partition {part} block_n {bn} warps {warps}: {type(ex).__name__}: {str(ex)[:100]}")
    print(f"\n### Decode attention, 1 x {args.heads} heads ({hkv} kv) x {d}, context {args.context} of bound "
          f"{args.bound}, {torch.cuda.get_device_name()}, copy ceiling {ceiling / 1e9:.0f} GB/s; default "
          f"partition {default_p}\n")
    print("| us per call | partition | block_n | warps | K/V bytes share of ceiling |\n|---:|---:|---:|---:|---:|")
    for us, part, bn, warps in sorted(rows)[:14]:
        print(f"| {us:.2f} | {part} | {bn} | {warps} | {kv_bytes / (us * 1e-6) / ceiling:.2f} |")


if __name__ == "__main__":
    main()
