"""M = 512 W4A16 prefill: can the dequantize pass hide behind cuBLAS? (quantization issue, M = 512 <= 1.3x dense)

    python benchmarks/sweep_prefill_overlap.py [--m 512] [--dtypes fp16,bf16] [--replays 20]

Today's long-prefill path dequantizes each int4 matrix into an fp16/bf16 workspace (a memory-bound pass: 0.5 B
read + 2 B written per weight) and then runs cuBLAS (compute-bound at M = 512), one after the other: at best
(gemm + dequant) / gemm ~ 1.5x dense on the 13B shapes. Ways to overlap them, all timed the same way (one CUDA
graph over enough distinct weight copies to exceed the L2, median per matrix; the graph holds every variant's
streams, so host launches are not in the figure):

    dense      x @ W.T with W fp16/bf16 (N, K): the baseline (nn.Linear's call)
    serial     dequantize W_i into a workspace, then x @ W_i (today's path)
    pipelined  two workspaces; a side stream dequantizes W_{i+1} while the compute stream multiplies by W_i
               (a sequence of matmuls, as a decoder layer's prefill runs them: the first dequantize is exposed)
    halves     within one matmul: dequantize the first half of N, then [x @ W_a || dequantize the second half],
               then x @ W_b (no neighbour needed; cuBLAS gets half the tiles)

    engine     what the engine runs: QuantLinear modules with kernels/dequant_pipeline.DequantPipeline installed
               (the "pipelined" schedule, with the call order learned on a first pass). It cannot run inside a
               graph, so it is timed eagerly (CUDA events around whole passes, host launches included), beside
               the dense baseline timed the same way ("dense eager")

Rows: the three 13B shapes of the issue (each a run of copies of that shape, so "pipelined" is the steady state
of back-to-back matmuls of one shape) and one 13B decoder layer's fused matrices (qkv, o, gate_up, down), in
order. Each variant is checked against the dense product. Prints a markdown table last.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from bench_kernels import time_events  # noqa: E402  (this directory)
from vramwise.kernels.dequant_pipeline import install_dequant_pipeline  # noqa: E402
from vramwise.kernels.timing import graph_time_per_call  # noqa: E402
from vramwise.kernels.w4a16 import w4a16_dequantize  # noqa: E402
from vramwise.quant import QuantLinear, QuantSpec, quantize_rtn  # noqa: E402
from vramwise.quant.formats import PackedWeight  # noqa: E402

L2_FLUSH_BYTES = 160 << 20
SHAPES = {  # name -> list of (N, K) in the order one pass runs them
    "13b 5120x5120": [(5120, 5120)],
    "13b 13824x5120": [(13824, 5120)],
    "13b 5120x13824": [(5120, 13824)],
    "13b layer (qkv, o, gate_up, down)": [(15360, 5120), (5120, 5120), (27648, 5120), (5120, 13824)],
}
GROUP = 128


def graph_ms(run, replays: int) -> float:
    """Median ms of one replay of a CUDA graph holding run() (which may fork onto side streams and join): the
    kernels' own graph timing (kernels/timing.py)."""
    return graph_time_per_call([run], replays)


def eager_ms(run, reps: int) -> float:
    """Median ms of run() timed with CUDA events (host launches included): bench_kernels.time_events."""
    return time_events(run, reps) * 1e3


def build(shapes: list[tuple[int, int]], dtype: torch.dtype) -> tuple[list, list]:
    """Packed and dense copies of one pass over `shapes`, repeated until the packed bytes exceed the L2."""
    torch.manual_seed(0)
    packed, dense = [], []
    for n, k in shapes:
        pw = quantize_rtn(torch.randn(n, k, device="cuda") * 0.02, QuantSpec.int4(GROUP))
        packed.append((pw.qweight, pw.scales, pw.mins, n, k))
        dense.append(pw.dequantize(dtype))  # (N, K)
    nbytes = sum(q.numel() * q.element_size() for q, *_ in packed)
    reps = max(2, math.ceil(L2_FLUSH_BYTES / nbytes))
    packed_all = [(q.clone(), s.clone(), m.clone(), n, k) for _ in range(reps) for q, s, m, n, k in packed]
    dense_bytes = sum(w.numel() * w.element_size() for w in dense)
    dreps = max(2, math.ceil(L2_FLUSH_BYTES / dense_bytes))
    dense_all = [w.clone() for _ in range(dreps) for w in dense]
    return packed_all, dense_all


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--m", type=int, default=512)
    ap.add_argument("--dtypes", default="fp16,bf16")
    ap.add_argument("--replays", type=int, default=20)
    ap.add_argument("--only", default=None, help="substring of the shape rows to run")
    ap.add_argument("--profile", action="store_true", help="print the host-side profile of the engine variant")
    args = ap.parse_args(argv)
    dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16}
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, M = {args.m}, g{GROUP}", flush=True)
    rows = []
    comp, side = torch.cuda.current_stream(), torch.cuda.Stream()
    for dname in args.dtypes.split(","):
        dtype = dtypes[dname]
        for name, shapes in SHAPES.items():
            if args.only and args.only not in name:
                continue
            packed, dense = build(shapes, dtype)
            x = torch.randn(args.m, max(k for _, k in shapes), device="cuda", dtype=dtype) * 0.5
            xs = {k: x[:, :k].contiguous() for _, k in shapes}
            max_w = max(n * k for _, _, _, n, k in packed)
            ws = [torch.empty(max_w, device="cuda", dtype=dtype) for _ in range(2)]  # two workspaces
            outs = [torch.empty(args.m, n, device="cuda", dtype=dtype) for _, _, _, n, _ in packed]

            def wbuf(i: int, n: int, k: int, n_count: int | None = None, half: int = 0) -> torch.Tensor:
                nc = n if n_count is None else n_count
                return ws[(i + half) % 2][: k * nc].view(k, nc)

            def run_dense() -> None:
                for w in dense:
                    torch.matmul(xs[w.shape[1]], w.t())

            def run_serial() -> None:
                for i, (q, s, m, n, k) in enumerate(packed):
                    w = w4a16_dequantize(q, s, m, GROUP, dtype, version=2, out=wbuf(0, n, k))
                    torch.matmul(xs[k], w, out=outs[i])

            def run_pipelined() -> None:
                # ready[i]: W_i dequantized (side); freed[i]: matmul i done with its workspace (compute)
                ready = [torch.cuda.Event() for _ in packed]
                freed = [torch.cuda.Event() for _ in packed]
                side.wait_stream(comp)
                with torch.cuda.stream(side):
                    q, s, m, n, k = packed[0]
                    w4a16_dequantize(q, s, m, GROUP, dtype, version=2, out=wbuf(0, n, k))
                    ready[0].record(side)
                for i, (q, s, m, n, k) in enumerate(packed):
                    if i + 1 < len(packed):
                        with torch.cuda.stream(side):
                            if i >= 1:
                                side.wait_event(freed[i - 1])  # workspace (i + 1) % 2 was matmul i-1's
                            q1, s1, m1, n1, k1 = packed[i + 1]
                            w4a16_dequantize(q1, s1, m1, GROUP, dtype, version=2, out=wbuf(i + 1, n1, k1))
                            ready[i + 1].record(side)
                    comp.wait_event(ready[i])
                    torch.matmul(xs[k], wbuf(i, n, k), out=outs[i])
                    freed[i].record(comp)
                comp.wait_stream(side)

            def run_halves() -> None:
                for i, (q, s, m, n, k) in enumerate(packed):
                    h = (n // 2) // 128 * 128
                    wa = w4a16_dequantize(q, s, m, GROUP, dtype, 0, h, version=2, out=wbuf(0, n, k, h))
                    side.wait_stream(comp)
                    with torch.cuda.stream(side):
                        wb = w4a16_dequantize(q, s, m, GROUP, dtype, h, n - h, version=2,
                                              out=wbuf(0, n, k, n - h, half=1))
                    outs[i][:, :h].copy_(xs[k] @ wa)  # (M, h): the slice is strided, so no out=
                    comp.wait_stream(side)
                    outs[i][:, h:].copy_(xs[k] @ wb)

            mods = []
            for q, s_, m_, n, k in packed:
                mods.append(QuantLinear.from_packed(PackedWeight(q, s_, m_, QuantSpec.int4(GROUP), k, n)))
            pipe = install_dequant_pipeline(mods, torch.device("cuda"))

            def run_engine() -> None:
                for i, mod in enumerate(mods):
                    outs[i] = mod(xs[mod.in_features])

            def run_dense_eager() -> None:
                for w in dense:
                    torch.matmul(xs[w.shape[1]], w.t())

            # correctness of each variant on the first matrix (the dequantized weights are the dense ones)
            ref = (xs[packed[0][4]].float() @ dense[0].float().t())
            errs = {}
            for vname, fn in (("serial", run_serial), ("pipelined", run_pipelined), ("halves", run_halves),
                              ("engine", run_engine)):
                fn()
                torch.cuda.synchronize()
                errs[vname] = ((outs[0].float() - ref).norm() / ref.norm()).item()
            per_pass_dense = len(dense) // len(shapes)
            per_pass_packed = len(packed) // len(shapes)
            t = {
                "dense": graph_ms(run_dense, args.replays) / per_pass_dense,
                "serial": graph_ms(run_serial, args.replays) / per_pass_packed,
                "pipelined": graph_ms(run_pipelined, args.replays) / per_pass_packed,
                "halves": graph_ms(run_halves, args.replays) / per_pass_packed,
                "dense eager": eager_ms(run_dense_eager, args.replays) / per_pass_dense,
                "engine": eager_ms(run_engine, args.replays) / per_pass_packed,
            }
            if args.profile:
                from torch.profiler import ProfilerActivity, profile

                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    run_engine()
                    torch.cuda.synchronize()
                print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=25), flush=True)
            t["hits"] = pipe.prefetch_hits / max(1, pipe.prefetch_hits + pipe.prefetch_misses)
            row = (dname, name, t, errs)
            print(dname, name, {k: round(v * 1e3, 1) for k, v in t.items()}, {k: f"{v:.1e}" for k, v in errs.items()},
                  flush=True)
            rows.append(row)
            del packed, dense, ws, outs, mods, pipe
            torch.cuda.empty_cache()
    print("\n| dtype | matrices (one pass) | dense us | serial us | pipelined us | halves us | serial / dense | "
          "pipelined / dense | halves / dense | dense eager us | engine us | engine / dense eager | prefetch hits | "
          "max rel err |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for dname, name, t, errs in rows:
        d, de = t["dense"], t["dense eager"]
        print(f"| {dname} | {name} | {d * 1e3:.1f} | {t['serial'] * 1e3:.1f} | {t['pipelined'] * 1e3:.1f} | "
              f"{t['halves'] * 1e3:.1f} | {t['serial'] / d:.2f} | {t['pipelined'] / d:.2f} | {t['halves'] / d:.2f} | "
              f"{de * 1e3:.1f} | {t['engine'] * 1e3:.1f} | {t['engine'] / de:.2f} | {t['hits']:.0%} | "
              f"{max(errs.values()):.1e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
