"""W4A16 prefill (M = 512) on the 13B shapes: ways to feed cuBLAS without a whole dequantized weight.

Today a prefill GEMM dequantizes W into a (K, N) workspace and calls cuBLAS: the dequantize writes 4x the bytes of
the packed weight to HBM and cuBLAS reads them back, 1.6-2.7x the time of the dense fp16 matmul on an H100. The
variants here dequantize W in K-chunks small enough to stay in L2 (50 MB on an H100) and accumulate y over the
chunks with cuBLAS (beta = 1):
    seq C      chunk after chunk on one stream
    2s C       the next chunk's dequantize on a side stream (double buffer) while cuBLAS works on this one
C = rows of K per chunk. Each row prints time (CUDA events, median of single calls, as bench_kernels.py's M=512),
the ratio to the dense matmul, and the error against the fp32 product (relative Frobenius). With --graph each
path is timed inside a CUDA graph instead (the GPU's time without the host's launch gaps: a chunked path launches
two kernels per chunk from Python, and eagerly the GPU waits on those launches).

    python benchmarks/sweep_prefill_chunks.py [--m 512] [--dtypes float16,bfloat16] [--chunks 512,1024,2048]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from bench_kernels import SHAPES_13B, rel_err, time_events  # noqa: E402
from vramwise.kernels import w4a16  # noqa: E402
from vramwise.kernels.timing import graph_time_per_call  # noqa: E402
from vramwise.kernels.w4a16 import w4a16_matmul  # noqa: E402
from vramwise.quant import QuantSpec, quantize_rtn  # noqa: E402


def dequant_rows(qweight, scales, mins, group: int, k_full: int, k0: int, kc: int, out: torch.Tensor) -> None:
    """Rows [k0, k0 + kc) of the dequantized (K, N) weight into out (kc, N): the v2 dequantize kernel on views
    that start at row k0 (qweight (N/8, K/8, 8) keeps its row stride K; scales/mins start at group k0 / G)."""
    n = scales.shape[1]
    bk, bn = min(group, 64), 128
    grid = (kc // bk, triton.cdiv(n, bn))
    w4a16._w4_dequant2_kernel[grid](qweight.view(-1)[k0:], scales[k0 // group:], mins[k0 // group:], out, n,
                                    k_full, 0, n, G=group, BLOCK_N=bn, BLOCK_K=bk, num_warps=4)


def chunked_seq(x, pw, group: int, kc: int, buf: torch.Tensor) -> torch.Tensor:
    m, k = x.shape
    y = None
    for k0 in range(0, k, kc):
        c = min(kc, k - k0)
        dequant_rows(pw.qweight, pw.scales, pw.mins, group, k, k0, c, buf[:c])
        y = torch.matmul(x[:, k0:k0 + c], buf[:c]) if y is None else torch.addmm(y, x[:, k0:k0 + c], buf[:c])
    return y


class TwoStream:
    """Double-buffered chunks: the side stream dequantizes chunk i+1 while the compute stream multiplies chunk i."""

    def __init__(self, k: int, n: int, kc: int, dtype: torch.dtype) -> None:
        self.bufs = [torch.empty(kc, n, dtype=dtype, device="cuda") for _ in range(2)]
        self.side = torch.cuda.Stream()
        self.ready = [torch.cuda.Event() for _ in range(2)]
        self.free = [torch.cuda.Event() for _ in range(2)]
        self.kc = kc

    def __call__(self, x, pw, group: int) -> torch.Tensor:
        m, k = x.shape
        main = torch.cuda.current_stream()
        self.side.wait_stream(main)  # x and the previous call's use of the buffers come first
        y = None
        for i, k0 in enumerate(range(0, k, self.kc)):
            b, c = i % 2, min(self.kc, k - k0)
            with torch.cuda.stream(self.side):
                if i >= 2:
                    self.side.wait_event(self.free[b])
                dequant_rows(pw.qweight, pw.scales, pw.mins, group, k, k0, c, self.bufs[b][:c])
                self.ready[b].record(self.side)
            main.wait_event(self.ready[b])
            w = self.bufs[b][:c]
            y = torch.matmul(x[:, k0:k0 + c], w) if y is None else torch.addmm(y, x[:, k0:k0 + c], w)
            self.free[b].record(main)
        return y


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--m", type=int, default=512)
    ap.add_argument("--dtypes", default="float16,bfloat16")
    ap.add_argument("--chunks", default="512,1024,2048")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--graph", action="store_true", help="time each path in a CUDA graph (no launch gaps)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs CUDA")
        return 1
    g = args.group_size
    chunks = [int(c) for c in args.chunks.split(",")]
    rows = []
    for dtype in [getattr(torch, d) for d in args.dtypes.split(",")]:
        for n, k, name in SHAPES_13B:
            torch.manual_seed(0)
            pw = quantize_rtn(torch.randn(n, k, device="cuda") * 0.02, QuantSpec.int4(g))
            wd = pw.dequantize(dtype)  # (N, K)
            wref = pw.dequantize().float()
            x = torch.randn(args.m, k, device="cuda").to(dtype)
            ref = x.float() @ wref.t()
            timer = ((lambda fn, reps: graph_time_per_call([fn], reps) * 1e-3) if args.graph else time_events)
            dense = timer(lambda: torch.matmul(x, wd.t()), args.reps)
            cases = {"ours (today)": lambda: w4a16_matmul(x, pw.qweight, pw.scales, pw.mins, g)}
            for kc in chunks:
                if kc % g or kc > k:
                    continue
                buf = torch.empty(kc, n, dtype=dtype, device="cuda")
                cases[f"seq {kc}"] = lambda kc=kc, buf=buf: chunked_seq(x, pw, g, kc, buf)
                two = TwoStream(k, n, kc, dtype)
                cases[f"2s {kc}"] = lambda two=two: two(x, pw, g)
            for label, fn in cases.items():
                err = rel_err(fn(), ref)
                t = timer(fn, args.reps)
                rows.append((str(dtype).removeprefix("torch."), f"{n}x{k}", label, t * 1e6, t / dense, err))
                print(f"{rows[-1][0]} {rows[-1][1]} {label}: {t * 1e6:.1f} us = {t / dense:.2f}x dense "
                      f"({dense * 1e6:.1f} us), err {err:.1e}", flush=True)
            del wd, wref, pw
            torch.cuda.empty_cache()
    print("\n| dtype | N x K | path | us | / dense | rel err |\n|---|---|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]:.1f} | {r[4]:.2f} | {r[5]:.1e} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
