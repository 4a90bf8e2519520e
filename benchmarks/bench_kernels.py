"""Benchmark the W4A16 / W8A16 kernels on the Llama-2-13B layer shapes (CUDA only).

    python benchmarks/bench_kernels.py [--quick] [--group-size 128] [--out results.json]

Reports, per (N, K) shape:
  * decode M=1: time, achieved GB/s (bytes = packed weight + scales (+ mins) + x + y) and the fraction of
    the measured device-to-device copy bandwidth (2 * bytes / time of a 1 GiB copy);
  * the ratio to torch's built-in int4 kernel (aten._weight_int4pack_mm, tinygemm) at M=1, and to an fp16
    torch.matmul (cuBLAS GEMV) at M=1;
  * batches M = 4, 16, 64 and prefill M = 512 as a ratio to fp16 torch.matmul.
Decode timings replay a CUDA graph of calls over several weight copies (working set well above L2, as in a
real model where each layer's weights are read once per token); M >= 64 timings use CUDA events around
single calls, median of many. Prints a markdown table at the end.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from vramwise.kernels import w4a16_matmul, w8a16_matmul  # noqa: E402
from vramwise.quant import QuantSpec, quantize_rtn, unpack_int4  # noqa: E402

SHAPES_13B = [(5120, 5120, "attn q/k/v/o"), (13824, 5120, "mlp gate/up"), (5120, 13824, "mlp down")]
L2_FLUSH_BYTES = 160 << 20  # > 3x the H100's 50 MB L2


def time_events(fn, reps: int, warmup: int = 3) -> float:
    """Median seconds per call, CUDA events around each call."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e-3)
    return statistics.median(times)


def time_graph(fns, replays: int) -> float:
    """Median seconds per call of a CUDA graph that runs every fn once (fns use distinct weight copies)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up (compiles) outside the capture
        for f in fns:
            f()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for f in fns:
            f()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e-3 / len(fns))
    return statistics.median(times)


def copy_bandwidth(quick: bool) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting read + write."""
    n = 1 << 30
    a = torch.empty(n, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    t = time_events(lambda: b.copy_(a), reps=5 if quick else 20)
    del a, b
    return 2 * n / t


def n_copies(nbytes: int) -> int:
    return max(2, math.ceil(L2_FLUSH_BYTES / nbytes))


def tinygemm_prepare(pw, dtype: torch.dtype):
    """Our int4 (scale, min) weights in torch's _weight_int4pack_mm format, or raise."""
    codes = unpack_int4(pw.qweight).to(torch.int32)                           # (N, K) in [0, 15]
    packed_u8 = (codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8)         # (N, K/2), even k in high nibble
    w = torch.ops.aten._convert_weight_to_int4pack(packed_u8.contiguous(), 8)
    # tinygemm dequantizes (q - 8) * scale + zero, so zero = min + 8 * scale
    scales = pw.scales.to(dtype)
    zeros = (pw.mins.float() + 8 * pw.scales.float()).to(dtype)
    sz = torch.stack([scales, zeros], dim=-1).contiguous()                    # (K/G, N, 2)
    return w, sz


def bench_shape(n: int, k: int, group: int, quick: bool, copy_bw: float, dtype: torch.dtype) -> dict:
    torch.manual_seed(0)
    w = torch.randn(n, k, device="cuda") * 0.02
    pw4 = quantize_rtn(w, QuantSpec.int4(group))
    pw8 = quantize_rtn(w, QuantSpec.int8())
    wf = pw4.dequantize(dtype)                                                # (N, K) fp16 for the baselines
    del w
    res: dict = {"N": n, "K": k}
    replays = 5 if quick else 20
    reps = 10 if quick else 30

    # ---- decode, M = 1 -------------------------------------------------------------------------------------
    x1 = torch.randn(1, k, device="cuda", dtype=dtype)
    w4_bytes = pw4.nbytes()
    io_bytes = (k + n) * x1.element_size()
    c4 = n_copies(w4_bytes)
    copies4 = [(pw4.qweight.clone(), pw4.scales.clone(), pw4.mins.clone()) for _ in range(c4)]
    t = time_graph([lambda c=c: w4a16_matmul(x1, c[0], c[1], c[2], group) for c in copies4], replays)
    res["w4_m1_us"] = t * 1e6
    res["w4_m1_GBps"] = (w4_bytes + io_bytes) / t / 1e9
    res["w4_m1_frac_copy"] = (w4_bytes + io_bytes) / t / copy_bw
    del copies4

    c8 = n_copies(pw8.nbytes())
    copies8 = [(pw8.qweight.clone(), pw8.scales.clone()) for _ in range(c8)]
    t8 = time_graph([lambda c=c: w8a16_matmul(x1, c[0], c[1], k) for c in copies8], replays)
    res["w8_m1_us"] = t8 * 1e6
    res["w8_m1_frac_copy"] = (pw8.nbytes() + io_bytes) / t8 / copy_bw
    del copies8

    cf = n_copies(wf.numel() * 2)
    wcopies = [wf.clone() for _ in range(cf)]
    tf = time_graph([lambda c=c: x1 @ c.t() for c in wcopies], replays)
    res["fp16_m1_us"] = tf * 1e6
    res["fp16_m1_frac_copy"] = (wf.numel() * 2 + io_bytes) / tf / copy_bw
    del wcopies

    try:
        xb = x1.to(torch.bfloat16)
        tg_w, tg_sz = tinygemm_prepare(pw4, torch.bfloat16)
        ref = xb.float() @ pw4.dequantize().t()
        y = torch.ops.aten._weight_int4pack_mm(xb, tg_w, group, tg_sz)
        err = ((y.float() - ref).norm() / ref.norm()).item()
        if not err < 2e-2:
            raise RuntimeError(f"tinygemm result off by {err:.1e} (packing convention?)")
        ct = n_copies(tg_w.numel() * 4)
        tcopies = [(tg_w.clone(), tg_sz.clone()) for _ in range(ct)]
        tt = time_graph([lambda c=c: torch.ops.aten._weight_int4pack_mm(xb, c[0], group, c[1]) for c in tcopies],
                        replays)
        res["tinygemm_m1_us"] = tt * 1e6
    except Exception as e:  # older/newer torch with another packing API, or no kernel for this GPU
        res["tinygemm_m1_us"] = None
        res["tinygemm_error"] = f"{type(e).__name__}: {str(e)[:200]}"

    # ---- batches and prefill ------------------------------------------------------------------------------
    for m in ((4, 16, 512) if quick else (4, 16, 64, 512)):
        x = torch.randn(m, k, device="cuda", dtype=dtype)
        y = w4a16_matmul(x, pw4.qweight, pw4.scales, pw4.mins, group)       # compiles / tunes once
        ref = x.float() @ wf.float().t()
        res[f"w4_m{m}_err"] = ((y.float() - ref).norm() / ref.norm()).item()
        if m <= 16:
            copies = [(pw4.qweight.clone(), pw4.scales.clone(), pw4.mins.clone()) for _ in range(c4)]
            t_q = time_graph([lambda c=c: w4a16_matmul(x, c[0], c[1], c[2], group) for c in copies], replays)
            del copies
            wc = [wf.clone() for _ in range(cf)]
            t_f = time_graph([lambda c=c: x @ c.t() for c in wc], replays)
            del wc
        else:
            t_q = time_events(lambda: w4a16_matmul(x, pw4.qweight, pw4.scales, pw4.mins, group), reps)
            t_f = time_events(lambda: x @ wf.t(), reps)
        res[f"w4_m{m}_us"] = t_q * 1e6
        res[f"fp16_m{m}_us"] = t_f * 1e6
        res[f"w4_m{m}_speedup_vs_fp16"] = t_f / t_q
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer repetitions and batch sizes (~30 s)")
    ap.add_argument("--group-size", type=int, default=128, choices=(32, 64, 128))
    ap.add_argument("--out", type=Path, default=None, help="also write the raw numbers as JSON")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_kernels: needs a CUDA GPU; nothing to do here.")
        return 0
    t0 = time.time()
    dev = torch.cuda.get_device_name()
    copy_bw = copy_bandwidth(args.quick)
    print(f"device: {dev}; torch {torch.__version__}; copy bandwidth {copy_bw / 1e9:.0f} GB/s", flush=True)
    rows = []
    for n, k, what in SHAPES_13B:
        r = bench_shape(n, k, args.group_size, args.quick, copy_bw, torch.float16)
        r["what"] = what
        rows.append(r)
        print(json.dumps(r), flush=True)

    g = args.group_size
    print(f"\n### W4A16 (g{g}) / W8A16 kernels on {dev} (copy bandwidth {copy_bw / 1e9:.0f} GB/s)\n")
    print("| layer (N x K) | W4 M=1 us | W4 M=1 GB/s | % of copy BW | vs tinygemm M=1 | vs fp16 M=1 | "
          "W8 M=1 % of copy BW | M=4 vs fp16 | M=16 vs fp16 | M=64 vs fp16 | M=512 vs fp16 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        tg = r.get("tinygemm_m1_us")
        tg_s = f"{tg / r['w4_m1_us']:.2f}x" if tg else "n/a"
        m64 = f"{r['w4_m64_speedup_vs_fp16']:.2f}x" if "w4_m64_speedup_vs_fp16" in r else "-"
        print(f"| {r['what']} ({r['N']}x{r['K']}) | {r['w4_m1_us']:.1f} | {r['w4_m1_GBps']:.0f} | "
              f"{100 * r['w4_m1_frac_copy']:.0f}% | {tg_s} | {r['fp16_m1_us'] / r['w4_m1_us']:.2f}x | "
              f"{100 * r['w8_m1_frac_copy']:.0f}% | {r['w4_m4_speedup_vs_fp16']:.2f}x | "
              f"{r['w4_m16_speedup_vs_fp16']:.2f}x | {m64} | {r['w4_m512_speedup_vs_fp16']:.2f}x |")
    print("\n'vs X' = time of X / time of ours (>1: ours faster). fp16 M=1 reaches "
          + ", ".join(f"{100 * r['fp16_m1_frac_copy']:.0f}%" for r in rows) + " of copy bandwidth.")
    errs = [r.get("tinygemm_error") for r in rows if r.get("tinygemm_error")]
    if errs:
        print(f"tinygemm n/a: {errs[0]}")
    print(f"(total {time.time() - t0:.0f} s)")
    if args.out:
        args.out.write_text(json.dumps({"device": dev, "copy_bandwidth": copy_bw, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
