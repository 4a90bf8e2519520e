"""QuantLinear: a drop-in replacement for nn.Linear holding packed int4/int8 weights.

The packed tensors are registered buffers, so `.to(device)`, `state_dict()` and `load_state_dict()` work as
for any module (an empty QuantLinear built with the right shapes can load a saved quantized state dict).
forward() runs the fused Triton kernels on CUDA and the torch reference elsewhere; nothing dequantized is
kept between calls.
"""

from __future__ import annotations

import torch
from torch import nn

# Module imports (not names): kernels import quant.formats, so names may not exist yet at this point.
from ..kernels import fused as _fused
from ..kernels import w4a16 as _w4a16
from ..kernels import w8a16 as _w8a16
from .formats import INT4_PER_WORD, INT4_TILE_N, SCALE_DTYPE, PackedWeight, QuantSpec
from .rtn import quantize_rtn

__all__ = ["QuantLinear"]


class QuantLinear(nn.Module):
    """y = x @ dequant(W).T + bias, W stored as in vramwise.quant.formats.

    Buffers: qweight (int32 (N/8, K/8, 8) for 4-bit, int8 (K, N) for 8-bit), scales fp16 (K/G, N),
    mins fp16 (K/G, N) for 4-bit only, bias (N,) in its original dtype (or absent).
    """

    def __init__(self, in_features: int, out_features: int, spec: QuantSpec, bias: bool = False,
                 device: torch.device | str | None = None, bias_dtype: torch.dtype = torch.float16) -> None:
        super().__init__()
        spec.check_shape(out_features, in_features)
        self.in_features = in_features
        self.out_features = out_features
        self.spec = spec
        self.group_size = spec.group_size_for(in_features)
        n, k, groups = out_features, in_features, in_features // self.group_size
        if spec.bits == 4:
            qshape, qdtype = (n // INT4_TILE_N, k // INT4_PER_WORD, INT4_TILE_N), torch.int32
        else:
            qshape, qdtype = (k, n), torch.int8
        self.register_buffer("qweight", torch.zeros(qshape, dtype=qdtype, device=device))
        self.register_buffer("scales", torch.zeros(groups, n, dtype=SCALE_DTYPE, device=device))
        if spec.bits == 4:
            self.register_buffer("mins", torch.zeros(groups, n, dtype=SCALE_DTYPE, device=device))
        else:
            self.mins = None
        if bias:
            self.register_buffer("bias", torch.zeros(n, dtype=bias_dtype, device=device))
        else:
            self.bias = None

    # -- constructors -------------------------------------------------------------------------------------

    @classmethod
    def from_packed(cls, packed: PackedWeight, bias: torch.Tensor | None = None) -> "QuantLinear":
        """Wrap already-packed tensors (from RTN, or a GGUF/GPTQ/AWQ importer). Tensors are used as given
        (no copy), so the module lives on their device."""
        packed.validate()
        device = packed.qweight.device
        mod = cls.__new__(cls)
        nn.Module.__init__(mod)
        mod.in_features, mod.out_features, mod.spec = packed.in_features, packed.out_features, packed.spec
        mod.group_size = packed.group_size
        mod.register_buffer("qweight", packed.qweight)
        mod.register_buffer("scales", packed.scales)
        if packed.mins is not None:
            mod.register_buffer("mins", packed.mins)
        else:
            mod.mins = None
        if bias is not None:
            if tuple(bias.shape) != (packed.out_features,):
                raise ValueError(f"bias must have shape ({packed.out_features},), got {tuple(bias.shape)}")
            mod.register_buffer("bias", bias.detach().to(device))
        else:
            mod.bias = None
        return mod

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, spec: QuantSpec) -> "QuantLinear":
        """Quantize an nn.Linear with round-to-nearest (on the linear's device)."""
        packed = quantize_rtn(linear.weight.detach(), spec)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls.from_packed(packed, bias)

    # -- use ----------------------------------------------------------------------------------------------

    def _check_input(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected input with last dimension {self.in_features}, got shape {tuple(x.shape)}")

    def packed(self) -> PackedWeight:
        return PackedWeight(self.qweight, self.scales, self.mins, self.spec, self.in_features, self.out_features)

    #: kernels/dequant_pipeline.DequantPipeline routing this linear's long prefills (set by the engine), or None
    dequant_pipeline = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in_features) in fp32/fp16/bf16 -> (..., out_features) in x.dtype."""
        self._check_input(x)
        if self.spec.bits == 4:
            pipe = self.dequant_pipeline
            if pipe is not None:
                x2 = x.reshape(-1, self.in_features)
                if pipe.usable(x2):
                    y = pipe.matmul(self, x2.contiguous())  # (M, N): dequantize overlapped with the GEMMs
                    if self.bias is not None:
                        y += self.bias.to(y.dtype)
                    return y.reshape(*x.shape[:-1], self.out_features)
                pipe.note(self)  # the call order, for the next long prefill's prefetches
            return _w4a16.w4a16_matmul(x, self.qweight, self.scales, self.mins, self.group_size, self.bias)
        return _w8a16.w8a16_matmul(x, self.qweight, self.scales, self.group_size, self.bias)

    def forward_add(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """self(x) + residual (a residual connection after this projection). 4-bit weights at decode sizes on
        the GPU: one kernel, the add in the GEMV's epilogue (kernels/w4a16.w4a16_matmul_add; same bits as the
        unfused add). Elsewhere self(x) + residual. Runs no forward hooks of this module on the fused path:
        callers go through models/layers.linear_add, which takes it only when there are none."""
        if self.spec.bits == 4 and type(self).forward is QuantLinear.forward and not self._pipelined(x):
            self._check_input(x)
            if self.dequant_pipeline is not None:
                self.dequant_pipeline.note(self)
            return _w4a16.w4a16_matmul_add(x, self.qweight, self.scales, self.mins, self.group_size, self.bias,
                                           residual)
        return self(x) + residual

    def forward_silu_mul(self, x: torch.Tensor) -> torch.Tensor:
        """SwiGLU of this fused gate+up projection: y = self(x) (..., 2I) = [gate | up] -> silu(gate) * up
        (..., I). 4-bit weights at decode sizes on the GPU: one kernel (w4a16_matmul_silu_mul); elsewhere
        kernels.fused.silu_and_mul(self(x)). Hooks: as forward_add."""
        if self.out_features % 2:
            raise ValueError(f"SwiGLU needs an even number of output features ([gate | up]), got {self.out_features}")
        if (self.spec.bits == 4 and type(self).forward is QuantLinear.forward and _w4a16.SWIGLU_EPILOGUE
                and not self._pipelined(x)):
            self._check_input(x)
            if self.dequant_pipeline is not None:
                self.dequant_pipeline.note(self)
            return _w4a16.w4a16_matmul_silu_mul(x, self.qweight, self.scales, self.mins, self.group_size, self.bias)
        return _fused.silu_and_mul(self(x))

    def _pipelined(self, x: torch.Tensor) -> bool:
        """Whether forward(x) goes through the dequantize pipeline (a long prefill): the fused add / SwiGLU
        entry points then call forward, so that their matmul is one of the pipeline's too."""
        pipe = self.dequant_pipeline
        return pipe is not None and pipe.usable(x.reshape(-1, self.in_features))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The (out_features, in_features) weight this module computes with (fp32 math, then `dtype`)."""
        return self.packed().dequantize(dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"spec={self.spec.name}")
