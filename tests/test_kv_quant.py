"""Quantized KV caches (int8, fp8 e4m3): quantization, the torch and Triton paged attention on quantized
pages, the engine end to end.

Kernel tests compare each path on quantized pages against the fp32 torch reference on the *dequantized* pages:
dequantization is part of what is tested, quantization error is not (it is bounded separately, and the
engine test bounds its effect on the model's output). Triton tests run in a fresh Python with
TRITON_INTERPRET=1 (as tests/test_attention_kernels.py explains); GPU tests are marked gpu.
"""

from __future__ import annotations

import argparse
import importlib.util
import os

import pytest
import torch

from fixtures import run_tests_under_interpreter
from test_attention_kernels import BLOCK_SIZE, TOLERANCE, make_paged_kv
from vramwise.engine.runner import KVCache
from vramwise.kernels.attention_backend import torch_attention
from vramwise.kernels.kv_quant import (
    FP8_KV_STORAGE,
    dequantize_kv,
    quantize_kv,
    resolve_kv_cache_dtype,
    write_kv_quantized,
)
from vramwise.kernels.paged_attention import gather_kv, paged_attention_torch

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_CUDA = torch.cuda.is_available()
#: --kv-cache-dtype name -> storage dtype of the quantized formats under test
KV_FORMATS = {"int8": torch.int8, "fp8": FP8_KV_STORAGE}
kv_formats = pytest.mark.parametrize("kv", list(KV_FORMATS))


def quant_paged_kv(context_lens: list[int], hkv: int, d: int, device: str = "cpu", seed: int = 0, kv: str = "int8"):
    """(k codes, v codes, k_scale, v_scale, fp32 dequantized k, v, block_tables) with pages in random order,
    codes in format `kv` (int8 | fp8). Rows get magnitudes over two decades so that per-(token, head) scales
    differ a lot."""
    k, v, bt = make_paged_kv(context_lens, hkv, d, torch.float32, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    nb, bs = k.shape[:2]
    mag = 10 ** (2 * torch.rand(nb, bs, hkv, 1, generator=g) - 1)  # 0.1 .. 10 per row
    out = []
    for x in (k * mag, v * mag):
        q, s = quantize_kv(x.reshape(nb * bs, hkv, d), KV_FORMATS[kv])
        out.append((q.view(nb, bs, hkv, d), s.view(nb, bs, hkv)))
    (kq, ks), (vq, vs) = out
    kd, vd = dequantize_kv(kq, ks), dequantize_kv(vq, vs)
    dev = torch.device(device)
    return kq.to(dev), vq.to(dev), ks.to(dev), vs.to(dev), kd.to(dev), vd.to(dev), bt.to(dev)


def assert_close_scaled(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    """Within the dtype's tolerance relative to the output's range: rows span two decades of magnitude here,
    and the kernels round dequantized tiles to q's dtype (as a float cache of that dtype would hold them)."""
    tol = TOLERANCE[dtype] * max(1.0, ref.abs().max().item())
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=TOLERANCE[dtype])


# ---------------------------------------------------------------------------------------------------------
# CPU, in this process
# ---------------------------------------------------------------------------------------------------------


def test_quantize_error_within_half_a_step_and_zero_rows_stay_zero():
    x = torch.randn(50, 3, 64) * torch.logspace(-3, 3, 50)[:, None, None]
    x[7, 1] = 0.0
    q, s = quantize_kv(x)
    assert q.dtype == torch.int8 and s.dtype == torch.float16 and s.shape == (50, 3)
    assert q.abs().max() <= 127
    err = (dequantize_kv(q, s) - x).abs()
    assert (err <= s.float()[..., None] / 2 * (1 + 1e-3)).all()  # rounding to the nearest step of the stored scale
    assert (q[7, 1] == 0).all() and (dequantize_kv(q, s)[7, 1] == 0).all()
    # each row uses its range: its largest |value| maps to 127 (126 after the scale's fp16 rounding), except
    # rows so small that their scale is clamped to fp16's smallest normal number 2^-14
    big = x.abs().amax(-1) > 127 * 2.0**-14
    assert big.sum() > 40 and (q.abs().amax(-1)[big] >= 126).all()


def test_fp8_quantize_relative_error_and_range():
    # e4m3 keeps 3 mantissa bits: every value at least 2^-6 of its row's max (a normal code after scaling
    # to 448) comes back within 2^-4 relative error (half a step, plus the scale's fp16 rounding); smaller
    # ones within half the smallest normal step, 2^-10 of the scale. Nothing saturates to NaN.
    x = torch.randn(50, 3, 64) * torch.logspace(-3, 3, 50)[:, None, None]
    x[:, :, 0] *= 40  # one outlier channel per row: int8's uniform grid would crush the rest
    x[7, 1] = 0.0
    q, s = quantize_kv(x, FP8_KV_STORAGE)
    assert q.dtype == torch.uint8 and s.dtype == torch.float16 and s.shape == (50, 3)
    deq = dequantize_kv(q, s)
    assert torch.isfinite(deq).all() and (deq[7, 1] == 0).all()
    sf = s.float()[..., None]
    normal = x.abs() >= 2.0**-6 * sf
    assert normal.float().mean() > 0.5
    rel = ((deq - x).abs() / x.abs().clamp_min(1e-30))[normal]
    assert rel.max() <= 2.0**-4 * (1 + 1e-2), rel.max()
    assert ((deq - x).abs()[~normal] <= 2.0**-10 * sf.expand_as(x)[~normal] * (1 + 1e-3)).all()
    big = x.abs().amax(-1) > 448 * 2.0**-14  # the largest |value| of a row maps near 448
    assert (deq.abs().amax(-1)[big] >= 0.99 * x.abs().amax(-1)[big]).all()
    # the same rows in int8 lose the small channels the fp8 grid keeps
    q8, s8 = quantize_kv(x, torch.int8)
    small = normal & (x.abs() < 0.01 * x.abs().amax(-1, keepdim=True))
    err8 = ((dequantize_kv(q8, s8) - x).abs() / x.abs())[small]
    assert small.sum() > 100 and err8.median() > 4 * rel.median()


def test_quantize_kv_refuses_a_float_format():
    with pytest.raises(ValueError, match="no quantized KV format"):
        quantize_kv(torch.randn(2, 1, 8), torch.float16)


@kv_formats
def test_write_kv_quantized_scatters_pages_and_scales(kv):
    nb, bs, h, d = 5, 4, 2, 8
    kc, vc = torch.zeros(nb, bs, h, d, dtype=KV_FORMATS[kv]), torch.zeros(nb, bs, h, d, dtype=KV_FORMATS[kv])
    ks, vs = torch.zeros(nb, bs, h, dtype=torch.float16), torch.zeros(nb, bs, h, dtype=torch.float16)
    k, v = torch.randn(3, h, d), torch.randn(3, h, d)
    slots = torch.tensor([17, 2, 9])  # block 4 row 1, block 0 row 2, block 2 row 1
    write_kv_quantized(k, v, kc, vc, ks, vs, slots)
    got_k = gather_kv(kc, torch.tensor([4]), 2, ks)[1]
    step = 250 if kv == "int8" else 16  # int8: half a step of max/127; fp8: 2^-4 of the value itself
    torch.testing.assert_close(got_k, k[0], atol=k[0].abs().max().item() / step, rtol=0)
    torch.testing.assert_close(dequantize_kv(vc[0, 2], vs[0, 2]), v[1], atol=v[1].abs().max().item() / step, rtol=0)
    assert ks[3].abs().sum() == 0 and (kc[1] == 0).all()  # untouched pages stay empty


@kv_formats
@pytest.mark.parametrize("hq,hkv", [(4, 2), (2, 2)])
def test_torch_paths_on_quantized_pages_equal_reference_on_dequantized(hq, hkv, kv):
    from vramwise.kernels.attention_backend import prefill_attention_sdpa

    ctx = [1, 17, 40, 33]
    kq, vq, ks, vs, kd, vd, bt = quant_paged_kv(ctx, hkv, 32, kv=kv)
    qsl = [0, 1, 2, 22, 55]  # two decodes, a later prefill chunk of 20, a fresh prompt of 33
    q = torch.randn(qsl[-1], hq, 32)
    ref = paged_attention_torch(q, kd, vd, qsl, ctx, bt, 0.17)
    out = torch_attention(q, kq, vq, qsl, ctx, bt, 0.17, k_scale=ks, v_scale=vs)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    sd = torch.zeros_like(q)
    prefill_attention_sdpa(q, kq, vq, qsl, ctx, bt, 0.17, [2, 3], sd, ks, vs)
    torch.testing.assert_close(sd[2:], ref[2:], atol=1e-5, rtol=1e-5)


@kv_formats
def test_quantized_pages_without_scales_are_refused(kv):
    kq, vq, ks, vs, _, _, bt = quant_paged_kv([5], 2, 16, kv=kv)
    with pytest.raises(ValueError, match="needs k_scale and v_scale"):
        torch_attention(torch.randn(1, 2, 16), kq, vq, [0, 1], [5], bt, 0.25)
    with pytest.raises(ValueError, match="KV scales must be"):
        torch_attention(torch.randn(1, 2, 16), kq, vq, [0, 1], [5], bt, 0.25, k_scale=ks[:, :2], v_scale=vs)


@kv_formats
def test_kv_bytes_count_codes_and_scales_like_the_planner(kv):
    from vramwise.config import ModelConfig
    from vramwise.memory.budget import kv_bytes_per_token

    cfg = ModelConfig("LlamaForCausalLM", 100, 64, 128, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, max_position_embeddings=256)  # fmt: skip
    per_block = KVCache.bytes_per_block(cfg, BLOCK_SIZE, KV_FORMATS[kv])
    assert per_block == BLOCK_SIZE * kv_bytes_per_token(cfg, kv) == BLOCK_SIZE * 3 * 2 * 2 * (16 + 2)
    assert KVCache.bytes_per_block(cfg, BLOCK_SIZE, torch.float16) == BLOCK_SIZE * kv_bytes_per_token(cfg, "fp16")
    cache = KVCache(cfg, 7, BLOCK_SIZE, KV_FORMATS[kv], torch.device("cpu"))
    assert cache.nbytes_by_device() == {"cpu": 7 * per_block} and cache.block_nbytes == per_block
    assert cache.scales(0) is not None and cache.scales(0)[0].shape == (7, BLOCK_SIZE, 2)
    assert KVCache(cfg, 7, BLOCK_SIZE, torch.float32, torch.device("cpu")).scales(2) is None


def test_kv_cache_dtype_flag_and_errors():
    from vramwise.cli import add_engine_args, make_engine_config

    p = argparse.ArgumentParser()
    add_engine_args(p)
    cfg = make_engine_config(p.parse_args(["--kv-cache-dtype", "int8", "--swap-space", "2GiB"]), show_progress=False)
    assert cfg.cache.cache_dtype == "int8" and cfg.cache.swap_space == 2 * 1024**3
    assert make_engine_config(p.parse_args([]), show_progress=False).cache.swap_space == 0
    assert resolve_kv_cache_dtype("auto", torch.bfloat16) is torch.bfloat16
    assert resolve_kv_cache_dtype("int8", torch.float16) is torch.int8
    assert resolve_kv_cache_dtype("fp8", torch.float16) is FP8_KV_STORAGE  # e4m3 codes kept as uint8
    assert make_engine_config(p.parse_args(["--kv-cache-dtype", "fp8"]), show_progress=False).cache.cache_dtype == "fp8"
    with pytest.raises(ValueError, match="unknown --kv-cache-dtype 'int4'"):
        resolve_kv_cache_dtype("int4", torch.float16)


#: Bounds of the bundled-model test per format: (argmax agreement, max KL, mean KL) per position.
#: int8: each cached value is off by at most scale/2 = max|row| / 254 (0.4% of its head's range). Measured on
#: this model: greedy outputs equal for 16 tokens on most prompts (14 on one), argmax of the scored logits equal
#: at every position, KL(fp32 || int8) per position max 0.012, mean 0.001: the bounds leave ~4x room.
#: fp8 (e4m3) keeps 3 mantissa bits (up to 2^-4 relative error per value), so it is the less accurate of the two
#: at the same size. Measured on this text: argmax equal at every position, KL max 0.066, mean 0.007; on a
#: Genesis passage 0.158 / 0.019 (94% argmax).
#: Pages read with wrong scales, or never written, give KL of order 1 and different tokens at once.
ENGINE_BOUNDS = {"int8": (0.95, 0.05, 0.01), "fp8": (0.9, 0.25, 0.03)}


@pytest.mark.slow
@kv_formats
def test_quantized_kv_greedy_output_close_to_float(bundled_llm, kv):
    """The bundled SmolLM2 with int8 / fp8 KV against fp32 KV on CPU: greedy equal for 8 tokens on three
    prompts, and the scored logits within ENGINE_BOUNDS."""
    from vramwise.llm import LLM
    from vramwise.sampling_params import SamplingParams

    llm = LLM(device="cpu", max_model_len=512, kv_cache_dtype=kv, show_progress=False)
    assert llm.engine.runner.kv_cache.tensor.dtype == KV_FORMATS[kv]
    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    want = [o.outputs[0].token_ids for o in bundled_llm.generate(prompts, params)]
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    assert got == want
    ids = bundled_llm.tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 6)
    ref, q = bundled_llm.engine.score(ids).log_softmax(-1), llm.engine.score(ids).log_softmax(-1)
    argmax, kl_max, kl_mean = ENGINE_BOUNDS[kv]
    assert (ref.argmax(-1) == q.argmax(-1)).float().mean() >= argmax
    kl = (ref.exp() * (ref - q)).sum(-1)
    assert kl.max() < kl_max and kl.mean() < kl_mean, (kl.max(), kl.mean())


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_quantized_kv_triton_kernels_under_interpreter():
    """Runs TestQuantKVUnderInterpreter in a fresh Python with TRITON_INTERPRET=1."""
    if INTERPRETED:
        pytest.skip("already inside the interpreter run")
    run_tests_under_interpreter(__file__, "TestQuantKVUnderInterpreter")


# ---------------------------------------------------------------------------------------------------------
# Under TRITON_INTERPRET=1 (collected only in the subprocess above)
# ---------------------------------------------------------------------------------------------------------


if INTERPRETED:  # a module-level kernel: the interpreter resolves a jit function's names in its module
    import triton
    import triton.language as tl

    from vramwise.kernels.paged_attention_triton import _fp8e4m3_to_f32

    @triton.jit
    def _decode_fp8_kernel(c_ptr, out_ptr, N: tl.constexpr):
        offs = tl.arange(0, N)
        tl.store(out_ptr + offs, _fp8e4m3_to_f32(tl.load(c_ptr + offs)))


class TestQuantKVUnderInterpreter:
    def test_fp8_decode_of_every_code_matches_torch(self):
        # The kernels' integer decode of e4m3 bits against torch's float8_e4m3fn conversion, for all 256
        # patterns except the two NaNs (0x7F, 0xFF), which quantize_kv never writes.
        codes = torch.tensor([c for c in range(256) if c not in (0x7F, 0xFF)], dtype=torch.uint8)
        codes = torch.cat([codes, codes[:2]])  # 256 lanes (a power of two)
        out = torch.empty(256, dtype=torch.float32)
        _decode_fp8_kernel[(1,)](codes, out, N=256)
        want = codes.view(torch.float8_e4m3fn).float()
        assert torch.equal(out, want), (codes[out != want], out[out != want], want[out != want])
        assert want.abs().max() == 448 and (want[want != 0].abs().min() == 2.0**-9)  # normals and subnormals

    @kv_formats
    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
    @pytest.mark.parametrize("hq,hkv,partition", [(4, 2, None), (2, 2, 32), (4, 1, 32)])
    def test_decode(self, dtype, hq, hkv, partition, kv):
        from vramwise.kernels.paged_attention_triton import paged_attention_decode

        ctx = [1, 16, 17, 100]
        kq, vq, ks, vs, kd, vd, bt = quant_paged_kv(ctx, hkv, 32, kv=kv)
        q = torch.randn(len(ctx), hq, 32).to(dtype)
        ref = paged_attention_torch(q.float(), kd, vd, list(range(len(ctx) + 1)), ctx, bt, 0.18)
        out = paged_attention_decode(
            q, kq, vq, bt, torch.tensor(ctx, dtype=torch.int32), 0.18, partition_size=partition, k_scale=ks, v_scale=vs
        )
        assert out.dtype == dtype
        assert_close_scaled(out, ref, dtype)

    @kv_formats
    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
    def test_decode_fused_merge(self, dtype, kv):
        # Merge inside the decode kernel (ticket counters) on int8 pages: a 128 bound in 16-token partitions
        # leaves trailing ones empty; a padded row (0) gets zeros; the counters come back to 0.
        from vramwise.kernels.paged_attention_triton import paged_attention_decode

        ctx = [0, 1, 16, 17, 100]
        kq, vq, ks, vs, kd, vd, bt = quant_paged_kv(ctx[1:], 2, 32, seed=7, kv=kv)
        bt = torch.cat([torch.zeros_like(bt[:1]), bt])  # the padded row's table points at page 0, never read
        q = torch.randn(len(ctx), 4, 32).to(dtype)
        ctx_t = torch.tensor(ctx, dtype=torch.int32)
        ref = torch.zeros(q.shape)
        ref[1:] = paged_attention_torch(q[1:].float(), kd, vd, list(range(len(ctx))), ctx[1:], bt[1:], 0.18)
        tickets = torch.zeros(len(ctx) * 2, dtype=torch.int32)
        kw = {"max_context_len": 128, "partition_size": 16, "block_n": 16, "k_scale": ks, "v_scale": vs}
        fused = paged_attention_decode(q, kq, vq, bt, ctx_t, 0.18, fused_merge=True, tickets=tickets, **kw)
        two = paged_attention_decode(q, kq, vq, bt, ctx_t, 0.18, fused_merge=False, **kw)
        assert_close_scaled(fused, ref, dtype)
        torch.testing.assert_close(fused.float(), two.float(), atol=1e-2, rtol=1e-3)  # scaled rows up to ~10
        assert torch.all(fused[0] == 0) and torch.all(tickets == 0)

    @kv_formats
    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
    @pytest.mark.parametrize("hq,hkv", [(4, 2), (3, 3)])
    def test_prefill_and_backend(self, dtype, hq, hkv, kv):
        from vramwise.kernels.attention_backend import sdpa_prefill_attention, triton_attention

        ctx = [1, 40, 33, 18]
        qsl = [0, 1, 21, 54, 55]  # a decode, a later chunk of 20, a fresh prompt of 33, a decode
        kq, vq, ks, vs, kd, vd, bt = quant_paged_kv(ctx, hkv, 16, seed=3, kv=kv)
        q = torch.randn(qsl[-1], hq, 16).to(dtype)
        ref = paged_attention_torch(q.float(), kd, vd, qsl, ctx, bt, 0.25)
        for backend in (triton_attention, sdpa_prefill_attention):
            out = backend(q, kq, vq, qsl, ctx, bt, 0.25, k_scale=ks, v_scale=vs)
            assert_close_scaled(out, ref, dtype)
        # and an all-decode batch through the backend
        q1 = torch.randn(4, hq, 16).to(dtype)
        ref1 = paged_attention_torch(q1.float(), kd, vd, [0, 1, 2, 3, 4], ctx, bt, 0.25)
        out1 = triton_attention(q1, kq, vq, [0, 1, 2, 3, 4], ctx, bt, 0.25, k_scale=ks, v_scale=vs)
        assert_close_scaled(out1, ref1, dtype)


if not INTERPRETED:
    del TestQuantKVUnderInterpreter


# ---------------------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not (HAS_CUDA and HAS_TRITON and not INTERPRETED), reason="needs CUDA and triton")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("shape", [(40, 40, 128), (32, 8, 128)], ids=["llama2-13b", "llama3-8b"])
@kv_formats
def test_gpu_quantized_kv_kernels_model_shapes(dtype, shape, kv):
    from vramwise.kernels.attention_backend import triton_attention

    hq, hkv, d = shape
    ctx = [1, 300, 2048, 4096]
    kq, vq, ks, vs, kd, vd, bt = quant_paged_kv(ctx, hkv, d, device="cuda", kv=kv)
    # Seeded queries: in bf16 the 4096-token rows come close to the tolerance (over 25 random query sets on an
    # H100 the worst error was 0.82 of it for int8 pages and 0.88 for fp8), and one unseeded run in the whole
    # GPU suite once went over it.
    torch.manual_seed(0)
    q = torch.randn(len(ctx), hq, d, device="cuda").to(dtype)
    ref = paged_attention_torch(q.float(), kd, vd, list(range(len(ctx) + 1)), ctx, bt, d**-0.5)
    out = triton_attention(q, kq, vq, list(range(len(ctx) + 1)), ctx, bt, d**-0.5, k_scale=ks, v_scale=vs)
    assert_close_scaled(out, ref, dtype)
    qsl = [0, 1, 301, 301 + 512, 301 + 512 + 1]  # decode, a fresh prompt of 300, a chunk of 512, decode
    qp = torch.randn(qsl[-1], hq, d, device="cuda").to(dtype)
    ref = paged_attention_torch(qp.float(), kd, vd, qsl, ctx, bt, d**-0.5)
    out = triton_attention(qp, kq, vq, qsl, ctx, bt, d**-0.5, k_scale=ks, v_scale=vs)
    assert_close_scaled(out, ref, dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not (HAS_CUDA and HAS_TRITON and not INTERPRETED), reason="needs CUDA and triton")
@kv_formats
def test_gpu_quantized_kv_fused_merge_eager_and_in_cuda_graph(kv):
    # Llama-3-8B heads on int8 pages: the fused merge against the reference and the two-kernel merge,
    # eagerly and in a graph captured at a 640 bound and replayed with changing contexts (0 = padded row).
    from test_attention_kernels import replay_decode_graph
    from vramwise.kernels.paged_attention_triton import paged_attention_decode

    hq, hkv, d = 32, 8, 128
    kq, vq, ks, vs, kd, vd, bt = quant_paged_kv([640, 640], hkv, d, device="cuda", kv=kv)
    bt = bt.int()
    q = torch.randn(2, hq, d, device="cuda").half()
    contexts = [[520, 1], [640, 0], [17, 300], [128, 129]]
    kw = {"partition_size": 128, "k_scale": ks, "v_scale": vs}
    outs = replay_decode_graph(q, kq, vq, bt, contexts, 640, fused_merge=True, **kw)
    for ctx, out in zip(contexts, outs):
        ctx_t = torch.tensor(ctx, dtype=torch.int32, device="cuda")
        live = [i for i, c in enumerate(ctx) if c > 0]
        ref = torch.zeros(q.shape, device="cuda")
        ref[live] = paged_attention_torch(q[live].float(), kd, vd, list(range(len(live) + 1)), [ctx[i] for i in live],
                                          bt[live], 0.1)  # fmt: skip
        eager = paged_attention_decode(q, kq, vq, bt, ctx_t, 0.1, max_context_len=640, fused_merge=True, **kw)
        two = paged_attention_decode(q, kq, vq, bt, ctx_t, 0.1, max_context_len=640, fused_merge=False, **kw)
        assert_close_scaled(out, ref, torch.float16)
        assert torch.equal(out, eager)
        torch.testing.assert_close(out.float(), two.float(), atol=1e-2, rtol=1e-3)


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@kv_formats
def test_gpu_quantized_kv_engine_close_to_fp16(kv):
    from vramwise.llm import LLM
    from vramwise.sampling_params import SamplingParams

    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    fp = LLM(device="cuda", max_model_len=512, show_progress=False)
    q8 = LLM(device="cuda", max_model_len=512, kv_cache_dtype=kv, show_progress=False)
    assert q8.engine.runner.kv_cache.tensor.dtype == KV_FORMATS[kv]
    assert [o.outputs[0].token_ids for o in q8.generate(prompts, params)] == [
        o.outputs[0].token_ids for o in fp.generate(prompts, params)
    ]
    ids = fp.tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 6)
    ref, got = fp.engine.score(ids).float().log_softmax(-1), q8.engine.score(ids).float().log_softmax(-1)
    assert ((ref.exp() * (ref - got)).sum(-1)).max() < ENGINE_BOUNDS[kv][1]
