"""Decode GEMV epilogues: the MLP's residual add and SwiGLU folded into the W4A16 GEMV, vs separate kernels.

    python benchmarks/bench_epilogue.py [--models 7b,13b] [--m 1] [--dtype float16] [--replays 50] [--json out.json]

Per Llama-2 shape (fused gate_up N x K and down_proj), in a CUDA graph that calls the pair once on each of
several weight copies (working set > 3x L2, as in a model whose layers are each read once per token), replayed:
  down:     w4a16_matmul(h) then x + y (two kernels)        vs  w4a16_matmul_add(h, residual=x) (one)
  gate_up:  w4a16_matmul(x) then silu_and_mul (two kernels)  vs  w4a16_matmul_silu_mul(x) (one)
for the fixed GEMV default (v1, what a decode step runs) and a few explicit tilings (see configs()). Prints
us per call, the saving, packed weight bytes as a share of the device-to-device copy ceiling, and the fused
result's relative difference from the unfused one. CUDA only; ~1 min on an H100 (compiles included).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from bench_kernels import copy_bandwidth, n_copies, time_graph  # noqa: E402

from vramwise.kernels import fused, w4a16  # noqa: E402
from vramwise.kernels.w4a16 import GemvConfig, w4a16_matmul, w4a16_matmul_add, w4a16_matmul_silu_mul  # noqa: E402
from vramwise.quant import QuantSpec, quantize_rtn  # noqa: E402

# (name, N, K): fused gate+up projection and down projection of Llama-2-7B / 13B
SHAPES = {
    "7b": [("gate_up", 22016, 4096), ("down", 4096, 11008)],
    "13b": [("gate_up", 27648, 5120), ("down", 5120, 13824)],
}


def configs(shape: str, group: int) -> list[tuple[str, GemvConfig | None]]:
    """The fixed decode default (None: choose_config's pick, v1 at M <= GEMV_MAX_M; a fused SwiGLU then halves
    its K-tile, see w4a16._swiglu_tile), and explicit tilings run by both the unfused and the fused kernel:
    for gate_up the v1 default's own 8 x 1024 (SwiGLU without the halving) and v2 with either K-tile."""
    g = group
    if shape == "gate_up":
        return [("default", None), ("v1 8x1024", GemvConfig(8, max(1024, g), 4, None, 1)),
                ("v2 8x512", GemvConfig(8, max(512, g), 4, None, 2)), ("v2 8x1024", GemvConfig(8, max(1024, g), 4, None, 2))]
    return [("default", None), ("v2 8x1024", GemvConfig(8, max(1024, g), 4, None, 2)),
            ("v2 16x1024", GemvConfig(16, max(1024, g), 4, None, 2))]


def packed_bytes(qw: torch.Tensor, sc: torch.Tensor, mn: torch.Tensor) -> int:
    return qw.numel() * qw.element_size() + sc.numel() * sc.element_size() + mn.numel() * mn.element_size()


def bench_shape(name: str, n: int, k: int, m: int, dtype: torch.dtype, group: int, replays: int,
                ceiling: float) -> list[dict]:
    torch.manual_seed(0)
    pw = quantize_rtn(torch.randn(n, k, device="cuda") * 0.02, QuantSpec.int4(group))
    nbytes = packed_bytes(pw.qweight, pw.scales, pw.mins)
    copies = [(pw.qweight.clone(), pw.scales.clone(), pw.mins.clone()) for _ in range(n_copies(nbytes))]
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    res = torch.randn(m, n, device="cuda", dtype=dtype)  # the residual stream (down only)
    g = pw.group_size
    rows = []
    for label, cfg in configs(name, g):
        if name == "down":
            def unfused(c, cfg=cfg):
                return w4a16_matmul(x, c[0], c[1], c[2], g, config=cfg) + res

            def fused_(c, cfg=cfg):
                return w4a16_matmul_add(x, c[0], c[1], c[2], g, None, res, config=cfg)
        else:
            def unfused(c, cfg=cfg):
                return fused.silu_and_mul(w4a16_matmul(x, c[0], c[1], c[2], g, config=cfg))

            def fused_(c, cfg=cfg):
                return w4a16_matmul_silu_mul(x, c[0], c[1], c[2], g, config=cfg)
        try:
            ref, got = unfused(copies[0]).float(), fused_(copies[0]).float()
            diff = ((got - ref).norm() / ref.norm()).item()
            t_unf = time_graph([lambda c=c: unfused(c) for c in copies], replays)
            t_fus = time_graph([lambda c=c: fused_(c) for c in copies], replays)
        except Exception as e:  # noqa: BLE001 - report and go on with the next config
            print(f"{name} {n}x{k} {label}: {type(e).__name__}: {str(e).splitlines()[0][:160]}", flush=True)
            continue
        row = dict(shape=name, n=n, k=k, m=m, dtype=str(dtype).removeprefix("torch."), config=label,
                   unfused_us=t_unf * 1e6, fused_us=t_fus * 1e6, saved_us=(t_unf - t_fus) * 1e6,
                   unfused_bw=nbytes / t_unf / ceiling, fused_bw=nbytes / t_fus / ceiling, rel_diff=diff,
                   copies=len(copies))
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="7b,13b")
    ap.add_argument("--m", default="1", help="comma list of rows (decode batch), each <= GEMV_MAX_M")
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--replays", type=int, default=50)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_epilogue.py needs a CUDA GPU")
    w4a16.AUTOTUNE = False  # the fixed decode default, as a model step runs it
    dtype = getattr(torch, args.dtype)
    t0 = time.time()
    ceiling = copy_bandwidth(10)
    print(f"# {torch.cuda.get_device_name()}, copy ceiling {ceiling / 1e9:.0f} GB/s, torch {torch.__version__}",
          flush=True)
    rows = []
    for model in args.models.split(","):
        for name, n, k in SHAPES[model]:
            for m in (int(v) for v in args.m.split(",")):
                if m > w4a16.GEMV_MAX_M:
                    raise SystemExit(f"--m {m}: the epilogues apply at M <= GEMV_MAX_M = {w4a16.GEMV_MAX_M}")
                for r in bench_shape(name, n, k, m, dtype, args.group_size, args.replays, ceiling):
                    rows.append(dict(r, model=model))
    print(f"\n## GEMV epilogues, {torch.cuda.get_device_name()}, {args.dtype}, g{args.group_size} "
          f"({time.time() - t0:.0f} s)\n")
    print("| model | shape (N x K) | M | config | unfused us | fused us | saved us | BW unfused | BW fused | rel diff |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['shape']} {r['n']}x{r['k']} | {r['m']} | {r['config']} | {r['unfused_us']:.2f} | "
              f"{r['fused_us']:.2f} | {r['saved_us']:+.2f} | {r['unfused_bw']:.2f} | {r['fused_bw']:.2f} | "
              f"{r['rel_diff']:.1e} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
