"""CpuPackedLinear: a packed int4/int8 linear that computes on the CPU with torch's packed-weight kernels.

The offload driver (memory/offload.py) runs some decoder layers on the CPU. Dequantizing their weights to
fp32 costs 8x the host memory of int4 and 8x the bytes a decode step reads; torch has CPU kernels that read
the packed weights directly (bf16 activations):

    int4, group-wise     aten._weight_int4pack_mm_for_cpu(x (M, K) bf16, w, G, scales_and_zeros)
                         with w = aten._convert_weight_to_int4pack_for_cpu(codes (N, K) int32, 1) -> uint8
                         (N, K // 2), an opaque layout of its own; N must be a multiple of 16, G one of
                         32 / 64 / 128 / 256.
    int8, per channel    aten._weight_int8pack_mm(x (M, K) bf16, w (N, K) int8, scales (N,) bf16)
    int8, group-wise     (GGUF Q8_0, G = 32) no torch kernel: dequantized once to bf16, computed by F.linear
                         (2 bytes per weight instead of ~1.06: still half of fp32).

The int4 kernel's dequant formula, found by probing it (tests/test_cpu_packed.py pins it): with
scales_and_zeros (K // G, N, 2) in x's dtype holding [scale, zero] per (group, output channel),

    w[n, k] = (q[n, k] - 8) * scale[k // G, n] + zero[k // G, n]      (q the unsigned code in [0, 15])

Ours (quant/formats.py) is w = q * s + m, so scale = s and zero = m + 8 s. How exact the mapping is: s and
m are fp16; 8 s is exact, m + 8 s is formed in fp32 (exact unless the exponents of m and 8 s differ by more
than 13, then off by < 2^-24 relative), and both are rounded to bf16 (8 significant bits: relative error
<= 2^-8 each), because the kernel takes them in the activations' dtype. So each dequantized weight is off by
at most |q - 8| |s| 2^-8 + |m + 8 s| 2^-8 against our fp32 reference, before the bf16 rounding of x and of
the output (2^-8 relative each). The int8 scales lose the same way (fp16 -> bf16, 2^-8 relative per output
channel). bf16 is the kernels' fast path: the same kernels take fp32 activations (and fp32 scales), but ran
10-44x slower than with bf16 ones on a 2-core AVX2 host (torch 2.13, 4096 x 4096, M = 1 and 16), slower than
a float32 GEMM.

State lives in registered buffers so that the offload code can move it from outside (memory/placement.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .formats import PackedWeight, unpack_int4

__all__ = ["CpuPackedLinear", "COMPUTE_DTYPE", "INT4_N_MULTIPLE", "KINDS"]

#: Activation / scale dtype of the packed CPU kernels (their fast path).
COMPUTE_DTYPE = torch.bfloat16
#: The int4 packer wants N a multiple of this; other N are zero-padded (the padded outputs are dropped).
INT4_N_MULTIPLE = 16
#: Group sizes the int4 CPU kernel accepts.
INT4_CPU_GROUP_SIZES = (32, 64, 128, 256)
#: Offset of the int4 kernel's codes: it computes (q - 8) * scale + zero.
_INT4_CODE_OFFSET = 8

INT4, INT8, INT8_DEQUANTIZED = "int4", "int8", "int8-dequantized"
KINDS = (INT4, INT8, INT8_DEQUANTIZED)


class CpuPackedLinear(nn.Module):
    """y = x @ W.T + bias on the CPU, W held packed for torch's CPU kernels (module doc).

    Build it with from_packed(packed_weight, bias) or from_module(quant_linear). Buffers, by `kind`:
        int4              weight uint8 (N', K // 2) torch's packed layout, N' = N rounded up to 16;
                          scales_zeros bf16 (K // G, N', 2): [scale, zero] per (group, output channel)
        int8              weight int8 (N, K); scales bf16 (N,)
        int8-dequantized  weight bf16 (N, K)  (group-wise int8: no torch kernel)
        bias              float32 (N,), or absent (added in the output dtype)
    forward: x (..., K) in any float dtype -> (..., N) in x's dtype; computed with x cast to bf16.
    """

    def __init__(self, kind: str, in_features: int, out_features: int, group_size: int) -> None:
        """An empty shell: from_packed() registers the buffers of `kind`."""
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"unknown CpuPackedLinear kind {kind!r}; choose from {', '.join(KINDS)}")
        self.kind = kind
        self.in_features = in_features
        self.out_features = out_features
        self.group_size = group_size

    # -- construction ---------------------------------------------------------------------------------------

    @classmethod
    @torch.no_grad()
    def from_packed(cls, packed: PackedWeight, bias: torch.Tensor | None = None) -> CpuPackedLinear:
        """Convert one of our packed weights (quant/formats.py) for the CPU kernels. The result lives on the
        CPU whatever device `packed` is on. Raises ValueError naming what the CPU kernels cannot take."""
        packed.validate()
        n, k, g, bits = packed.out_features, packed.in_features, packed.group_size, packed.spec.bits
        if bias is not None and tuple(bias.shape) != (n,):
            raise ValueError(f"bias must have shape ({n},), got {tuple(bias.shape)}")
        host = torch.device("cpu")
        if bits == 4:
            if g not in INT4_CPU_GROUP_SIZES:
                raise ValueError(f"the int4 CPU kernel takes group sizes {INT4_CPU_GROUP_SIZES}, got {g} "
                                 f"(weight {n}x{k})")
            mod = cls(INT4, k, n, g)
            codes = unpack_int4(packed.qweight.to(host)).to(torch.int32)  # (N, K) in [0, 15]
            scales = packed.scales.to(host, torch.float32)  # (K // G, N)
            zeros = packed.mins.to(host, torch.float32) + _INT4_CODE_OFFSET * scales  # type: ignore[union-attr]
            pad = -n % INT4_N_MULTIPLE
            if pad:
                # Padded rows: code 8 with scale 0 and zero 0 -> weight 0; their outputs are sliced off.
                codes = F.pad(codes, (0, 0, 0, pad), value=_INT4_CODE_OFFSET)
                scales, zeros = F.pad(scales, (0, pad)), F.pad(zeros, (0, pad))
            weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.contiguous(), 1)  # (N', K // 2)
            mod.register_buffer("weight", weight)
            mod.register_buffer("scales_zeros", torch.stack([scales, zeros], dim=-1).to(COMPUTE_DTYPE).contiguous())
        elif g == k:  # int8 per output channel: scales (1, N)
            mod = cls(INT8, k, n, g)
            mod.register_buffer("weight", packed.qweight.to(host).t().contiguous())  # (K, N) -> (N, K)
            mod.register_buffer("scales", packed.scales.to(host)[0].to(COMPUTE_DTYPE).contiguous())  # (N,)
        else:  # int8 group-wise (GGUF Q8_0): no torch kernel, dequantized (fp32 math, then bf16)
            mod = cls(INT8_DEQUANTIZED, k, n, g)
            mod.register_buffer("weight", packed.to(host).dequantize(torch.float32).to(COMPUTE_DTYPE))  # (N, K)
        if bias is not None:
            mod.register_buffer("bias", bias.detach().to(host, torch.float32).contiguous())
        else:
            mod.bias = None
        return mod

    @classmethod
    def from_module(cls, module: nn.Module) -> CpuPackedLinear:
        """From a packed linear: QuantLinear, or anything whose packed() returns its PackedWeight."""
        get = getattr(module, "packed", None)
        if not callable(get):
            raise TypeError(f"{type(module).__name__} holds no packed weight (it has no packed() method)")
        return cls.from_packed(get(), getattr(module, "bias", None))

    # -- use ------------------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., K) -> (..., N) in x.dtype."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected input with last dimension {self.in_features}, got shape {tuple(x.shape)}")
        if x.device.type != "cpu":
            raise ValueError(f"CpuPackedLinear computes on the CPU; got an input on {x.device}")
        x2 = x.reshape(-1, self.in_features).to(COMPUTE_DTYPE).contiguous()  # (M, K): the kernels want it 2-D
        y = self._matmul(x2).to(x.dtype)  # (M, N)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def _matmul(self, x2: torch.Tensor) -> torch.Tensor:
        """x2 (M, K) bf16, contiguous -> (M, N) bf16, no bias."""
        if self.kind == INT4:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.weight, self.group_size, self.scales_zeros)
            return y[:, : self.out_features] if y.shape[1] != self.out_features else y  # drop padding (N' -> N)
        if self.kind == INT8:
            return torch.ops.aten._weight_int8pack_mm(x2, self.weight, self.scales)
        return F.linear(x2, self.weight)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The (N, K) weight the kernel computes with, read back through an identity input (for tests and
        checks: it carries the bf16 rounding of the kernel's output, 2^-8 relative)."""
        return self._matmul(torch.eye(self.in_features, dtype=COMPUTE_DTYPE)).t().to(dtype)

    def nbytes(self) -> int:
        """Host bytes of the module's buffers (weight, scales, bias)."""
        return sum(t.numel() * t.element_size() for t in self.buffers())

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"kind={self.kind}, group_size={self.group_size}")
