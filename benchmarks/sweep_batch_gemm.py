"""W4A16 decode-batch GEMMs (M = 16..64): swap-AB tiles (the dequantized weight tile as the wgmma's register
operand) against the kernel the first-use tuner picks, on the 7B/13B layer shapes, as a decode step sees them.

    python benchmarks/sweep_batch_gemm.py [MS (e.g. 16,32,64)] [fp16|bf16] [time limit s]
    GRID="((64, 128), (64, 128), (4, 8), (3, 4), (False, True))" ...   # block_n, block_k, warps, stages, prefetch
    BMS="(128, 256)" SHAPES=13b ...    # x rows per tile (default: M rounded up); only shapes whose name has "13b"

Every config is timed in a CUDA graph over weight copies larger than L2 (kernels.timing.graph_time_per_call) and
checked against an fp32 reference; the summary (current choice vs best swap-AB tile, us per call) comes last.
"""
import sys, time, math, itertools, os
from pathlib import Path
import torch
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from bench_kernels import DECODE_SHAPES, time_graph, copy_bandwidth, n_copies, rel_err, cfg_name  # noqa
from vramwise.kernels import w4a16
from vramwise.kernels.w4a16 import GemmConfig, _launch_gemm, w4a16_matmul, choose_config, _choose_split_k, _wave_split
from vramwise.quant import QuantSpec, quantize_rtn

T0 = time.time()
G = 128
LIMIT = float(sys.argv[3]) if len(sys.argv) > 3 else 400
SHAPES = [sh for sh in DECODE_SHAPES if os.environ.get("SHAPES", "") in sh[2]]  # e.g. SHAPES=13b
MS = [int(v) for v in (sys.argv[1] if len(sys.argv) > 1 else "32").split(",")]
DT = torch.bfloat16 if len(sys.argv) > 2 and sys.argv[2] == "bf16" else torch.float16
dev = torch.device("cuda")
bw = copy_bandwidth(5)
print(f"copy ceiling {bw/1e9:.0f} GB/s dtype {DT} {torch.cuda.get_device_name()}", flush=True)

def cands(m, n, k):
    out = []
    bms = eval(os.environ.get("BMS", "None")) or (max(16, triton_np2(m)),)  # x rows per tile, e.g. BMS="(128, 256)"
    grid = eval(os.environ.get("GRID", "((64, 128, 256), (64, 128), (4, 8), (3, 4), (False, True))"))
    for bm, (bn, bk, wp, st, pf) in itertools.product(bms, itertools.product(*grid)):
        if bn == 256 and wp == 4 or bn // wp < 16:
            continue
        progs = math.ceil(m / bm) * math.ceil(n / bn)
        for sp in dict.fromkeys((_choose_split_k(progs, k // bk, dev), _wave_split(progs, k // bk, dev, per_sm=2),
                                 _wave_split(progs, k // bk, dev, per_sm=1),
                                 _choose_split_k(progs, k // bk, dev, per_sm=8), _wave_split(progs, k // bk, dev, per_sm=4))):
            out.append(GemmConfig(bm, bn, bk, 8, sp, wp, st, 2, True, pf))
    return list(dict.fromkeys(out))

def triton_np2(v):
    return 1 << (v - 1).bit_length()

summary = []
for n, k, name in SHAPES:
    torch.manual_seed(0)
    w = torch.randn(n, k, device="cuda") * 0.02
    pw = quantize_rtn(w, QuantSpec(bits=4, group_size=G))
    del w
    nb = pw.qweight.numel() * 4 + pw.scales.numel() * 4
    copies = [(pw.qweight.clone(), pw.scales.clone(), pw.mins.clone()) for _ in range(n_copies(nb))]
    for m in MS:
        if time.time() - T0 > LIMIT:
            print("time limit"); break
        x = torch.randn(m, k, device="cuda", dtype=DT)
        ref = x.float() @ w4a16.w4a16_dequantize(pw.qweight, pw.scales, pw.mins, G, torch.float32).float()
        def timeit(fn):
            return time_graph([lambda c=c: fn(c) for c in copies], 20)
        cur = choose_config(x, pw.qweight, pw.scales, pw.mins, G)
        t_cur = timeit(lambda c: w4a16_matmul(x, c[0], c[1], c[2], G))
        res = []
        for cfg in cands(m, n, k):
            if time.time() - T0 > LIMIT:
                break
            try:
                e = rel_err(_launch_gemm(x, pw.qweight, pw.scales, pw.mins, G, None, cfg), ref)
                t = timeit(lambda c, cfg=cfg: _launch_gemm(x, c[0], c[1], c[2], G, None, cfg))
                res.append((t, cfg_name(cfg), e))
            except Exception as ex:
                res.append((float("inf"), cfg_name(cfg) + f" ERR {type(ex).__name__}: {str(ex)[:200]}", 0))
        best = min(res) if res else (float("inf"), "-", 0)
        print(f"{name:10s} M={m:3d}: current {t_cur*1e6:7.1f} us ({nb/t_cur/1e12:.2f} TB/s) {cfg_name(cur)} | best swap {best[0]*1e6:7.1f} us "
              f"({nb/best[0]/1e12:.2f} TB/s) {best[1]} err {best[2]:.1e} -> {t_cur/best[0]:.2f}x", flush=True)
        for t, nm, e in sorted(res)[:5]:
            print(f"     {t*1e6:8.1f} us  {nm}  err {e:.1e}")
        bad = [nm for t, nm, e in res if e > (2e-2 if DT == torch.bfloat16 else 4e-3) or math.isinf(t)]
        if bad:
            print("     BAD:", len(bad), bad[:3])
        summary.append((name, m, t_cur, best[0], best[1]))
    del copies
print("SUMMARY")
for name, m, tc, tb, nm in summary:
    print(f"{name:10s} M={m:3d} cur {tc*1e6:7.1f} swap {tb*1e6:7.1f} {tc/tb:.2f}x {nm}")
print(f"done in {time.time()-T0:.0f} s")
