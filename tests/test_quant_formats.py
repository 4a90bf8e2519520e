"""Packed formats, RTN, QuantLinear and quantize_model (CPU, torch reference paths)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from vramwise.quant import (
    PackedWeight,
    QuantLinear,
    QuantSpec,
    dequantize,
    make_int4,
    make_int8,
    pack_int4,
    quantize_model,
    quantize_rtn,
    unpack_int4,
)

# ------------------------------------------------------------------------------------------------------------
# QuantSpec validation
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [3, 5, 2, 16])
def test_unsupported_bits_named(bits):
    with pytest.raises(ValueError, match=f"bits={bits}"):
        QuantSpec(bits=bits)


@pytest.mark.parametrize("group", [16, 48, 256, None])
def test_int4_group_size_must_be_32_64_128(group):
    with pytest.raises(ValueError, match=f"group_size={group}"):
        QuantSpec(bits=4, group_size=group)


def test_int8_is_symmetric_only_and_groups_are_multiples_of_32():
    with pytest.raises(ValueError, match="symmetric"):
        QuantSpec(bits=8, symmetric=False)
    with pytest.raises(ValueError, match="group_size=40"):
        QuantSpec.int8(40)
    assert QuantSpec(bits=8).group_size is None and QuantSpec(bits=8).symmetric
    assert QuantSpec().bits == 4 and QuantSpec().group_size == 128 and not QuantSpec().symmetric
    assert QuantSpec.int8(32).name == "w8g32" and QuantSpec.int4(32, symmetric=True).name == "w4g32s"


def test_group_not_dividing_in_features_names_both_numbers():
    spec = QuantSpec.int4(128)
    with pytest.raises(ValueError, match=r"group_size=128.*in_features=320"):
        spec.check_shape(64, 320)
    with pytest.raises(ValueError, match=r"group_size=128.*in_features=320"):
        quantize_rtn(torch.randn(64, 320), spec)
    with pytest.raises(ValueError, match=r"group_size=128.*in_features=320"):
        QuantLinear(320, 64, spec)
    with pytest.raises(ValueError, match=r"group_size=64.*in_features=96"):
        quantize_rtn(torch.randn(8, 96), QuantSpec.int8(64))


def test_int4_out_features_multiple_of_8():
    with pytest.raises(ValueError, match="out_features=12"):
        QuantLinear(128, 12, QuantSpec.int4(32))


def test_weight_bytes_matches_packed_buffers():
    for spec in (QuantSpec.int4(32), QuantSpec.int4(128), QuantSpec.int8(), QuantSpec.int8(32)):
        pw = quantize_rtn(torch.randn(64, 256), spec)
        assert spec.weight_bytes(64, 256) == pw.nbytes()


# ------------------------------------------------------------------------------------------------------------
# Packing
# ------------------------------------------------------------------------------------------------------------


def test_pack_unpack_roundtrip_and_layout():
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (24, 64), generator=g)
    q = pack_int4(codes)
    assert q.dtype == torch.int32 and q.shape == (3, 8, 8)
    assert torch.equal(unpack_int4(q).long(), codes)
    # documented layout: qweight[b, r, c] bits [4i, 4i+4) = codes[8b + c, 8r + i]
    b, r, c, i = 2, 5, 3, 7
    word = int(q[b, r, c]) & 0xFFFFFFFF
    assert (word >> (4 * i)) & 0xF == int(codes[8 * b + c, 8 * r + i])
    # all-15 codes set the sign bit; unpacking must not smear it
    full = torch.full((8, 8), 15)
    assert int(pack_int4(full)[0, 0, 0]) == -1
    assert torch.equal(unpack_int4(pack_int4(full)).long(), full)


def test_pack_rejects_bad_codes():
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        pack_int4(torch.full((8, 8), 16))
    with pytest.raises(ValueError, match="multiples of 8"):
        pack_int4(torch.zeros(8, 12, dtype=torch.long))


def test_packed_weight_validate_names_the_bad_tensor():
    pw = quantize_rtn(torch.randn(16, 64), QuantSpec.int4(32))
    bad = PackedWeight(pw.qweight, pw.scales.float(), pw.mins, pw.spec, 64, 16)
    with pytest.raises(ValueError, match="scales"):
        bad.validate()
    bad = PackedWeight(pw.qweight[:1], pw.scales, pw.mins, pw.spec, 64, 16)
    with pytest.raises(ValueError, match="qweight"):
        bad.validate()


# ------------------------------------------------------------------------------------------------------------
# RTN error bounds
# ------------------------------------------------------------------------------------------------------------


def _group_view(t: torch.Tensor, g: int) -> torch.Tensor:
    n, k = t.shape
    return t.reshape(n, k // g, g)


@pytest.mark.parametrize("group", [None, 32, 128])
def test_rtn_int8_error_bound(group):
    w = torch.randn(96, 256, generator=torch.Generator().manual_seed(1)) * 0.05
    spec = QuantSpec.int8(group)
    pw = quantize_rtn(w, spec)
    assert pw.qweight.dtype == torch.int8 and pw.qweight.shape == (256, 96)
    g = spec.group_size_for(256)
    err = _group_view((dequantize(pw) - w).abs(), g)                       # (N, groups, G)
    half_step = pw.scales.float().t().unsqueeze(-1) / 2                     # (N, groups, 1)
    assert (err <= half_step * 1.001 + 1e-8).all()
    assert int(pw.qweight.abs().max()) <= 127


@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("symmetric", [False, True])
def test_rtn_int4_error_bound(group, symmetric):
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(2)) * 0.05
    w[3] = 0.7  # a constant row: scale 0 path (asymmetric) must reproduce it
    pw = quantize_rtn(w, QuantSpec.int4(group, symmetric=symmetric))
    deq = dequantize(pw)
    err = _group_view((deq - w).abs(), group)
    half_step = pw.scales.float().t().unsqueeze(-1) / 2
    # fp16 rounding of the stored min adds at most one fp16 ulp of the min on top of half a step
    slack = pw.mins.float().abs().t().unsqueeze(-1) * 2**-10 + 1e-7
    assert (err <= half_step * 1.02 + slack).all()
    rel = (deq - w).norm() / w.norm()
    assert rel < {32: 0.08, 64: 0.09, 128: 0.11}[group] * (1.3 if symmetric else 1.0)
    if symmetric:
        assert torch.equal(pw.mins, (-8 * pw.scales.float()).half())


def test_rtn_rejects_overflowing_scales():
    with pytest.raises(ValueError, match="overflow"):
        quantize_rtn(torch.full((8, 32), 1e6) * torch.tensor([1.0, -1.0]).repeat(16), QuantSpec.int4(32))


# ------------------------------------------------------------------------------------------------------------
# GGUF blocks are represented exactly (bit for bit in fp32), checked against gguf-py's own dequantizer
# ------------------------------------------------------------------------------------------------------------

gguf = pytest.importorskip("gguf")


def _rand_fp16(rng: np.random.Generator, shape, scale: float) -> np.ndarray:
    return (rng.standard_normal(shape) * scale).astype(np.float16)


def _nibbles_from_qs(qs: np.ndarray) -> np.ndarray:
    """GGUF Q4 block qs (..., 16) uint8 -> codes (..., 32): element j in the low nibble of byte j,
    element j + 16 in the high nibble."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _assert_same_fp32(got: np.ndarray, want: np.ndarray) -> None:
    """Bit-for-bit equal, except that Q4_0's (8 - 8) * d may be -0.0 in ggml where q*d + (-8d) gives +0.0
    (equal values; no matmul can tell them apart)."""
    got, want = got.astype(np.float32), want.astype(np.float32)
    nonzero = want != 0
    assert np.array_equal(got[nonzero].view(np.uint32), want[nonzero].view(np.uint32))
    assert np.all(got[~nonzero] == 0)


def _rows_to_codes_and_params(codes_blocks: np.ndarray, n: int, k: int):
    # (N * K/32, 32) -> (N, K)
    return torch.from_numpy(codes_blocks.reshape(n, k).astype(np.int64))


def test_gguf_q4_0_exact():
    rng = np.random.default_rng(0)
    n, k = 16, 128
    nb = n * k // 32
    d = _rand_fp16(rng, (nb, 1), 0.01)
    qs = rng.integers(0, 256, (nb, 16), dtype=np.uint8)
    raw = np.concatenate([d.view(np.uint8), qs], axis=1)                    # ggml block_q4_0: d, qs[16]
    want = gguf.quants.dequantize(raw.reshape(n, -1), gguf.GGMLQuantizationType.Q4_0)  # (N, K) fp32
    # ggml's formula, independently: (q - 8) * d in fp32
    mine = ((_nibbles_from_qs(qs).astype(np.int32) - 8).astype(np.float32) * d.astype(np.float32)).reshape(n, k)
    assert np.array_equal(want.view(np.uint32), mine.view(np.uint32))
    codes = _rows_to_codes_and_params(_nibbles_from_qs(qs), n, k)
    dt = torch.from_numpy(d.reshape(n, k // 32).T.copy())                   # (K/32, N) fp16
    pw = make_int4(codes, scales=dt, mins=-8 * dt.float(), group_size=32, symmetric=True)
    _assert_same_fp32(pw.dequantize(torch.float32).numpy(), want)


def test_gguf_q4_1_exact():
    rng = np.random.default_rng(1)
    n, k = 16, 256
    nb = n * k // 32
    d = np.abs(_rand_fp16(rng, (nb, 1), 0.01))
    m = _rand_fp16(rng, (nb, 1), 0.05)
    qs = rng.integers(0, 256, (nb, 16), dtype=np.uint8)
    raw = np.concatenate([d.view(np.uint8), m.view(np.uint8), qs], axis=1)  # block_q4_1: d, m, qs[16]
    want = gguf.quants.dequantize(raw.reshape(n, -1), gguf.GGMLQuantizationType.Q4_1)
    codes = _rows_to_codes_and_params(_nibbles_from_qs(qs), n, k)
    dt = torch.from_numpy(d.reshape(n, k // 32).T.copy())
    mt = torch.from_numpy(m.reshape(n, k // 32).T.copy())
    pw = make_int4(codes, scales=dt, mins=mt, group_size=32)
    _assert_same_fp32(pw.dequantize(torch.float32).numpy(), want)


def test_gguf_q8_0_exact():
    rng = np.random.default_rng(2)
    n, k = 8, 96
    nb = n * k // 32
    d = _rand_fp16(rng, (nb, 1), 0.01)
    qs = rng.integers(-128, 128, (nb, 32), dtype=np.int8)
    raw = np.concatenate([d.view(np.uint8), qs.view(np.uint8)], axis=1)     # block_q8_0: d, qs[32]
    want = gguf.quants.dequantize(raw.reshape(n, -1), gguf.GGMLQuantizationType.Q8_0)
    codes = torch.from_numpy(qs.reshape(n, k).astype(np.int64))
    dt = torch.from_numpy(d.reshape(n, k // 32).T.copy())
    pw = make_int8(codes, dt, group_size=32)
    _assert_same_fp32(pw.dequantize(torch.float32).numpy(), want)


# ------------------------------------------------------------------------------------------------------------
# QuantLinear
# ------------------------------------------------------------------------------------------------------------

SPECS = [QuantSpec.int4(32), QuantSpec.int4(64), QuantSpec.int4(128, symmetric=True), QuantSpec.int8(),
         QuantSpec.int8(32)]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quant_linear_matches_dequantized_matmul(spec, dtype):
    torch.manual_seed(0)
    lin = nn.Linear(256, 64, bias=True)
    q = QuantLinear.from_linear(lin, spec)
    x = torch.randn(2, 3, 256).to(dtype)                                    # (..., K)
    y = q(x)
    assert y.shape == (2, 3, 64) and y.dtype == dtype
    w = q.dequantize()                                                      # (N, K) fp32
    assert w.shape == (64, 256)
    ref = x.double() @ w.to(dtype).double().t() + lin.bias.to(dtype).double()
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert ((y.double() - ref).norm() / ref.norm()) < tol
    # and it approximates the original layer
    assert ((q(x.float()) - lin(x.float())).norm() / lin(x.float()).norm()) < 0.15


def test_quant_linear_state_dict_roundtrip_and_to():
    torch.manual_seed(0)
    src = QuantLinear.from_linear(nn.Linear(128, 32, bias=True), QuantSpec.int4(64))
    sd = src.state_dict()
    assert set(sd) == {"qweight", "scales", "mins", "bias"}
    dst = QuantLinear(128, 32, QuantSpec.int4(64), bias=True, bias_dtype=torch.float32)
    dst.load_state_dict(sd)
    x = torch.randn(5, 128)
    assert torch.equal(src(x), dst(x))
    moved = dst.to("cpu")
    assert moved.qweight.device.type == "cpu" and moved.qweight.dtype == torch.int32
    q8 = QuantLinear.from_linear(nn.Linear(64, 16, bias=False), QuantSpec.int8())
    assert set(q8.state_dict()) == {"qweight", "scales"}
    assert "spec=w8" in repr(q8)


def test_quant_linear_rejects_wrong_input_width():
    q = QuantLinear.from_linear(nn.Linear(64, 16), QuantSpec.int8())
    with pytest.raises(ValueError, match="64"):
        q(torch.randn(2, 32))


def test_from_packed_rejects_bad_bias():
    pw = quantize_rtn(torch.randn(16, 64), QuantSpec.int4(32))
    with pytest.raises(ValueError, match="bias"):
        QuantLinear.from_packed(pw, bias=torch.zeros(15))


# ------------------------------------------------------------------------------------------------------------
# quantize_model
# ------------------------------------------------------------------------------------------------------------


class _Block(nn.Module):
    def __init__(self, d: int = 64, hidden: int = 128) -> None:
        super().__init__()
        self.q_proj = nn.Linear(d, d, bias=True)
        self.o_proj = nn.Linear(d, d, bias=False)
        self.mlp = nn.Sequential(nn.Linear(d, hidden, bias=False), nn.SiLU(), nn.Linear(hidden, d, bias=False))

    def forward(self, x):
        x = x + self.o_proj(torch.tanh(self.q_proj(x)))
        return x + self.mlp(x)


def test_quantize_model_mixed_specs():
    torch.manual_seed(0)
    model = nn.Sequential(_Block(), _Block(), nn.Linear(64, 40))
    x = torch.randn(4, 64)
    ref = model(x)
    seen = []

    def spec_for(name: str, lin: nn.Linear):
        seen.append(name)
        if name == "2":
            return None                       # e.g. the lm_head stays in full precision
        return QuantSpec.int4(32) if ".mlp." in name else QuantSpec.int8()

    out = quantize_model(model, spec_for, progress=True)
    assert out is model
    assert seen == ["0.q_proj", "0.o_proj", "0.mlp.0", "0.mlp.2", "1.q_proj", "1.o_proj", "1.mlp.0", "1.mlp.2", "2"]
    assert isinstance(model[0].q_proj, QuantLinear) and model[0].q_proj.spec.bits == 8
    assert isinstance(model[1].mlp[2], QuantLinear) and model[1].mlp[2].spec == QuantSpec.int4(32)
    assert type(model[2]) is nn.Linear
    assert model[0].q_proj.bias is not None
    y = model(x)
    assert ((y - ref).norm() / ref.norm()) < 0.05
    n_fp = sum(1 for m in model.modules() if type(m) is nn.Linear)
    assert n_fp == 1


def test_quantize_model_validates_before_replacing():
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(96, 64))  # 96 is not divisible by 64
    with pytest.raises(ValueError, match=r"group_size=64.*in_features=96"):
        quantize_model(model, lambda n, lin: QuantSpec.int4(64))
    assert all(type(m) is nn.Linear for m in model)  # nothing half-done
    with pytest.raises(TypeError, match="QuantSpec"):
        quantize_model(model, lambda n, lin: 4)
