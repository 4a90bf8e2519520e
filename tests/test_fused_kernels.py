"""Fused kernels (kernels/fused.py): references against the model's own layers, Triton against references.

- CPU, in this process: each torch reference equals the unfused module path it replaces; the sampling
  helpers keep exactly the tokens vramwise.sampler keeps.
- CPU, under Triton's interpreter: TestUnderInterpreter, collected only in the TRITON_INTERPRET=1
  subprocess that test_triton_kernels_under_interpreter starts (Triton reads the variable at import).
- GPU (marked gpu, skipped without CUDA): Llama-2-7B/13B and Llama-3-8B shapes.
"""

from __future__ import annotations

import importlib.util
import math
import os

import pytest
import torch

from fixtures import run_tests_under_interpreter
from vramwise.config import RopeScaling
from vramwise.kernels import fused
from vramwise.kernels.paged_attention import write_kv
from vramwise.models.layers import RMSNorm, RotaryEmbedding
from vramwise.models.layers import silu_and_mul as layers_silu_and_mul
from vramwise.sampler import top_k_top_p_min_p_mask

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_CUDA = torch.cuda.is_available()

# Triton rounds like torch for fp32/fp16; bf16 under the interpreter may differ in the last bits.
TOL = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    # two fp16 ulps: the fp32 rsqrt may round `normed` one ulp apart before the weight product rounds again
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=2.5e-2, rtol=2.5e-2),  # up to two bf16 ulps: the interpreter rounds bf16 its own way
}


def rms_module(weight: torch.Tensor, eps: float) -> RMSNorm:
    m = RMSNorm(weight.shape[0], eps).to(weight.dtype)
    with torch.no_grad():
        m.weight.copy_(weight)
    return m


def rope_table(head_dim: int, device: str | torch.device = "cpu", max_pos: int = 4096) -> RotaryEmbedding:
    rope = RotaryEmbedding(head_dim, max_pos, 10000.0, RopeScaling())
    rope.build_cache(device)
    return rope


def qkv_views(tokens: int, hq: int, hkv: int, d: int, dtype: torch.dtype, device="cpu"):
    """q, k, v as strided views of one fused QKV projection output (T, (Hq + 2 Hkv) * D)."""
    qkv = torch.randn(tokens, (hq + 2 * hkv) * d, device=device).to(dtype)
    q, k, v = qkv.split([hq * d, hkv * d, hkv * d], dim=1)
    return qkv, q.view(tokens, hq, d), k.view(tokens, hkv, d), v.view(tokens, hkv, d)


def check_rope(impl, tokens: int, hq: int, hkv: int, d: int, dtype: torch.dtype, cache_dtype=None, device="cpu"):
    """impl (rope_and_write_kv_*) against RotaryEmbedding + write_kv, on strided q/k/v and a layer view
    of a pooled cache; one token has slot -1 (padding) and must leave the cache untouched."""
    cache_dtype = cache_dtype or dtype
    block_size, num_blocks = 16, max(4, tokens // 4 + 2)
    rope = rope_table(d, device)
    _, q, k, v = qkv_views(tokens, hq, hkv, d, dtype, device)
    positions = torch.randint(0, 4096, (tokens,), device=device)
    slots = torch.randperm(num_blocks * block_size, device=device)[:tokens]
    slots[tokens // 2] = -1
    want_q, want_k = rope(positions, q.clone(), k.clone())
    pool = torch.zeros(2, 2, num_blocks, block_size, hkv, d, dtype=cache_dtype, device=device)
    want_pool = pool.clone()
    keep = slots >= 0
    write_kv(want_k[keep], v[keep], want_pool[1, 0], want_pool[1, 1], slots[keep])

    out_q, out_k = impl(q, k, v, positions, rope.cos_sin, pool[1, 0], pool[1, 1], slots)
    assert out_q.data_ptr() == q.data_ptr() and out_k.data_ptr() == k.data_ptr()  # in place
    tol = TOL[dtype]
    torch.testing.assert_close(q, want_q, **tol)
    torch.testing.assert_close(k, want_k, **tol)
    torch.testing.assert_close(pool, want_pool, **TOL[cache_dtype])


# ---------------------------------------------------------------------------------------------------------
# References, in this process
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_rms_norm_reference_matches_module(dtype):
    x, r, w = torch.randn(6, 64).to(dtype), torch.randn(6, 64).to(dtype), torch.randn(64).to(dtype)
    m = rms_module(w, 1e-5)
    out, res = fused.rms_norm_torch(x, w, 1e-5)
    assert torch.equal(out, m(x)) and res is x
    out, res = fused.rms_norm_torch(x, w, 1e-5, residual=r)
    assert torch.equal(res, x + r) and torch.equal(out, m(x + r))
    # on CPU the dispatcher takes the reference
    out2, _ = fused.rms_norm(x, w, 1e-5, residual=r)
    assert torch.equal(out2, out)


def test_silu_and_mul_reference_matches_layers():
    gate_up = torch.randn(5, 2 * 48)
    want = layers_silu_and_mul(gate_up[:, :48], gate_up[:, 48:])
    assert torch.equal(fused.silu_and_mul(gate_up), want)
    assert torch.equal(fused.silu_and_mul_split(gate_up[:, :48], gate_up[:, 48:]), want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_rope_reference_matches_layers(dtype):
    check_rope(fused.rope_and_write_kv_torch, 9, 8, 2, 32, dtype)
    check_rope(fused.rope_and_write_kv, 9, 4, 4, 64, dtype)


def test_greedy_sample():
    logits = torch.randn(4, 50)
    assert torch.equal(fused.greedy_sample(logits), logits.argmax(-1))


PROBS = [0.05, 0.4, 0.1, 0.3, 0.15]


@pytest.mark.parametrize(
    "temperature,top_k,top_p",
    [(0.0, 0, 1.0), (1.0, 2, 1.0), (1.0, 0, 0.7), (1.0, 3, 0.5), (1.0, 0, 1.0), (0.7, 1, 1.0), (1.0, 5, 0.9)],
)
def test_sample_top_k_top_p_keeps_sampler_sets(temperature, top_k, top_p):
    # Many draws of one row: every token drawn is one the sampler's mask keeps, and (with 4000 draws and
    # probabilities >= 0.05) every kept token is drawn at least once.
    n = 4000
    logits = torch.tensor([math.log(p) for p in PROBS]).repeat(n, 1)
    g = torch.Generator().manual_seed(0)
    tokens = fused.sample_top_k_top_p(
        logits,
        torch.full((n,), temperature),
        torch.full((n,), top_k, dtype=torch.long),
        torch.full((n,), top_p),
        generator=g,
    )
    drawn = set(tokens.tolist())
    if temperature == 0.0:
        assert drawn == {1}
        return
    keep = top_k_top_p_min_p_mask(logits[0] / temperature, top_k, top_p, 0.0)
    assert drawn == set(torch.nonzero(keep).flatten().tolist())


def test_sample_top_k_top_p_mixed_rows_and_frequencies():
    logits = torch.tensor([math.log(p) for p in PROBS]).repeat(3, 1)
    temp = torch.tensor([0.0, 1.0, 1.0])
    top_k = torch.tensor([0, 2, 0])
    top_p = torch.tensor([1.0, 1.0, 1.0])
    g = torch.Generator().manual_seed(1)
    counts = torch.zeros(3, 5)
    for _ in range(400):
        t = fused.sample_top_k_top_p(logits, temp, top_k, top_p, generator=g)
        counts[torch.arange(3), t] += 1
    assert counts[0, 1] == 400
    assert counts[1, [0, 2, 4]].sum() == 0 and abs(counts[1, 1] / 400 - 0.4 / 0.7) < 0.08
    assert abs(counts[2, 3] / 400 - 0.3) < 0.08


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_triton_kernels_under_interpreter():
    """Runs TestUnderInterpreter in a fresh interpreter with TRITON_INTERPRET=1 (see the module doc)."""
    if INTERPRETED:
        pytest.skip("already inside the interpreter run")
    run_tests_under_interpreter(__file__, "TestUnderInterpreter")


# ---------------------------------------------------------------------------------------------------------
# Under TRITON_INTERPRET=1 (collected only in the subprocess above)
# ---------------------------------------------------------------------------------------------------------

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]


class TestUnderInterpreter:
    @pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
    @pytest.mark.parametrize("hidden", [64, 96, 257])
    @pytest.mark.parametrize("with_residual", [False, True], ids=["norm", "add-norm"])
    def test_rms_norm(self, dtype, hidden, with_residual):
        x, w = torch.randn(2, 3, hidden).to(dtype), torch.randn(hidden).to(dtype)
        r = torch.randn(2, 3, hidden).to(dtype) if with_residual else None
        out, res = fused.rms_norm_triton(x, w, 1e-6, residual=r)
        want_out, want_res = fused.rms_norm_torch(x, w, 1e-6, residual=r)
        assert out.shape == x.shape and out.dtype == want_out.dtype
        torch.testing.assert_close(out, want_out, **TOL[dtype])
        torch.testing.assert_close(res, want_res, **TOL[dtype])

    def test_rms_norm_fp32_weight_on_fp16_activations(self):
        x, r, w = torch.randn(4, 64).half(), torch.randn(4, 64).half(), torch.randn(64)
        out, res = fused.rms_norm_triton(x, w, 1e-5, residual=r)
        want = rms_module(w, 1e-5)(x + r)
        assert out.dtype == torch.float32 and res.dtype == torch.float16
        torch.testing.assert_close(out, want, **TOL[torch.float32])

    @pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
    @pytest.mark.parametrize(
        "shape", [(4, 4, 32), (8, 2, 64), (8, 1, 128)], ids=lambda s: f"hq{s[0]}-hkv{s[1]}-d{s[2]}"
    )
    def test_rope_and_write_kv(self, dtype, shape):
        hq, hkv, d = shape
        check_rope(fused.rope_and_write_kv_triton, 7, hq, hkv, d, dtype)

    def test_rope_and_write_kv_fp32_into_fp16_cache(self):
        check_rope(fused.rope_and_write_kv_triton, 5, 4, 2, 64, torch.float32, cache_dtype=torch.float16)

    @pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
    @pytest.mark.parametrize("inter", [48, 1000, 1100])
    def test_silu_and_mul(self, dtype, inter):
        gate_up = torch.randn(3, 2 * inter).to(dtype)
        want = fused.silu_and_mul_torch(gate_up[:, :inter], gate_up[:, inter:])
        torch.testing.assert_close(fused.silu_and_mul_triton(gate_up), want, **TOL[dtype])
        gate, up = torch.randn(3, inter).to(dtype), torch.randn(3, inter).to(dtype)
        want = fused.silu_and_mul_torch(gate, up)
        torch.testing.assert_close(fused.silu_and_mul_split_triton(gate, up), want, **TOL[dtype])


if not INTERPRETED:
    # Collected only in the TRITON_INTERPRET=1 subprocess that test_triton_kernels_under_interpreter starts.
    del TestUnderInterpreter


# ---------------------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------------------

needs_gpu = pytest.mark.skipif(not (HAS_CUDA and HAS_TRITON and not INTERPRETED), reason="needs CUDA and triton")
GPU_DTYPES = [torch.float16, torch.bfloat16]
GPU_IDS = ["fp16", "bf16"]
# On the GPU Triton and torch both round once from fp32, but may fuse multiply-adds differently.
GPU_TOL = {torch.float16: dict(atol=2e-3, rtol=2e-3), torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2)}


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=GPU_IDS)
@pytest.mark.parametrize("hidden", [4096, 5120])
@pytest.mark.parametrize("tokens", [1, 7, 512])
def test_gpu_rms_norm(dtype, hidden, tokens):
    x = torch.randn(tokens, hidden, device="cuda").to(dtype)
    r = torch.randn(tokens, hidden, device="cuda").to(dtype)
    w = (1 + 0.1 * torch.randn(hidden, device="cuda")).to(dtype)
    for residual in (None, r):
        out, res = fused.rms_norm(x, w, 1e-5, residual=residual)
        want_out, want_res = fused.rms_norm_torch(x, w, 1e-5, residual=residual)
        torch.testing.assert_close(out, want_out, **GPU_TOL[dtype])
        torch.testing.assert_close(res, want_res, **GPU_TOL[dtype])


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=GPU_IDS)
@pytest.mark.parametrize("shape", [(32, 32, 128), (40, 40, 128), (32, 8, 128)], ids=["7b", "13b", "l3-8b"])
@pytest.mark.parametrize("tokens", [1, 32, 600])
def test_gpu_rope_and_write_kv(dtype, shape, tokens):
    hq, hkv, d = shape
    check_rope(fused.rope_and_write_kv, tokens, hq, hkv, d, dtype, device="cuda")


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=GPU_IDS)
@pytest.mark.parametrize("inter", [11008, 13824, 14336])
@pytest.mark.parametrize("tokens", [1, 32, 512])
def test_gpu_silu_and_mul(dtype, inter, tokens):
    gate_up = torch.randn(tokens, 2 * inter, device="cuda").to(dtype)
    want = fused.silu_and_mul_torch(gate_up[:, :inter], gate_up[:, inter:])
    torch.testing.assert_close(fused.silu_and_mul(gate_up), want, **GPU_TOL[dtype])


@pytest.mark.gpu
@needs_gpu
def test_gpu_no_host_sync_in_decode_path():
    # Sampling helpers and the decode kernel (given max_context_len) must not sync with the host: that is
    # what lets the runner overlap steps and capture them in CUDA graphs.
    from vramwise.kernels.paged_attention_triton import paged_attention_decode

    logits = torch.randn(8, 32000, device="cuda")
    temp = torch.full((8,), 0.8, device="cuda")
    top_k = torch.full((8,), 40, device="cuda", dtype=torch.long)
    top_p = torch.full((8,), 0.9, device="cuda")
    q = torch.randn(8, 32, 128, device="cuda").half()
    k_cache = torch.randn(64, 16, 8, 128, device="cuda").half()
    bt = torch.randint(0, 64, (8, 8), device="cuda")
    ctx = torch.full((8,), 100, dtype=torch.int32, device="cuda")
    paged_attention_decode(q, k_cache, k_cache, bt, ctx, 0.1, max_context_len=128)  # compile first
    fused.sample_top_k_top_p(logits, temp, top_k, top_p)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fused.greedy_sample(logits)
        fused.sample_top_k_top_p(logits, temp, top_k, top_p)
        paged_attention_decode(q, k_cache, k_cache, bt, ctx, 0.1, max_context_len=128)
    finally:
        torch.cuda.set_sync_debug_mode("default")
