"""Quantized KV cache: int8 or fp8 (e4m3) codes with one fp16 scale per (token, kv head).

Pages: k_cache / v_cache (num_blocks, block_size, Hkv, D) of codes; scales beside them: k_scale / v_scale
(num_blocks, block_size, Hkv) fp16. A cached value is x ~= decode(c) * scale, scale = max|x| / qmax over
that token's head:
  int8  codes c in [-127, 127] (round to nearest), qmax 127: a uniform grid, error <= scale / 2;
  fp8   e4m3fn codes (1 sign, 4 exponent bits with bias 7, 3 mantissa bits; no infinities), qmax 448 (its
        largest finite value): a logarithmic grid, relative error <= 2^-4 for every value above 2^-6 of the
        row's max, so small entries of a head with one large outlier keep their precision where int8's
        uniform grid rounds them to a few steps. The pages are stored as torch.uint8 holding the e4m3 bit
        patterns (FP8_KV_STORAGE; vLLM stores its fp8 caches the same way): every index / copy op (block
        swap, index_copy_) works on uint8 on every device, and the Triton kernels decode the bits with
        integer ops (paged_attention_triton._fp8e4m3_to_f32), so an fp8 cache runs on any GPU and on the CPU.
One scale per (token, head) rather than per block keeps a write to one slot independent of the other tokens
of its page (decode writes one token at a time), and at head_dim 128 costs 2 bytes per 128 (1.6%). fp16
scales are what memory/budget.py's KV term counts.
"""

from __future__ import annotations

import torch

KV_SCALE_DTYPE = torch.float16
#: Storage dtype of an fp8 (e4m3fn) KV cache: the codes' bit patterns.
FP8_KV_STORAGE = torch.uint8
FP8_CODE_DTYPE = torch.float8_e4m3fn
#: KV cache dtypes that are stored quantized, with scale pools beside the pages.
QUANTIZED_KV_DTYPES: tuple[torch.dtype, ...] = (torch.int8, FP8_KV_STORAGE)
_QMAX = {torch.int8: 127.0, FP8_KV_STORAGE: 448.0}
# Smallest scale stored: fp16's smallest normal number, so a scale never underflows to 0 (an all-zero row
# quantizes to zeros whatever its scale).
_MIN_SCALE = 2.0**-14


#: --kv-cache-dtype names -> torch dtype ("auto": the model's compute dtype).
_KV_CACHE_DTYPES = {"fp16": torch.float16, "float16": torch.float16, "bf16": torch.bfloat16,
                    "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32, "int8": torch.int8,
                    "fp8": FP8_KV_STORAGE, "fp8_e4m3": FP8_KV_STORAGE, "float8": FP8_KV_STORAGE}
KV_CACHE_DTYPE_CHOICES = ("auto", "fp16", "bf16", "fp32", "int8", "fp8")


def resolve_kv_cache_dtype(name: str, model_dtype: torch.dtype) -> torch.dtype:
    """The KV pages' storage dtype for --kv-cache-dtype `name` (auto | fp16 | bf16 | fp32 | int8 | fp8;
    fp8 pages are uint8 holding e4m3 codes)."""
    key = name.lower()
    if key == "auto":
        return model_dtype
    if key not in _KV_CACHE_DTYPES:
        raise ValueError(f"unknown --kv-cache-dtype {name!r}; choose one of {', '.join(KV_CACHE_DTYPE_CHOICES)}")
    return _KV_CACHE_DTYPES[key]


def quantize_kv(x: torch.Tensor, dtype: torch.dtype = torch.int8) -> tuple[torch.Tensor, torch.Tensor]:
    """x (T, H, D) float -> (codes (T, H, D) in `dtype` (int8, or uint8 e4m3 bits), fp16 scale (T, H)).

    The quantization divides by the scale as stored (rounded to fp16), so dequantization with the stored
    scale reproduces x to within half a step of the code grid per element."""
    if dtype not in QUANTIZED_KV_DTYPES:
        raise ValueError(f"no quantized KV format for {dtype}; choose one of {QUANTIZED_KV_DTYPES}")
    qmax = _QMAX[dtype]
    xf = x.float()
    scale = (xf.abs().amax(dim=-1) / qmax).clamp_min(_MIN_SCALE).to(KV_SCALE_DTYPE)  # (T, H)
    y = (xf / scale.float()[..., None]).clamp_(-qmax, qmax)  # |y| <= qmax: no code saturates to NaN
    if dtype == torch.int8:
        return torch.round(y).to(torch.int8), scale
    return y.to(FP8_CODE_DTYPE).view(FP8_KV_STORAGE), scale  # round to nearest even, e4m3fn


def decode_kv_codes(q: torch.Tensor) -> torch.Tensor:
    """Codes of a quantized cache (int8, or uint8 e4m3 bits) -> fp32 values before scaling."""
    if q.dtype == FP8_KV_STORAGE:
        return q.view(FP8_CODE_DTYPE).float()
    return q.float()


def dequantize_kv(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Codes (..., D) and scale (...) -> (..., D) in dtype."""
    return (decode_kv_codes(q) * scale.float()[..., None]).to(dtype)


def write_kv_quantized(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k_scale: torch.Tensor,
    v_scale: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Quantize new K/V (T, Hkv, D) to the caches' format and scatter them and their scales into the pages at
    slot_mapping (T,)."""
    nb, bs, h, d = k_cache.shape
    for x, cache, scale in ((k, k_cache, k_scale), (v, v_cache, v_scale)):
        qx, sx = quantize_kv(x, cache.dtype)
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


__all__ = ["FP8_KV_STORAGE", "KV_SCALE_DTYPE", "QUANTIZED_KV_DTYPES", "check_kv_scales", "decode_kv_codes",
           "dequantize_kv", "quantize_kv", "resolve_kv_cache_dtype", "write_kv_quantized"]
