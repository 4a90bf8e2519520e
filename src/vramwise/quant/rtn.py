"""Round-to-nearest (RTN) quantization: no calibration data, one pass over the weight.

int8 (symmetric):   scale = absmax / 127 per (group, out); q = clamp(round(w / scale), -127, 127)
int4 asymmetric:    scale = (max - min) / 15, min = group minimum; q = clamp(round((w - min) / scale), 0, 15)
int4 symmetric:     scale = absmax / 7.5;    q = clamp(round(w / scale) + 8, 0, 15); min = -8 * scale

Scales and mins are rounded to fp16 *before* the codes are computed, so the codes are the best ones for the
scales actually stored. Error bound (tested): |w - dequant(w)| <= scale / 2 per element, up to fp16 rounding
of the stored min.
"""

from __future__ import annotations

import torch

from .formats import SCALE_DTYPE, PackedWeight, QuantSpec, dequantize_int4, dequantize_int8, pack_int4

__all__ = ["quantize_rtn", "dequantize"]


def _to_fp16_checked(t: torch.Tensor, what: str) -> torch.Tensor:
    out = t.to(SCALE_DTYPE)
    if not torch.isfinite(out).all():
        raise ValueError(f"{what} overflow float16 (weights too large for the fp16 {what} of this format)")
    return out


@torch.no_grad()
def quantize_rtn(weight: torch.Tensor, spec: QuantSpec) -> PackedWeight:
    """Quantize a (N, K) float weight with round-to-nearest. Works on any device; math in fp32."""
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise ValueError(f"weight must be floating point, got {weight.dtype}")
    n, k = weight.shape
    spec.check_shape(n, k)
    g = spec.group_size_for(k)
    w = weight.detach().float().reshape(n, k // g, g)  # (N, groups, G)

    if spec.bits == 8:
        absmax = w.abs().amax(dim=-1)  # (N, groups)
        scale = _to_fp16_checked(absmax / 127.0, "scales")
        s32 = scale.float()
        s32 = torch.where(s32 == 0, torch.ones_like(s32), s32)  # all-zero group: any scale gives q = 0
        q = torch.clamp(torch.round(w / s32.unsqueeze(-1)), -127, 127).to(torch.int8).reshape(n, k)
        # int8 layout is (K, N): output channels contiguous
        return PackedWeight(q.t().contiguous(), scale.t().contiguous(), None, spec, in_features=k, out_features=n)

    # 4-bit: codes in [0, 15], w ~= q * scale + min
    if spec.symmetric:
        absmax = w.abs().amax(dim=-1)
        scale = _to_fp16_checked(absmax / 7.5, "scales")
        mins = (-8.0 * scale.float()).to(SCALE_DTYPE)  # exact: power-of-two multiple of an fp16 (tiny range aside)
        mins = _to_fp16_checked(mins, "mins")
    else:
        wmin = w.amin(dim=-1)
        wmax = w.amax(dim=-1)
        scale = _to_fp16_checked((wmax - wmin) / 15.0, "scales")
        mins = _to_fp16_checked(wmin, "mins")
    s32 = scale.float()
    s32 = torch.where(s32 == 0, torch.ones_like(s32), s32)  # constant group: q = 0, w = min
    q = torch.round((w - mins.float().unsqueeze(-1)) / s32.unsqueeze(-1))
    q = torch.clamp(q, 0, 15).to(torch.uint8).reshape(n, k)
    return PackedWeight(pack_int4(q), scale.t().contiguous(), mins.t().contiguous(), spec, in_features=k, out_features=n)


def dequantize(packed: PackedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(N, K) weight in `dtype` (computed in fp32, then cast)."""
    if packed.spec.bits == 4:
        w = dequantize_int4(packed.qweight, packed.scales, packed.mins, packed.group_size)
    else:
        w = dequantize_int8(packed.qweight, packed.scales, packed.group_size)
    return w.to(dtype)
