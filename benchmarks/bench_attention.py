"""Decode attention and fused small kernels on CUDA: Triton vs the torch paths they replace.

    python benchmarks/bench_attention.py            # ~30 s on an H100
    python benchmarks/bench_attention.py --quick    # fewer repetitions and shapes
    python benchmarks/bench_attention.py --tune     # also sweep the decode kernel's launch parameters

Prints markdown tables. Times are CUDA-event medians after warm-up. Decode bandwidth counts the K/V bytes
a step must read (2 x context x kv heads x head_dim x element size, per sequence) against the measured
device-to-device copy ceiling. Each timed call reads a different layer's cache (as consecutive layers
of a real step do), so K/V do not sit in the 50 MB L2 between calls.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable

import torch
import triton

from vramwise.config import RopeScaling
from vramwise.kernels import fused
from vramwise.kernels.paged_attention import paged_attention_torch, write_kv
from vramwise.kernels.attention_backend import prefill_attention_sdpa
from vramwise.kernels.paged_attention_triton import kv_bytes_read, paged_attention_decode, paged_attention_prefill
from vramwise.kernels.timing import graph_time_per_call
from vramwise.models.layers import RMSNorm, RotaryEmbedding

BLOCK_SIZE = 16
# name: (num_q_heads, num_kv_heads, head_dim)
SHAPES = {"llama2-13b": (40, 40, 128), "llama3-8b": (32, 8, 128)}


def time_ms(fn: Callable[[int], object], reps: int, inner: int) -> float:
    """Eager: median over `reps` trials of the mean time per call of `inner` back-to-back calls fn(i).

    Includes the host's launch overhead whenever that exceeds the GPU time (small problems)."""
    for i in range(3):
        fn(i)
    torch.cuda.synchronize()
    samples = []
    for r in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for i in range(inner):
            fn(r * inner + i)
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / inner)
    return statistics.median(samples)


def time_graph_ms(fn: Callable[[int], object], reps: int, inner: int) -> float:
    """GPU time: `inner` calls fn(0..inner-1) captured in one CUDA graph, median per-call time over
    `reps` replays. No launch overhead: what a captured decode step will see (the kernels' own timer)."""
    return graph_time_per_call([lambda i=i: fn(i) for i in range(inner)], reps)


def copy_bandwidth_gbs() -> float:
    """Device-to-device copy bandwidth, bytes read + written: the ceiling for a memory-bound kernel."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = time_ms(lambda i: dst.copy_(src), reps=5, inner=5)
    del src, dst
    return 2 * (1 << 30) / ms / 1e6


def make_layers(ctx: list[int], hkv: int, d: int, dtype: torch.dtype, min_bytes: int = 256 << 20):
    """Enough layer caches (each (num_blocks, BLOCK_SIZE, Hkv, D) x2) to total >= min_bytes, and one block
    table with pages scattered over the pool."""
    need = sum(-(-c // BLOCK_SIZE) for c in ctx)
    num_blocks = need + 8
    per_layer = 2 * num_blocks * BLOCK_SIZE * hkv * d * torch.empty((), dtype=dtype).element_size()
    layers = max(2, min(40, -(-min_bytes // per_layer)))
    caches = [
        (
            torch.randn(num_blocks, BLOCK_SIZE, hkv, d, device="cuda").to(dtype),
            torch.randn(num_blocks, BLOCK_SIZE, hkv, d, device="cuda").to(dtype),
        )
        for _ in range(layers)
    ]
    pool = torch.randperm(num_blocks).tolist()
    max_blocks = max(-(-c // BLOCK_SIZE) for c in ctx)
    rows = []
    for c in ctx:
        n = -(-c // BLOCK_SIZE)
        pages, pool = pool[:n], pool[n:]
        rows.append(pages + [0] * (max_blocks - n))
    return caches, torch.tensor(rows, dtype=torch.long, device="cuda")


def bench_decode(args: argparse.Namespace, ceiling: float) -> None:
    dtype = torch.float16
    reps, inner = (5, 10) if args.quick else (11, 20)
    batches = [1, 8, 32]
    contexts = [512, 2048]
    shapes = ["llama2-13b"] if args.quick else ["llama2-13b", "llama3-8b"]
    print(f"\n### Decode attention, {dtype}, block_size {BLOCK_SIZE} (copy ceiling {ceiling:.0f} GB/s)\n")
    print("GPU us: Triton kernels replayed from a CUDA graph (no launch overhead); eager us: plain calls.\n")
    print(
        "| shape | batch | context | triton GPU us | GB/s | % of ceiling | triton eager us | torch eager us "
        "| torch GB/s |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name in shapes:
        hq, hkv, d = SHAPES[name]
        for batch in batches:
            for ctx_len in contexts:
                ctx = [ctx_len] * batch
                caches, bt = make_layers(ctx, hkv, d, dtype)
                q = torch.randn(batch, hq, d, device="cuda").to(dtype)
                ctx_t = torch.tensor(ctx, dtype=torch.int32, device="cuda")
                qsl = list(range(batch + 1))
                scale = d**-0.5
                n = len(caches)

                def triton_step(i: int) -> torch.Tensor:
                    k, v = caches[i % n]
                    return paged_attention_decode(q, k, v, bt, ctx_t, scale, max_context_len=ctx_len)

                def torch_step(i: int) -> torch.Tensor:
                    k, v = caches[i % n]
                    return paged_attention_torch(q, k, v, qsl, ctx, bt, scale)

                torch.testing.assert_close(triton_step(0), torch_step(0), atol=3e-3, rtol=3e-3)
                t_gpu = time_graph_ms(triton_step, reps, n)
                t_tri = time_ms(triton_step, reps, inner)
                t_ref = time_ms(torch_step, reps, max(1, inner // 4))
                gb = kv_bytes_read(ctx, hkv, d, dtype) / 1e9
                print(
                    f"| {name} | {batch} | {ctx_len} | {t_gpu * 1e3:.1f} | {gb / t_gpu * 1e3:.0f} "
                    f"| {100 * gb / t_gpu * 1e3 / ceiling:.0f}% | {t_tri * 1e3:.1f} | {t_ref * 1e3:.1f} "
                    f"| {gb / t_ref * 1e3:.0f} |"
                )
                del caches
    torch.cuda.empty_cache()


def bench_prefill(args: argparse.Namespace) -> None:
    """Triton varlen prefill over the pages vs SDPA per sequence on gathered K/V (eager: the Triton path
    uploads its tile table each call, and prefill steps are long enough that launch cost hardly shows)."""
    dtype = torch.float16
    reps, inner = (5, 3) if args.quick else (9, 5)
    cases = {
        "prompt 512": [(512, 512)],
        "chunk 512 @ 2048": [(512, 2048)],
        "8 prompts x 512": [(512, 512)] * 8,
        "prompt 2048": [(2048, 2048)],
    }
    print(f"\n### Prefill attention, {dtype}: Triton varlen kernel vs SDPA per sequence (eager)\n")
    print("| shape | case | triton us | triton TFLOP/s | sdpa us | sdpa TFLOP/s | torch ref us |")
    print("|---|---|---|---|---|---|---|")
    for name in ["llama2-13b"] if args.quick else list(SHAPES):
        hq, hkv, d = SHAPES[name]
        for case, seqs in cases.items():
            ctx = [c for _, c in seqs]
            qsl = [0]
            for n, _ in seqs:
                qsl.append(qsl[-1] + n)
            caches, bt = make_layers(ctx, hkv, d, dtype)
            q = torch.randn(qsl[-1], hq, d, device="cuda").to(dtype)
            nl, scale, idx = len(caches), d**-0.5, list(range(len(seqs)))
            out = torch.empty_like(q)
            # causal: query j of n (at position c - n + j) sees c - n + j + 1 keys; 2 matmuls of 2 flops
            flops = sum(4 * hq * d * (n * (c - n) + n * (n + 1) // 2) for n, c in seqs)

            def tri(i: int) -> torch.Tensor:
                return paged_attention_prefill(q, *caches[i % nl], bt, qsl, ctx, scale)

            def sdpa(i: int) -> None:
                prefill_attention_sdpa(q, *caches[i % nl], qsl, ctx, bt, scale, idx, out)

            def ref(i: int) -> torch.Tensor:
                return paged_attention_torch(q, *caches[i % nl], qsl, ctx, bt, scale)

            torch.testing.assert_close(tri(0), ref(0), atol=3e-3, rtol=3e-3)
            t_tri, t_sdpa, t_ref = (time_ms(f, reps, inner) for f in (tri, sdpa, ref))
            print(
                f"| {name} | {case} | {t_tri * 1e3:.0f} | {flops / t_tri / 1e9:.0f} | {t_sdpa * 1e3:.0f} "
                f"| {flops / t_sdpa / 1e9:.0f} | {t_ref * 1e3:.0f} |"
            )
            del caches
    torch.cuda.empty_cache()


def bench_decode_tuning(args: argparse.Namespace) -> None:
    """Sweep the decode kernel's tile and launch parameters, then the partition size, on a few shapes."""
    dtype = torch.float16
    print("\n### Decode kernel tuning sweep (GPU us per call from CUDA-graph replay, best first)\n")
    print("| shape | batch | ctx | use_dot | block_n | warps | stages | partition | us |")
    print("|---|---|---|---|---|---|---|---|---|")
    cases = [("llama2-13b", 1, 2048), ("llama2-13b", 32, 2048), ("llama3-8b", 1, 4096), ("llama3-8b", 32, 2048)]
    for name, batch, ctx_len in cases:
        hq, hkv, d = SHAPES[name]
        ctx = [ctx_len] * batch
        caches, bt = make_layers(ctx, hkv, d, dtype)
        q = torch.randn(batch, hq, d, device="cuda").to(dtype)
        ctx_t = torch.tensor(ctx, dtype=torch.int32, device="cuda")
        n = len(caches)

        def run(**kw: object) -> float | None:
            try:
                return time_graph_ms(
                    lambda i: paged_attention_decode(q, *caches[i % n], bt, ctx_t, 0.1, max_context_len=ctx_len, **kw),
                    5,
                    n,
                )
            except Exception as e:  # a config the compiler rejects (e.g. out of shared memory)
                print(f"<!-- {name} {kw}: {type(e).__name__} -->", file=sys.stderr)
                return None

        results = []
        for use_dot in [False, True] if hq == hkv else [True]:
            for block_n in (32, 64, 128):
                for warps in (4, 8):
                    for stages in (1, 2, 3):
                        kw = dict(use_dot=use_dot, block_n=block_n, num_warps=warps, num_stages=stages)
                        t = run(**kw)
                        if t is not None:
                            results.append((t, kw))
        results.sort(key=lambda r: r[0])
        best = results[0][1]
        for part in (256, 512, 1024, 1 << 20):
            t = run(**best, partition_size=part)
            if t is not None:
                results.append((t, dict(best, partition_size=part)))
        results.sort(key=lambda r: r[0])
        for t, kw in results[:8]:
            print(
                f"| {name} | {batch} | {ctx_len} | {kw['use_dot']} | {kw['block_n']} | {kw['num_warps']} "
                f"| {kw['num_stages']} | {kw.get('partition_size', 'auto')} | {t * 1e3:.1f} |"
            )
        print(f"| {name} | {batch} | {ctx_len} | default | | | | auto | {run() * 1e3:.1f} |")
        del caches


def bench_prefill_tuning(args: argparse.Namespace) -> None:
    """Sweep the prefill kernel's tile and launch parameters (eager us, best first)."""
    dtype = torch.float16
    print("\n### Prefill kernel tuning sweep (eager us per call, best first)\n")
    print("| shape | case | rows | block_n | warps | stages | us |")
    print("|---|---|---|---|---|---|---|")
    cases = [("llama2-13b", "prompt 2048", [(2048, 2048)]), ("llama3-8b", "8 prompts x 512", [(512, 512)] * 8)]
    for name, case, seqs in cases:
        hq, hkv, d = SHAPES[name]
        group = triton.next_power_of_2(hq // hkv)
        ctx = [c for _, c in seqs]
        qsl = [0]
        for n, _ in seqs:
            qsl.append(qsl[-1] + n)
        caches, bt = make_layers(ctx, hkv, d, dtype)
        q = torch.randn(qsl[-1], hq, d, device="cuda").to(dtype)
        nl = len(caches)
        results = []
        for rows in (64, 128):
            for block_n in (32, 64, 128):
                for warps in (4, 8):
                    for stages in (2, 3):
                        kw = dict(block_m=max(1, rows // group), block_n=block_n, num_warps=warps, num_stages=stages)
                        def call(i: int) -> torch.Tensor:
                            return paged_attention_prefill(q, *caches[i % nl], bt, qsl, ctx, 0.1, **kw)

                        try:
                            t = time_ms(call, 5, 3)
                        except Exception as e:  # a config the compiler rejects (e.g. out of shared memory)
                            print(f"<!-- {name} {kw}: {type(e).__name__} -->", file=sys.stderr)
                            continue
                        results.append((t, rows, block_n, warps, stages))
        results.sort()
        for t, rows, block_n, warps, stages in results[:6]:
            print(f"| {name} | {case} | {rows} | {block_n} | {warps} | {stages} | {t * 1e3:.0f} |")
        t = time_ms(lambda i: paged_attention_prefill(q, *caches[i % nl], bt, qsl, ctx, 0.1), 5, 3)
        print(f"| {name} | {case} | default | | | | {t * 1e3:.0f} |")
        del caches


def bench_fused(args: argparse.Namespace, ceiling: float) -> None:
    dtype = torch.float16
    reps, inner = (5, 20) if args.quick else (11, 50)
    hidden, inter, hq, hkv, d = 5120, 13824, 40, 40, 128  # Llama-2-13B
    tokens_list = [1, 32] if args.quick else [1, 32, 512]
    print(f"\n### Fused kernels vs unfused torch, Llama-2-13B shapes, {dtype}\n")
    print("GPU us: replayed from a CUDA graph; eager us: plain calls (host launch overhead included).\n")
    print("| op | tokens | fused GPU us | torch GPU us | GPU speedup | fused eager us | torch eager us | fused GB/s |")
    print("|---|---|---|---|---|---|---|---|")
    esize = torch.empty((), dtype=dtype).element_size()
    norm = RMSNorm(hidden).to("cuda", dtype)
    rope = RotaryEmbedding(d, 4096, 10000.0, RopeScaling())
    rope.build_cache("cuda")

    def row(op: str, tokens: int, fused_fn: Callable[[int], object], torch_fn: Callable[[int], object], moved: int):
        fg, tg = time_graph_ms(fused_fn, reps, inner), time_graph_ms(torch_fn, reps, inner)
        fe, te = time_ms(fused_fn, reps, inner), time_ms(torch_fn, reps, inner)
        print(
            f"| {op} | {tokens} | {fg * 1e3:.1f} | {tg * 1e3:.1f} | {tg / fg:.1f}x | {fe * 1e3:.1f} | {te * 1e3:.1f} "
            f"| {moved / fg / 1e6:.0f} |"
        )

    for t in tokens_list:
        x = torch.randn(t, hidden, device="cuda").to(dtype)
        r = torch.randn(t, hidden, device="cuda").to(dtype)
        row(
            "add + rms_norm",
            t,
            lambda i: fused.rms_norm(x, norm.weight, 1e-6, residual=r),
            lambda i: norm(x + r),
            4 * t * hidden * esize,  # read x, r; write out, new residual
        )
        gate_up = torch.randn(t, 2 * inter, device="cuda").to(dtype)
        row(
            "silu_and_mul",
            t,
            lambda i: fused.silu_and_mul(gate_up),
            lambda i: fused.silu_and_mul_torch(gate_up[:, :inter], gate_up[:, inter:]),
            3 * t * inter * esize,
        )
        num_blocks = max(64, 2 * t // BLOCK_SIZE + 2)
        k_cache = torch.zeros(num_blocks, BLOCK_SIZE, hkv, d, device="cuda", dtype=dtype)
        v_cache = torch.zeros_like(k_cache)
        q = torch.randn(t, hq, d, device="cuda").to(dtype)
        k = torch.randn(t, hkv, d, device="cuda").to(dtype)
        v = torch.randn(t, hkv, d, device="cuda").to(dtype)
        positions = torch.arange(t, device="cuda") + 100
        slots = torch.randperm(num_blocks * BLOCK_SIZE, device="cuda")[:t]

        def torch_rope_write(i: int) -> None:
            qr, kr = rope(positions, q, k)
            write_kv(kr, v, k_cache, v_cache, slots)

        row(
            "rope + kv write",
            t,
            lambda i: fused.rope_and_write_kv(q, k, v, positions, rope.cos_sin, k_cache, v_cache, slots),
            torch_rope_write,
            (2 * hq + 5 * hkv) * t * d * esize,  # q, k read and written; v read; k, v written to the cache
        )

    logits = torch.randn(32, 32000, device="cuda")
    temp = torch.full((32,), 0.8, device="cuda")
    top_k = torch.full((32,), 50, dtype=torch.long, device="cuda")
    top_p = torch.full((32,), 0.9, device="cuda")
    f = time_graph_ms(lambda i: fused.sample_top_k_top_p(logits, temp, top_k, top_p), reps, 5)
    print(f"| sample_top_k_top_p (torch, no sync) | 32 x 32000 | {f * 1e3:.1f} | | | | | |")
    f = time_ms(lambda i: _noop_kernel[(1,)](logits), reps, inner)
    print(f"| empty Triton kernel (launch overhead) | - | | | | {f * 1e3:.1f} | | |")


@triton.jit
def _noop_kernel(x_ptr):
    pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions and shapes")
    parser.add_argument("--tune", action="store_true", help="also sweep the decode kernel's launch parameters")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_attention.py needs a CUDA GPU")
    props = torch.cuda.get_device_properties(0)
    print(f"{props.name}, {props.multi_processor_count} SMs; torch {torch.__version__}, triton {triton.__version__}")
    ceiling = copy_bandwidth_gbs()
    bench_decode(args, ceiling)
    bench_prefill(args)
    bench_fused(args, ceiling)
    if args.tune:
        bench_decode_tuning(args)
        bench_prefill_tuning(args)


if __name__ == "__main__":
    main()
