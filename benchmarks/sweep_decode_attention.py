"""Decode attention launch parameters at short contexts, as a CUDA-graph decode step sees them.

    python benchmarks/sweep_decode_attention.py [--heads 32] [--kv-heads 32] [--context 520] [--bound 640]

One decode step of a Llama-2-7B-shaped model calls the kernel once per layer: here 32 calls, each on its own
layer's cache (so K/V are not in L2), captured in a CUDA graph and replayed; the context bound is the one
the graphs pass (max_model_len rounded to whole blocks). For each (partition size, block_n, num_warps) it
times both ways of merging the split-K partials: fused into the decode kernel (ticket counters, one launch)
and the two-kernel path (decode, then _merge_partitions_kernel); a partition as large as the bound is the
no-split path, the same for both. Prints us per call and the K/V bytes per call as a share of the measured
copy ceiling; Markdown table last. About 60 s on an H100/H200, most of it Triton compiling 27 variants.
"""

from __future__ import annotations

import argparse
import itertools
import time

import torch

from vramwise.kernels.paged_attention_triton import FUSED_MERGE, choose_partition_size, paged_attention_decode

PATHS = {"fused": True, "two-kernel": False}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=32)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--context", type=int, default=520)
    ap.add_argument("--bound", type=int, default=640)
    ap.add_argument("--layers", type=int, default=32)
    args = ap.parse_args()
    t_start = time.perf_counter()
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
    default_bn = max(16, min(64, 8192 // d))  # paged_attention_decode's default block_n
    default_p = choose_partition_size(1, hkv, args.bound, dev, default_bn)

    def time_config(part: int, bn: int, warps: int, fused: bool) -> float:
        """Median us per call over 20 replays of a graph of `layers` calls."""
        def step():
            for k, v in caches:
                paged_attention_decode(q, k, v, bt, ctx, d**-0.5, max_context_len=args.bound, partition_size=part,
                                       block_n=bn, num_warps=warps, out=out, fused_merge=fused)
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
        return sorted(times)[len(times) // 2]

    # (partition, block_n, warps) -> {path: us}; a partition >= the bound does not split: timed once.
    results: dict[tuple[int, int, int], dict[str, float]] = {}
    parts = dict.fromkeys((default_p, 64, 128, 256, args.bound))
    for part, bn, warps in itertools.product(parts, (16, 32, 64), (2, 4, 8)):
        split = -(-args.bound // max(part, bn)) > 1
        for path, fused in PATHS.items() if split else [("no split", FUSED_MERGE)]:
            try:
                results.setdefault((part, bn, warps), {})[path] = time_config(part, bn, warps, fused)
            except Exception as ex:  # noqa: BLE001 - a config that cannot compile is reported, not fatal
                print(f"partition {part} block_n {bn} warps {warps} {path}: {type(ex).__name__}: {str(ex)[:100]}")

    def fmt(us: float | None) -> str:
        return "-" if us is None else f"{us:.2f}"

    print(f"\n### Decode attention, 1 x {args.heads} heads ({hkv} kv) x {d}, context {args.context} of bound "
          f"{args.bound}, {torch.cuda.get_device_name()}, copy ceiling {ceiling / 1e9:.0f} GB/s; default "
          f"partition {default_p}, block_n {default_bn}, warps 4; default merge "
          f"{'fused' if FUSED_MERGE else 'two-kernel'}\n")
    print("| best us per call | partition | block_n | warps | fused us | two-kernel us | fused / two | "
          "K/V bytes share of ceiling (best) |\n|---:|---:|---:|---:|---:|---:|---:|---:|")
    ranked = sorted(results.items(), key=lambda kv: min(kv[1].values()))
    for (part, bn, warps), by_path in ranked[:16]:
        best = min(by_path.values())
        f, t = by_path.get("fused", by_path.get("no split")), by_path.get("two-kernel", by_path.get("no split"))
        ratio = f"{f / t:.2f}" if f is not None and t is not None and "no split" not in by_path else "-"
        print(f"| {best:.2f} | {part} | {bn} | {warps} | {fmt(f)} | {fmt(t)} | {ratio} | "
              f"{kv_bytes / (best * 1e-6) / ceiling:.2f} |")
    print()
    for path in (*PATHS, "no split"):
        timed = [(by_path[path], cfg) for cfg, by_path in results.items() if path in by_path]
        if timed:
            us, (part, bn, warps) = min(timed)
            print(f"- best {path}: {us:.2f} us (partition {part}, block_n {bn}, warps {warps})")
    at_default = results.get((default_p, default_bn, 4), {})
    print(f"- defaults (partition {default_p}, block_n {default_bn}, warps 4): "
          + ", ".join(f"{path} {us:.2f} us" for path, us in at_default.items()))
    print(f"- sweep took {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
