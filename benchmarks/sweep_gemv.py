"""W4A16 decode GEMV (M = 1) configs on the fused Llama-2-7B / 13B layer shapes, as a decode step sees them.

    python benchmarks/sweep_gemv.py [--models 7b,13b] [--budget-s 150] [--json out.json]

Each (shape, config) is timed in a CUDA graph that calls the kernel once on each of several weight copies
(working set > 3x L2, as in a model whose layers are each read once per token), replayed; us per call and the
packed weight + scale + min bytes as a share of the measured device-to-device copy ceiling. Outputs are checked
against the fixed default's. The best config per shape is what the fixed GEMV default should be. Table last.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from bench_kernels import copy_bandwidth, n_copies, time_graph  # noqa: E402

from vramwise.kernels import w4a16  # noqa: E402
from vramwise.kernels.w4a16 import GemvConfig, w4a16_matmul  # noqa: E402

# (name, N, K): fused QKV, o_proj, fused gate+up, down_proj
SHAPES = {
    "7b": [("qkv", 12288, 4096), ("o", 4096, 4096), ("gate_up", 22016, 4096), ("down", 4096, 11008)],
    "13b": [("qkv", 15360, 5120), ("o", 5120, 5120), ("gate_up", 27648, 5120), ("down", 5120, 13824)],
}


def configs(group: int) -> list[GemvConfig]:
    out = [GemvConfig(8, bk, w, None, 1) for bk, w in itertools.product((512, 1024, 2048), (2, 4, 8))]
    out += [GemvConfig(bn, bk, w, None, 2) for bn, bk, w in itertools.product((8, 16, 32), (512, 1024, 2048), (2, 4, 8))]
    return [c for c in out if c.block_k >= group]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="7b,13b")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--budget-s", type=float, default=150.0)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    dev = torch.device("cuda")
    ceiling = copy_bandwidth(10)
    t0 = time.time()
    w4a16.AUTOTUNE = False
    rows = []
    for model in args.models.split(","):
        for name, n, k in SHAPES[model]:
            g = args.group_size
            wbytes = n * k // 2 + 2 * 2 * (k // g) * n
            copies = [(torch.randint(-2**31, 2**31 - 1, (n // 8, k // 8, 8), dtype=torch.int32, device=dev),
                       (torch.rand(k // g, n, device=dev) * 0.01).half(),
                       (torch.rand(k // g, n, device=dev) * -0.05).half()) for _ in range(n_copies(wbytes))]
            x = torch.randn(1, k, device=dev, dtype=torch.float16)
            c0 = copies[0]
            ref = w4a16_matmul(x, *c0, g).float()
            default = w4a16._default_gemv_config(1, n, k, g, dev, torch.float16)
            for cfg in [default] + configs(g):
                if time.time() - t0 > args.budget_s:
                    break
                try:
                    y = w4a16_matmul(x, *c0, g, config=cfg).float()
                    err = ((y - ref).norm() / ref.norm()).item()
                    us = time_graph([lambda c=c: w4a16_matmul(x, *c, g, config=cfg) for c in copies], 20) * 1e6
                except Exception as e:  # a config that does not compile here is reported, not fatal
                    print(f"{model} {name} {cfg}: {type(e).__name__}: {str(e)[:120]}", flush=True)
                    continue
                row = dict(model=model, shape=name, n=n, k=k, cfg=f"v{cfg.version} n{cfg.block_n} k{cfg.block_k} "
                           f"w{cfg.num_warps}", default=cfg == default, us=us,
                           share=wbytes / (us * 1e-6) / ceiling, err=err)
                rows.append(row)
                print(json.dumps(row), flush=True)
            del copies
            torch.cuda.empty_cache()
    if args.json:
        args.json.write_text(json.dumps(dict(ceiling=ceiling, rows=rows), indent=1))
    print(f"\ncopy ceiling {ceiling / 1e9:.0f} GB/s; {torch.cuda.get_device_name()}\n")
    print("| model | shape | N x K | default us (share) | best config | best us (share) | best / default |")
    print("|---|---|---|---:|---|---:|---:|")
    for (model, shape), grp in itertools.groupby(rows, key=lambda r: (r["model"], r["shape"])):
        grp = list(grp)
        d = next(r for r in grp if r["default"])
        b = min(grp, key=lambda r: r["us"])
        print(f"| {model} | {shape} | {d['n']} x {d['k']} | {d['us']:.1f} ({d['share']:.2f}) | {b['cfg']} | "
              f"{b['us']:.1f} ({b['share']:.2f}) | {b['us'] / d['us']:.2f} |")


if __name__ == "__main__":
    main()
