"""Benchmark the W4A16 kernels (and W8A16 decode) on the Llama-2-13B layer shapes (CUDA only).

    python benchmarks/bench_kernels.py [--quick] [--group-size 128] [--dtypes float16,bfloat16] [--out r.json]

For each (N, K) shape, activation dtype and M in 1, 4, 16, 64, 512 it
  * checks the result of both paths below against x.float() @ dequant(W).float().T (relative Frobenius error);
  * times, with CUDA events (medians), the OLD default (w4a16.AUTOTUNE = False: the fixed configs as before
    first-use tuning: v1 kernels, dequantize + cuBLAS for M >= 256) and the NEW choice (AUTOTUNE: the fastest
    correct candidate, timed at first use; the tuning time is reported separately);
  * times torch.matmul with a dense weight of the activation dtype (cuBLAS), and at M = 1 torch's int4 kernel
    (aten._weight_int4pack_mm, bf16 activations) and the W8A16 GEMV.
M <= 16 timings replay a CUDA graph of calls over several weight copies (working set > 3x L2, as in a model
whose layers are each read once per token); M >= 64 use CUDA events around single calls. Decode bandwidth counts
packed weight + scales + mins + x + y bytes, as a fraction of the measured device-to-device copy bandwidth
(read + write of a 1 GiB copy). Prints one JSON line per case, then markdown tables.
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

from vramwise.kernels import w4a16, w8a16_matmul  # noqa: E402
from vramwise.kernels.timing import graph_time_per_call  # noqa: E402
from vramwise.kernels.w4a16 import w4a16_matmul  # noqa: E402
from vramwise.quant import QuantSpec, quantize_rtn, unpack_int4  # noqa: E402

SHAPES_13B = [(5120, 5120, "attn q/k/v/o"), (13824, 5120, "mlp gate/up"), (5120, 13824, "mlp down")]
# (N, K, name): the 7B decode step's fused layers and the 13B layer shapes above, for the decode sweeps
# (sweep_batch_gemm.py, sweep_gemv_prefetch.py)
DECODE_SHAPES = [(12288, 4096, "7b qkv"), (4096, 4096, "7b o"), (22016, 4096, "7b gate_up"), (4096, 11008, "7b down"),
                 (5120, 5120, "13b q"), (13824, 5120, "13b up"), (5120, 13824, "13b down")]
L2_FLUSH_BYTES = 160 << 20  # > 3x the H100's 50 MB L2
GRAPH_MAX_M = 16


def time_events(fn, reps: int, warmup: int = 2) -> float:
    """Median seconds per call, CUDA events around each call."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    pairs = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        pairs.append((start, end))
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in pairs) * 1e-3


def time_graph(fns, replays: int) -> float:
    """Median seconds per call of a CUDA graph that runs every fn once (fns use distinct weight copies): the
    kernels' first-use tuner's own timing (vramwise.kernels.timing)."""
    return graph_time_per_call(fns, replays) * 1e-3


def copy_bandwidth(reps: int) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting read + write."""
    n = 1 << 30
    a = torch.empty(n, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    t = time_events(lambda: b.copy_(a), reps=reps)
    del a, b
    return 2 * n / t


def n_copies(nbytes: int) -> int:
    return max(2, math.ceil(L2_FLUSH_BYTES / nbytes))


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref).norm() / ref.norm()).item()


def tinygemm_prepare(pw, dtype: torch.dtype):
    """Our int4 (scale, min) weights in torch's _weight_int4pack_mm format (torch 2.5+ CUDA: uint8 (N, K/2)
    input, inner_k_tiles=8), or raise."""
    codes = unpack_int4(pw.qweight).to(torch.int32)                           # (N, K) in [0, 15]
    packed_u8 = (codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8)         # (N, K/2), even k in high nibble
    w = torch.ops.aten._convert_weight_to_int4pack(packed_u8.contiguous(), 8)
    # tinygemm dequantizes (q - 8) * scale + zero, so zero = min + 8 * scale
    scales = pw.scales.to(dtype)
    zeros = (pw.mins.float() + 8 * pw.scales.float()).to(dtype)
    sz = torch.stack([scales, zeros], dim=-1).contiguous()                    # (K/G, N, 2)
    return w, sz


def time_w4(x, copies, group: int, m: int, replays: int, reps: int, autotune: bool) -> float:
    w4a16.AUTOTUNE = autotune
    try:
        if m <= GRAPH_MAX_M:
            return time_graph([lambda c=c, x=x: w4a16_matmul(x, c[0], c[1], c[2], group) for c in copies], replays)
        c = copies[0]
        return time_events(lambda x=x: w4a16_matmul(x, c[0], c[1], c[2], group), reps)
    finally:
        w4a16.AUTOTUNE = True


def cfg_name(cfg) -> str:
    if isinstance(cfg, w4a16.GemvConfig):
        asm = "" if cfg.use_asm is None else (" asm" if cfg.use_asm else " f32")
        return f"gemv{cfg.version} n{cfg.block_n} k{cfg.block_k} w{cfg.num_warps}{asm}"
    if isinstance(cfg, w4a16.GemmConfig):
        return (f"gemm{cfg.version}{' swap' if cfg.swap_ab else ''}{' pf' if cfg.prefetch else ''} {cfg.block_m}x{cfg.block_n}x{cfg.block_k} "
                f"s{cfg.split_k} w{cfg.num_warps} st{cfg.num_stages}")
    return f"dequant{cfg.version}+cuBLAS"


def bench_shape(n: int, k: int, group: int, ms: list[int], dtype: torch.dtype, copy_bw: float, quick: bool,
                deadline: float) -> list:
    torch.manual_seed(0)
    w = torch.randn(n, k, device="cuda") * 0.02
    pw4 = quantize_rtn(w, QuantSpec.int4(group))
    del w
    wd = pw4.dequantize(dtype)                                                  # (N, K) dense baseline weight
    wref = pw4.dequantize().float()                                              # fp32 oracle weight
    replays, reps = (5, 10) if quick else (10, 20)
    w4_bytes = pw4.nbytes()
    c4 = n_copies(w4_bytes)
    copies4 = [(pw4.qweight, pw4.scales, pw4.mins)] + \
        [(pw4.qweight.clone(), pw4.scales.clone(), pw4.mins.clone()) for _ in range(c4 - 1)]
    cf = n_copies(wd.numel() * wd.element_size())
    rows = []
    for m in ms:
        if time.time() > deadline:
            print(f"skipped (time budget): {dtype} {n}x{k} M={m}", flush=True)
            continue
        torch.manual_seed(m)
        x = torch.randn(m, k, device="cuda", dtype=dtype)
        ref = x.float() @ wref.t()
        r: dict = {"N": n, "K": k, "M": m, "dtype": str(dtype).replace("torch.", "")}
        # correctness + choices (tuning happens here, timed separately)
        w4a16.AUTOTUNE = False
        r["old_err"] = rel_err(w4a16_matmul(x, pw4.qweight, pw4.scales, pw4.mins, group), ref)
        r["old_cfg"] = cfg_name(w4a16.choose_config(x, pw4.qweight, pw4.scales, pw4.mins, group))
        w4a16.AUTOTUNE = True
        torch.cuda.synchronize()
        t0 = time.time()
        cfg = w4a16.choose_config(x, pw4.qweight, pw4.scales, pw4.mins, group)
        torch.cuda.synchronize()
        r["tune_s"] = time.time() - t0
        r["new_cfg"] = cfg_name(cfg)
        log = w4a16._TUNE_LOG.get(w4a16._tune_key(x, n, group), [])
        r["tune_log"] = [(cfg_name(c), None if t is None else round(t * 1e3, 2), note) for c, t, note in log]
        r["new_err"] = rel_err(w4a16_matmul(x, pw4.qweight, pw4.scales, pw4.mins, group), ref)
        # timings
        r["old_us"] = time_w4(x, copies4, group, m, replays, reps, False) * 1e6
        r["new_us"] = time_w4(x, copies4, group, m, replays, reps, True) * 1e6
        if m <= GRAPH_MAX_M:
            wc = [wd] + [wd.clone() for _ in range(cf - 1)]
            r["dense_us"] = time_graph([lambda c=c, x=x: x @ c.t() for c in wc], replays) * 1e6
            del wc
        else:
            r["dense_us"] = time_events(lambda x=x: x @ wd.t(), reps) * 1e6
        io = (m * k + m * n) * x.element_size()
        r["new_frac_copy"] = (w4_bytes + io) / (r["new_us"] * 1e-6) / copy_bw
        r["old_frac_copy"] = (w4_bytes + io) / (r["old_us"] * 1e-6) / copy_bw
        if m == 1:
            try:
                xb = x.to(torch.bfloat16)
                tg_w, tg_sz = tinygemm_prepare(pw4, torch.bfloat16)
                e = rel_err(torch.ops.aten._weight_int4pack_mm(xb, tg_w, group, tg_sz), xb.float() @ wref.t())
                if not e < 2e-2:
                    raise RuntimeError(f"tinygemm result off by {e:.1e} (packing convention?)")
                tc = [(tg_w, tg_sz)] + [(tg_w.clone(), tg_sz.clone()) for _ in range(c4 - 1)]
                r["tinygemm_us"] = time_graph(
                    [lambda c=c, xb=xb: torch.ops.aten._weight_int4pack_mm(xb, c[0], group, c[1]) for c in tc], replays) * 1e6
                del tc
            except Exception as e:  # another torch packing API, or no kernel for this GPU
                r["tinygemm_us"] = None
                r["tinygemm_error"] = f"{type(e).__name__}: {str(e)[:200]}"
            if dtype == torch.float16:
                pw8 = quantize_rtn(wref, QuantSpec.int8())
                c8 = [(pw8.qweight, pw8.scales)] + \
                    [(pw8.qweight.clone(), pw8.scales.clone()) for _ in range(n_copies(pw8.nbytes()) - 1)]
                t8 = time_graph([lambda c=c, x=x: w8a16_matmul(x, c[0], c[1], k) for c in c8], replays)
                r["w8_us"] = t8 * 1e6
                r["w8_frac_copy"] = (pw8.nbytes() + io) / t8 / copy_bw
                del c8, pw8
        print(json.dumps(r), flush=True)
        rows.append(r)
    del copies4
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer repetitions")
    ap.add_argument("--group-size", type=int, default=128, choices=(32, 64, 128))
    ap.add_argument("--dtypes", default="float16,bfloat16", help="activation dtypes, comma-separated")
    ap.add_argument("--ms", default="1,4,16,64,512", help="batch rows M, comma-separated")
    ap.add_argument("--out", type=Path, default=None, help="also write the raw numbers as JSON")
    ap.add_argument("--budget-s", type=float, default=150.0,
                    help="start no new case after this many seconds (tables cover what ran)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_kernels: needs a CUDA GPU; nothing to do here.")
        return 0
    dtypes = [getattr(torch, d.strip()) for d in args.dtypes.split(",")]
    ms = [int(v) for v in args.ms.split(",")]
    t0 = time.time()
    dev = torch.cuda.get_device_name()
    copy_bw = copy_bandwidth(5 if args.quick else 10)
    print(f"device: {dev}; torch {torch.__version__}; copy bandwidth {copy_bw / 1e9:.0f} GB/s", flush=True)
    rows = []
    deadline = t0 + args.budget_s
    # the targets first (M = 1 and 512), so a run cut by the budget still reports them
    first = [m for m in ms if m in (1, 512)]
    for group_ms in (first, [m for m in ms if m not in first]):
        for dtype in dtypes:
            for n, k, _ in SHAPES_13B:
                if group_ms:
                    rows += bench_shape(n, k, args.group_size, group_ms, dtype, copy_bw, args.quick, deadline)
    rows.sort(key=lambda r: (r["dtype"], SHAPES_13B.index(next(s for s in SHAPES_13B if s[:2] == (r["N"], r["K"]))),
                             r["M"]))
    tune_s = sum(r["tune_s"] for r in rows)

    g = args.group_size
    bad = [r for r in rows if not (r["new_err"] < (3e-3 if r["dtype"] == "float16" else 2e-2))]
    print(f"\n### W4A16 g{g} on {dev}, torch {torch.__version__} (copy bandwidth {copy_bw / 1e9:.0f} GB/s)\n")
    print("Times in us (CUDA-event medians); 'x dense' = time / torch.matmul time with a dense weight of the same "
          "dtype (<1: faster); 'copy' = achieved bytes/s as a fraction of the copy bandwidth.\n")
    print("| dtype | N x K | M | old us | new us | new/old | new x dense | new copy | new err | new choice |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        copy = f"{r['new_frac_copy']:.2f}" if r["M"] <= GRAPH_MAX_M else "-"
        print(f"| {r['dtype']} | {r['N']}x{r['K']} | {r['M']} | {r['old_us']:.1f} | {r['new_us']:.1f} | "
              f"{r['new_us'] / r['old_us']:.2f} | {r['new_us'] / r['dense_us']:.2f} | {copy} | "
              f"{r['new_err']:.1e} | {r['new_cfg']} |")
    print("\nDecode M=1 against the issue's targets (copy fraction >= 0.7 on the large shapes; >= 1.0x torch int4; "
          "prefill M=512 <= 1.3x dense):\n")
    print("| dtype | N x K | M=1 new us | copy frac (old -> new) | tinygemm us | tinygemm / new | W8 copy frac | "
          "M=512 new x dense (old) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        if r["M"] != 1:
            continue
        p = next((q for q in rows if q["M"] == 512 and q["N"] == r["N"] and q["K"] == r["K"]
                  and q["dtype"] == r["dtype"]), None)
        tg = r.get("tinygemm_us")
        w8 = f"{r['w8_frac_copy']:.2f}" if "w8_frac_copy" in r else "-"
        pre = f"{p['new_us'] / p['dense_us']:.2f} ({p['old_us'] / p['dense_us']:.2f})" if p else "-"
        tg_us = f"{tg:.1f}" if tg else "n/a"
        tg_ratio = f"{tg / r['new_us']:.2f}x" if tg else "n/a"
        print(f"| {r['dtype']} | {r['N']}x{r['K']} | {r['new_us']:.1f} | {r['old_frac_copy']:.2f} -> "
              f"{r['new_frac_copy']:.2f} | {tg_us} | {tg_ratio} | {w8} | {pre} |")
    errs = [r.get("tinygemm_error") for r in rows if r.get("tinygemm_error")]
    if errs:
        print(f"\ntinygemm n/a: {errs[0]}")
    if bad:
        print("\ncorrectness FAILED: " + ", ".join(f"{b['dtype']} {b['N']}x{b['K']} M={b['M']} err {b['new_err']:.1e}"
                                               for b in bad))
    else:
        print(f"\ncorrectness: all {len(rows)} cases within tolerance (fp16 3e-3, bf16 2e-2)")
    print(f"(first-use tuning {tune_s:.0f} s of total {time.time() - t0:.0f} s)")
    if args.out:
        args.out.write_text(json.dumps({"device": dev, "copy_bandwidth": copy_bw, "rows": rows}, indent=1))
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
