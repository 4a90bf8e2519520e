"""int8 KV cache: quantization, the torch and Triton paged attention on int8 pages, the engine end to end.

Kernel tests compare each path on int8 pages against the fp32 torch reference on the *dequantized* pages:
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
from vramwise.kernels.kv_quant import dequantize_kv, quantize_kv, resolve_kv_cache_dtype, write_kv_quantized
from vramwise.kernels.paged_attention import gather_kv, paged_attention_torch

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_CUDA = torch.cuda.is_available()


def int8_paged_kv(context_lens: list[int], hkv: int, d: int, device: str = "cpu", seed: int = 0):
    """(int8 k, int8 v, k_scale, v_scale, fp32 dequantized k, v, block_tables) with pages in random order.
    Rows get magnitudes over two decades so that per-(token, head) scales differ a lot."""
    k, v, bt = make_paged_kv(context_lens, hkv, d, torch.float32, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    nb, bs = k.shape[:2]
    mag = 10 ** (2 * torch.rand(nb, bs, hkv, 1, generator=g) - 1)  # 0.1 .. 10 per row
    out = []
    for x in (k * mag, v * mag):
        q, s = quantize_kv(x.reshape(nb * bs, hkv, d))
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


def test_write_kv_quantized_scatters_pages_and_scales():
    nb, bs, h, d = 5, 4, 2, 8
    kc, vc = torch.zeros(nb, bs, h, d, dtype=torch.int8), torch.zeros(nb, bs, h, d, dtype=torch.int8)
    ks, vs = torch.zeros(nb, bs, h, dtype=torch.float16), torch.zeros(nb, bs, h, dtype=torch.float16)
    k, v = torch.randn(3, h, d), torch.randn(3, h, d)
    slots = torch.tensor([17, 2, 9])  # block 4 row 1, block 0 row 2, block 2 row 1
    write_kv_quantized(k, v, kc, vc, ks, vs, slots)
    got_k = gather_kv(kc, torch.tensor([4]), 2, ks)[1]
    torch.testing.assert_close(got_k, k[0], atol=k[0].abs().max().item() / 250, rtol=0)
    torch.testing.assert_close(dequantize_kv(vc[0, 2], vs[0, 2]), v[1], atol=v[1].abs().max().item() / 250, rtol=0)
    assert ks[3].abs().sum() == 0 and (kc[1] == 0).all()  # untouched pages stay empty


@pytest.mark.parametrize("hq,hkv", [(4, 2), (2, 2)])
def test_torch_paths_on_int8_pages_equal_reference_on_dequantized(hq, hkv):
    from vramwise.kernels.attention_backend import prefill_attention_sdpa

    ctx = [1, 17, 40, 33]
    kq, vq, ks, vs, kd, vd, bt = int8_paged_kv(ctx, hkv, 32)
    qsl = [0, 1, 2, 22, 55]  # two decodes, a later prefill chunk of 20, a fresh prompt of 33
    q = torch.randn(qsl[-1], hq, 32)
    ref = paged_attention_torch(q, kd, vd, qsl, ctx, bt, 0.17)
    out = torch_attention(q, kq, vq, qsl, ctx, bt, 0.17, k_scale=ks, v_scale=vs)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    sd = torch.zeros_like(q)
    prefill_attention_sdpa(q, kq, vq, qsl, ctx, bt, 0.17, [2, 3], sd, ks, vs)
    torch.testing.assert_close(sd[2:], ref[2:], atol=1e-5, rtol=1e-5)


def test_int8_pages_without_scales_are_refused():
    kq, vq, ks, vs, _, _, bt = int8_paged_kv([5], 2, 16)
    with pytest.raises(ValueError, match="needs k_scale and v_scale"):
        torch_attention(torch.randn(1, 2, 16), kq, vq, [0, 1], [5], bt, 0.25)
    with pytest.raises(ValueError, match="KV scales must be"):
        torch_attention(torch.randn(1, 2, 16), kq, vq, [0, 1], [5], bt, 0.25, k_scale=ks[:, :2], v_scale=vs)


def test_kv_bytes_count_int8_and_scales_like_the_planner():
    from vramwise.config import ModelConfig
    from vramwise.memory.budget import kv_bytes_per_token

    cfg = ModelConfig("LlamaForCausalLM", 100, 64, 128, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, max_position_embeddings=256)  # fmt: skip
    per_block = KVCache.bytes_per_block(cfg, BLOCK_SIZE, torch.int8)
    assert per_block == BLOCK_SIZE * kv_bytes_per_token(cfg, "int8") == BLOCK_SIZE * 3 * 2 * 2 * (16 + 2)
    assert KVCache.bytes_per_block(cfg, BLOCK_SIZE, torch.float16) == BLOCK_SIZE * kv_bytes_per_token(cfg, "fp16")
    cache = KVCache(cfg, 7, BLOCK_SIZE, torch.int8, torch.device("cpu"))
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
    with pytest.raises(ValueError, match="fp8 is not implemented"):
        resolve_kv_cache_dtype("fp8", torch.float16)
    with pytest.raises(ValueError, match="unknown --kv-cache-dtype 'int4'"):
        resolve_kv_cache_dtype("int4", torch.float16)


@pytest.mark.slow
def test_int8_kv_greedy_output_close_to_float(bundled_llm):
    """The bundled SmolLM2 with int8 KV against fp32 KV on CPU.

    Tolerance: each cached value is off by at most scale/2 = max|row| / 254 (0.4% of its head's range).
    Measured on this model: greedy outputs equal for 16 tokens on most prompts (14 on one), argmax of the
    scored logits equal at every position, max KL(fp32 || int8) per position 0.012. The bounds below (first 8
    tokens, >= 95% argmax, KL < 0.05) leave ~4x room, while pages read with wrong scales, or never written,
    give KL of order 1 and different tokens at once."""
    from vramwise.llm import LLM
    from vramwise.sampling_params import SamplingParams

    int8 = LLM(device="cpu", max_model_len=512, kv_cache_dtype="int8", show_progress=False)
    assert int8.engine.runner.kv_cache.tensor.dtype == torch.int8
    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    want = [o.outputs[0].token_ids for o in bundled_llm.generate(prompts, params)]
    got = [o.outputs[0].token_ids for o in int8.generate(prompts, params)]
    assert got == want
    ids = bundled_llm.tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 6)
    ref, q = bundled_llm.engine.score(ids).log_softmax(-1), int8.engine.score(ids).log_softmax(-1)
    assert (ref.argmax(-1) == q.argmax(-1)).float().mean() >= 0.95
    kl = (ref.exp() * (ref - q)).sum(-1)
    assert kl.max() < 0.05, kl.max()


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_int8_triton_kernels_under_interpreter():
    """Runs TestInt8UnderInterpreter in a fresh Python with TRITON_INTERPRET=1."""
    if INTERPRETED:
        pytest.skip("already inside the interpreter run")
    run_tests_under_interpreter(__file__, "TestInt8UnderInterpreter")


# ---------------------------------------------------------------------------------------------------------
# Under TRITON_INTERPRET=1 (collected only in the subprocess above)
# ---------------------------------------------------------------------------------------------------------


class TestInt8UnderInterpreter:
    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
    @pytest.mark.parametrize("hq,hkv,partition", [(4, 2, None), (2, 2, 32), (4, 1, 32)])
    def test_decode(self, dtype, hq, hkv, partition):
        from vramwise.kernels.paged_attention_triton import paged_attention_decode

        ctx = [1, 16, 17, 100]
        kq, vq, ks, vs, kd, vd, bt = int8_paged_kv(ctx, hkv, 32)
        q = torch.randn(len(ctx), hq, 32).to(dtype)
        ref = paged_attention_torch(q.float(), kd, vd, list(range(len(ctx) + 1)), ctx, bt, 0.18)
        out = paged_attention_decode(
            q, kq, vq, bt, torch.tensor(ctx, dtype=torch.int32), 0.18, partition_size=partition, k_scale=ks, v_scale=vs
        )
        assert out.dtype == dtype
        assert_close_scaled(out, ref, dtype)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
    def test_decode_fused_merge(self, dtype):
        # Merge inside the decode kernel (ticket counters) on int8 pages: a 128 bound in 16-token partitions
        # leaves trailing ones empty; a padded row (0) gets zeros; the counters come back to 0.
        from vramwise.kernels.paged_attention_triton import paged_attention_decode

        ctx = [0, 1, 16, 17, 100]
        kq, vq, ks, vs, kd, vd, bt = int8_paged_kv(ctx[1:], 2, 32, seed=7)
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

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
    @pytest.mark.parametrize("hq,hkv", [(4, 2), (3, 3)])
    def test_prefill_and_backend(self, dtype, hq, hkv):
        from vramwise.kernels.attention_backend import sdpa_prefill_attention, triton_attention

        ctx = [1, 40, 33, 18]
        qsl = [0, 1, 21, 54, 55]  # a decode, a later chunk of 20, a fresh prompt of 33, a decode
        kq, vq, ks, vs, kd, vd, bt = int8_paged_kv(ctx, hkv, 16, seed=3)
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
    del TestInt8UnderInterpreter


# ---------------------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not (HAS_CUDA and HAS_TRITON and not INTERPRETED), reason="needs CUDA and triton")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("shape", [(40, 40, 128), (32, 8, 128)], ids=["llama2-13b", "llama3-8b"])
def test_gpu_int8_kernels_model_shapes(dtype, shape):
    from vramwise.kernels.attention_backend import triton_attention

    hq, hkv, d = shape
    ctx = [1, 300, 2048, 4096]
    kq, vq, ks, vs, kd, vd, bt = int8_paged_kv(ctx, hkv, d, device="cuda")
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
def test_gpu_int8_fused_merge_eager_and_in_cuda_graph():
    # Llama-3-8B heads on int8 pages: the fused merge against the reference and the two-kernel merge,
    # eagerly and in a graph captured at a 640 bound and replayed with changing contexts (0 = padded row).
    from test_attention_kernels import replay_decode_graph
    from vramwise.kernels.paged_attention_triton import paged_attention_decode

    hq, hkv, d = 32, 8, 128
    kq, vq, ks, vs, kd, vd, bt = int8_paged_kv([640, 640], hkv, d, device="cuda")
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
def test_gpu_int8_kv_engine_close_to_fp16():
    from vramwise.llm import LLM
    from vramwise.sampling_params import SamplingParams

    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    fp = LLM(device="cuda", max_model_len=512, show_progress=False)
    q8 = LLM(device="cuda", max_model_len=512, kv_cache_dtype="int8", show_progress=False)
    assert q8.engine.runner.kv_cache.tensor.dtype == torch.int8
    assert [o.outputs[0].token_ids for o in q8.generate(prompts, params)] == [
        o.outputs[0].token_ids for o in fp.generate(prompts, params)
    ]
    ids = fp.tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 6)
    ref, got = fp.engine.score(ids).float().log_softmax(-1), q8.engine.score(ids).float().log_softmax(-1)
    assert ((ref.exp() * (ref - got)).sum(-1)).max() < 0.05
