"""W4A16 GEMV v2 (M = 1) with the next tile's scales, mins and x prefetched (GemvConfig.prefetch_all) or only its
words, over block shapes and warps, on the 7B/13B layer shapes, fp16 and bf16; torch's int4 kernel for the ratio.

    [DTYPES=float16,bfloat16] python benchmarks/sweep_gemv_prefetch.py

Every config is timed in a CUDA graph over weight copies larger than L2; per shape: the fixed default with and
without the prefetch, the best config, its share of the measured copy ceiling, and torch int4's time.
"""
import sys, time
from dataclasses import replace
from pathlib import Path
import torch
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from bench_kernels import DECODE_SHAPES, time_graph, copy_bandwidth, n_copies, rel_err, cfg_name, tinygemm_prepare  # noqa
from vramwise.kernels import w4a16
from vramwise.kernels.w4a16 import GemvConfig, _launch_gemv, _default_gemv_config
from vramwise.quant import QuantSpec, quantize_rtn

T0 = time.time()
G = 128
SHAPES = DECODE_SHAPES
dev = torch.device("cuda")
bw = copy_bandwidth(5)
print(f"copy ceiling {bw/1e9:.0f} GB/s {torch.cuda.get_device_name()}", flush=True)
rows = []
import os
DTYPES = [getattr(torch, d) for d in os.environ.get("DTYPES", "float16,bfloat16").split(",")]
for DT in DTYPES:
    for n, k, name in SHAPES:
        torch.manual_seed(0)
        w = torch.randn(n, k, device="cuda") * 0.02
        pw = quantize_rtn(w, QuantSpec(bits=4, group_size=G))
        nb = pw.qweight.numel() * 4 + pw.scales.numel() * 4
        copies = [(pw.qweight.clone(), pw.scales.clone(), pw.mins.clone()) for _ in range(n_copies(nb))]
        x = torch.randn(1, k, device="cuda", dtype=DT)
        ref = x.float() @ w4a16.w4a16_dequantize(pw.qweight, pw.scales, pw.mins, G, torch.float32).float()
        base = _default_gemv_config(1, n, k, G, dev, DT)
        base = GemvConfig(base.block_n, base.block_k, base.num_warps, None, 2, True)
        cfgs = []
        for bn, bk, wp in ((base.block_n, base.block_k, base.num_warps), (8, 1024, 4), (8, 1024, 8), (8, 2048, 4), (8, 2048, 8), (16, 1024, 4), (16, 1024, 8), (8, 512, 4), (16, 512, 4), (8, 4096, 8), (8, 2048, 16), (16, 2048, 8)):
            for pf in (False, True):
                cfgs.append(GemvConfig(bn, bk, wp, None, 2, pf))

        cfgs = list(dict.fromkeys(cfgs))
        res = {}
        for cfg in cfgs:
            e = rel_err(_launch_gemv(x, pw.qweight, pw.scales, pw.mins, G, None, cfg), ref)
            t = time_graph([lambda c=c, cfg=cfg: _launch_gemv(x, c[0], c[1], c[2], G, None, cfg) for c in copies], 30)
            res[cfg] = (t, e)
        # torch's int4 kernel (bf16) for the ratio
        t_tg = None
        try:
            tg = tinygemm_prepare(pw, torch.bfloat16)
            xb = x.to(torch.bfloat16)
            t_tg = time_graph([lambda: torch.ops.aten._weight_int4pack_mm(xb, tg[0], G, tg[1])], 30)
        except Exception as ex:
            print("tinygemm:", type(ex).__name__, str(ex)[:120])
        b_off, b_on = res[replace(base, prefetch_all=False)], res[replace(base, prefetch_all=True)]
        best = min(res.items(), key=lambda kv: kv[1][0])
        print(f"{str(DT)[6:]:8s} {name:10s} default off {b_off[0]*1e6:6.1f} us ({nb/b_off[0]/bw:.2f}) on {b_on[0]*1e6:6.1f} us ({nb/b_on[0]/bw:.2f}) "
              f"best {best[1][0]*1e6:6.1f} ({nb/best[1][0]/bw:.2f}) {cfg_name(best[0])} pf{int(best[0].prefetch_all)}"
              + (f" | torch int4 {t_tg*1e6:6.1f} us" if t_tg else "") + f" maxerr {max(e for _, e in res.values()):.1e}", flush=True)
        for cfg, (t, e) in sorted(res.items(), key=lambda kv: kv[1][0])[:4]:
            print(f"      {t*1e6:6.1f} us {cfg_name(cfg)} pf{int(cfg.prefetch_all)}")
        del copies
print(f"done in {time.time()-T0:.0f} s")
