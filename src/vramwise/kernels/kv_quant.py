"""int8 KV cache: symmetric per-(token, kv head) quantization, one fp16 scale per row of head_dim values.

Pages: k_cache / v_cache (num_blocks, block_size, Hkv, D) int8; scales beside them: k_scale / v_scale
(num_blocks, block_size, Hkv) fp16. A cached value is x ~= q * scale with q in [-127, 127] and
scale = max|x| / 127 over that token's head. One scale per (token, head) rather than per block keeps a
write to one slot independent of the other tokens of its page (decode writes one token at a time), and at
head_dim 128 costs 2 bytes per 128 (1.6%). fp16 scales are what memory/budget.py's KV term counts.
"""

from __future__ import annotations

import torch

KV_SCALE_DTYPE = torch.float16
#: KV cache dtypes that are stored quantized, with scale pools beside the pages.
QUANTIZED_KV_DTYPES: tuple[torch.dtype, ...] = (torch.int8,)
_QMAX = 127.0
# Smallest scale stored: fp16's smallest normal number, so a scale never underflows to 0 (an all-zero row
# quantizes to zeros whatever its scale).
_MIN_SCALE = 2.0**-14


#: --kv-cache-dtype names -> torch dtype ("auto": the model's compute dtype).
_KV_CACHE_DTYPES = {"fp16": torch.float16, "float16": torch.float16, "bf16": torch.bfloat16,
                    "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32, "int8": torch.int8}
KV_CACHE_DTYPE_CHOICES = ("auto", "fp16", "bf16", "fp32", "int8")


def resolve_kv_cache_dtype(name: str, model_dtype: torch.dtype) -> torch.dtype:
    """The KV pages' dtype for --kv-cache-dtype `name` (auto | fp16 | bf16 | fp32 | int8)."""
    key = name.lower()
    if key == "auto":
        return model_dtype
    if key in ("fp8", "fp8_e4m3", "float8"):
        raise ValueError("--kv-cache-dtype fp8 is not implemented yet; use int8 (same size, per-token scales)")
    if key not in _KV_CACHE_DTYPES:
        raise ValueError(f"unknown --kv-cache-dtype {name!r}; choose one of {', '.join(KV_CACHE_DTYPE_CHOICES)}")
    return _KV_CACHE_DTYPES[key]


def quantize_kv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (T, H, D) float -> (int8 (T, H, D), fp16 scale (T, H)).

    The quantization divides by the scale as stored (rounded to fp16), so dequantization with the stored
    scale reproduces x to within half a step (scale / 2) per element."""
    xf = x.float()
    scale = (xf.abs().amax(dim=-1) / _QMAX).clamp_min(_MIN_SCALE).to(KV_SCALE_DTYPE)  # (T, H)
    q = torch.round(xf / scale.float()[..., None]).clamp_(-_QMAX, _QMAX).to(torch.int8)
    return q, scale


def dequantize_kv(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """int8 (..., D) and scale (...) -> (..., D) in dtype."""
    return (q.float() * scale.float()[..., None]).to(dtype)


def write_kv_quantized(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k_scale: torch.Tensor,
    v_scale: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Quantize new K/V (T, Hkv, D) and scatter them and their scales into the int8 pages at slot_mapping (T,)."""
    nb, bs, h, d = k_cache.shape
    for x, cache, scale in ((k, k_cache, k_scale), (v, v_cache, v_scale)):
        qx, sx = quantize_kv(x)
        cache.view(nb * bs, h, d).index_copy_(0, slot_mapping, qx)
        scale.view(nb * bs, h).index_copy_(0, slot_mapping, sx)


def check_kv_scales(
    k_cache: torch.Tensor, k_scale: torch.Tensor | None, v_scale: torch.Tensor | None
) -> bool:
    """True when the caches are quantized (and their scales fit them); raises on a missing or misshapen scale."""
    if k_cache.dtype not in QUANTIZED_KV_DTYPES:
        return False
    if k_scale is None or v_scale is None:
        raise ValueError(f"a {k_cache.dtype} KV cache needs k_scale and v_scale (num_blocks, block_size, Hkv)")
    want = tuple(k_cache.shape[:3])
    if tuple(k_scale.shape) != want or tuple(v_scale.shape) != want:
        raise ValueError(
            f"KV scales must be {want} for caches {tuple(k_cache.shape)}; got {tuple(k_scale.shape)} and "
            f"{tuple(v_scale.shape)}"
        )
    return True


__all__ = ["KV_SCALE_DTYPE", "QUANTIZED_KV_DTYPES", "check_kv_scales", "dequantize_kv", "quantize_kv", "write_kv_quantized"]
