"""CpuPackedLinear (quant/cpu_packed.py): torch's packed CPU kernels computing our int4/int8 formats.

Tolerances come from bf16 (8 significant bits, unit roundoff u = 2^-8): the kernels take the scales, zeros
and activations in bf16 and return bf16. Where the test can bound the error element by element it does so
from the formula; for whole matmuls it compares the relative Frobenius error with a few u."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vramwise.kernels.w4a16 import w4a16_reference
from vramwise.kernels.w8a16 import w8a16_reference
from vramwise.quant.cpu_packed import INT4, INT8, INT8_DEQUANTIZED, CpuPackedLinear
from vramwise.quant.formats import QuantSpec, make_int4, unpack_int4
from vramwise.quant.linear import QuantLinear
from vramwise.quant.rtn import quantize_rtn

U = 2.0**-8  # bf16 unit roundoff (round to nearest, 8 significant bits)


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.float() - ref.float()).norm() / ref.float().norm())


def test_int4_kernel_formula_is_q_minus_8_times_scale_plus_zero():
    """Pins what the mapping relies on: torch's CPU int4 kernel computes (q - 8) * scale + zero with
    scales_and_zeros (K // G, N, 2) = [scale, zero]. Small integers: every value is exact in bf16."""
    n, k, g = 16, 64, 32
    codes = torch.randint(0, 16, (n, k), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    scale = torch.randint(1, 4, (k // g, n)).float()
    zero = torch.randint(-5, 6, (k // g, n)).float()
    sz = torch.stack([scale, zero], -1).to(torch.bfloat16)
    w = torch.ops.aten._weight_int4pack_mm_for_cpu(torch.eye(k, dtype=torch.bfloat16), packed, g, sz).t()
    expect = (codes.float() - 8) * scale.t().repeat_interleave(g, 1) + zero.t().repeat_interleave(g, 1)
    assert torch.equal(w.float(), expect)


@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("n, k", [(16, 128), (24, 256), (64, 384)])  # n = 24: padded to 32 for the packer
def test_int4_weight_matches_reference_within_bf16_rounding(group_size, n, k):
    if k % group_size:
        pytest.skip("group size does not divide K")
    torch.manual_seed(n + k + group_size)
    pw = quantize_rtn(torch.randn(n, k) * 0.05 + 0.01, QuantSpec.int4(group_size))
    mod = CpuPackedLinear.from_packed(pw)
    assert mod.kind == INT4 and mod.weight.dtype == torch.uint8
    got = mod.dequantize()  # (N, K) as the kernel computes with it
    ref = pw.dequantize(torch.float32)  # q * s + m in fp32
    # Per element: scale and zero = m + 8 s rounded to bf16 (|q - 8| |s| u + |m + 8 s| u), then the output
    # rounded to bf16 (u |w|); a 1 % margin for the second-order terms.
    q = unpack_int4(pw.qweight).float()
    s = pw.scales.float().t().repeat_interleave(group_size, 1)
    z = pw.mins.float().t().repeat_interleave(group_size, 1) + 8 * s
    bound = 1.01 * U * ((q - 8).abs() * s.abs() + z.abs() + ref.abs()) + 1e-12
    assert ((got - ref).abs() <= bound).all()
    assert (got != ref).any()  # the bound is doing work: bf16 is not exact here


@pytest.mark.parametrize("group_size", [32, 128])
def test_int4_forward_matches_w4a16_reference(group_size):
    torch.manual_seed(group_size)
    n, k = 48, 256
    pw = quantize_rtn(torch.randn(n, k) * 0.05, QuantSpec.int4(group_size))
    bias = torch.randn(n, dtype=torch.float16)
    mod = CpuPackedLinear.from_packed(pw, bias)
    x = torch.randn(2, 3, k)  # leading dims kept
    y = mod(x)
    ref = w4a16_reference(x, pw.qweight, pw.scales, pw.mins, group_size, bias)
    assert y.shape == (2, 3, n) and y.dtype == torch.float32
    # x, scale, zero and the output each carry <= u relative error: a few u overall (measured ~2e-3).
    assert rel_err(y, ref) < 4 * U
    for dtype in (torch.float16, torch.bfloat16):  # output in the input's dtype
        yd = mod(x.to(dtype))
        assert yd.dtype == dtype and rel_err(yd, ref) < 4 * U


def test_int4_symmetric_and_asymmetric_gguf_style_groups():
    """Q4_0-style (mins = -8 d) and Q4_1-style (free min) groups both map: zero = m + 8 s is 0 for Q4_0."""
    torch.manual_seed(3)
    n, k = 32, 64
    codes = torch.randint(0, 16, (n, k))
    d = torch.rand(k // 32, n) * 0.1 + 0.01
    for mins in (-8 * d, torch.randn(k // 32, n) * 0.1):
        pw = make_int4(codes, d, mins, 32)
        mod = CpuPackedLinear.from_packed(pw)
        assert rel_err(mod.dequantize(), pw.dequantize()) < 2 * U
    q0 = CpuPackedLinear.from_packed(make_int4(codes, d, -8 * d, 32))
    assert torch.equal(q0.scales_zeros[..., 1], torch.zeros_like(q0.scales_zeros[..., 1]))


@pytest.mark.parametrize("n, k", [(16, 64), (40, 256)])
def test_int8_per_channel_uses_int8_kernel(n, k):
    torch.manual_seed(n)
    pw = quantize_rtn(torch.randn(n, k) * 0.05, QuantSpec.int8())
    mod = CpuPackedLinear.from_packed(pw)
    assert mod.kind == INT8 and mod.weight.dtype == torch.int8 and mod.weight.shape == (n, k)
    ref_w = pw.dequantize()
    # scale rounded to bf16 (u |w|) and the output rounded (u |w|): 2u |w| per element, plus margin.
    assert ((mod.dequantize() - ref_w).abs() <= 2.02 * U * ref_w.abs() + 1e-12).all()
    x = torch.randn(5, k)
    assert rel_err(mod(x), w8a16_reference(x, pw.qweight, pw.scales, k)) < 4 * U


def test_int8_groupwise_is_dequantized_to_bf16():
    """GGUF Q8_0 (G = 32) has no torch kernel: the weight is held dequantized in bf16 (2 bytes a weight)."""
    torch.manual_seed(1)
    n, k = 24, 128
    pw = quantize_rtn(torch.randn(n, k) * 0.05, QuantSpec.int8(32))
    mod = CpuPackedLinear.from_packed(pw, torch.randn(n))
    assert mod.kind == INT8_DEQUANTIZED and mod.weight.dtype == torch.bfloat16
    assert torch.equal(mod.weight, pw.dequantize().to(torch.bfloat16))
    x = torch.randn(3, k)
    assert rel_err(mod(x), w8a16_reference(x, pw.qweight, pw.scales, 32, mod.bias)) < 4 * U


def test_from_quant_linear_and_bytes():
    torch.manual_seed(2)
    lin = nn.Linear(256, 64, bias=True)
    q4 = QuantLinear.from_linear(lin, QuantSpec.int4(128))
    q8 = QuantLinear.from_linear(lin, QuantSpec.int8())
    m4, m8 = CpuPackedLinear.from_module(q4), CpuPackedLinear.from_module(q8)
    fp32 = lin.weight.numel() * 4
    # int4: codes K/2 bytes per row plus [scale, zero] bf16 per group; int8: K bytes per row plus a scale.
    assert m4.nbytes() - 64 * 4 == q4.packed().nbytes() and m4.nbytes() < fp32 / 7
    assert m8.nbytes() - 64 * 4 == 64 * 256 + 64 * 2 and m8.nbytes() < fp32 / 3.9
    x = torch.randn(7, 256)
    assert rel_err(m4(x), q4(x)) < 4 * U and rel_err(m8(x), q8(x)) < 4 * U
    assert {name for name, _ in m4.named_buffers()} == {"weight", "scales_zeros", "bias"}  # movable from outside


def test_bad_input_is_named():
    pw = quantize_rtn(torch.randn(16, 64), QuantSpec.int4(32))
    mod = CpuPackedLinear.from_packed(pw)
    with pytest.raises(ValueError, match="expected input with last dimension 64"):
        mod(torch.randn(2, 32))
    with pytest.raises(ValueError, match=r"bias must have shape \(16,\)"):
        CpuPackedLinear.from_packed(pw, torch.zeros(8))
    with pytest.raises(TypeError, match="Linear holds no packed weight"):
        CpuPackedLinear.from_module(nn.Linear(64, 16))
    with pytest.raises(ValueError, match="unknown CpuPackedLinear kind 'int3'"):
        CpuPackedLinear("int3", 64, 16, 32)
    pw.scales = pw.scales[:1]  # a malformed packed weight is refused by its own validation
    with pytest.raises(ValueError, match="scales"):
        CpuPackedLinear.from_packed(pw)
