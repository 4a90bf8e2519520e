"""Import already-quantized weights into our packed layouts without rounding them a second time.

GGUF (llama.cpp) block types, per 2-D weight tensor, from the raw bytes (``GGUFSource.raw_tensor``):

    type   block (elements / bytes)   value                        ->  our layout               exact?
    Q4_0   32 / 18: d, 16 x 2 nibbles  d * (q - 8)                     W4A16 g32, sym             yes
    Q4_1   32 / 20: d, m, nibbles      d * q + m                       W4A16 g32                  yes
    Q8_0   32 / 34: d, 32 x int8       d * q                           W8A16 g32                  yes
    Q5_0   32 / 22: d, qh, nibbles     d * (q - 16), q 5-bit           W8A16 g32 (codes q - 16)   yes
    Q4_K   256 / 144: d, dmin, 8 x     (d*sc_j) * q - (dmin*m_j)       W4A16 g32                  only if every
           (6-bit sc_j, m_j), nibbles  per 32-element sub-block j                                  d*sc_j, dmin*m_j
                                                                                                   is an fp16
    Q5_1, Q5_K, Q6_K, Q2_K, Q3_K, IQ*: no exact form in our layouts  ->  dequantized to float, with one
    warning per type (Q6_K has 16-element sub-blocks, our int8 groups are >= 32; Q5_1/Q5_K are asymmetric
    5-bit and our int8 is symmetric; the 2/3-bit and IQ types are not representable at all).

"Exact" means the fp32 dequantization of our packed weight equals ``gguf.quants.dequantize`` of the same
bytes value for value (tests check it on the bundled SmolLM2 and on synthetic tensors). The one difference
is the sign of an exact zero: ggml computes d * (q - 8) = -0.0 for q = 8 and d < 0, we compute
q * d + (-8 * d) = +0.0. Both are the same number in every matmul.

Q4_K: ggml multiplies the fp16 super-block scale by the 6-bit sub-block scale in fp32; the product has up to
17 significant bits, so it is an fp16 (our scale dtype) only by luck. The check is per tensor and cheap, and
real llama.cpp Q4_K files practically always fail it, so Q4_K is in effect dequantized (with the notice).

HF GPTQ and AWQ checkpoints (4-bit, see ``repack_gptq`` / ``repack_awq`` for the bit layouts). Their value is
w = s * (q - z) with fp16 s and an integer zero point z; ours is q * s + min with an fp16 min, so
min = fp16(-z * s) is rounded once, by at most half an fp16 ulp of z * s (<= 2^-12 * 15 * s, under 0.4 % of
one quantization step). Symmetric GPTQ (z = 8) is exact: -8 * s is an fp16.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType as GQT
from torch import nn

from .formats import INT4_GROUP_SIZES, PackedWeight, QuantSpec, make_int4, make_int8

__all__ = [
    "GGUF_CONDITIONAL_TYPES",
    "GGUF_EXACT_TYPES",
    "HFQuantConfig",
    "ImportedWeight",
    "InputPermutedLinear",
    "dequantize_imported",
    "detect_hf_quantization",
    "gguf_packed_spec",
    "gguf_repack",
    "our_group_size",
    "repack_awq",
    "repack_gptq",
    "unpack_awq_int32",
    "unpack_gptq_int32",
]

#: GGUF types that always repack losslessly.
GGUF_EXACT_TYPES = (GQT.Q4_0, GQT.Q4_1, GQT.Q8_0, GQT.Q5_0)
#: GGUF types that repack only when the per-tensor exactness check passes (else: dequantized).
GGUF_CONDITIONAL_TYPES = (GQT.Q4_K,)

_F16 = np.float16
_F32 = np.float32


@dataclass
class ImportedWeight:
    """A packed weight plus, for act-order GPTQ, the input permutation its columns were sorted by.

    perm: int64 (K,) or None. The packed weight's column i is the checkpoint's input feature perm[i], so
    the layer computes y = x[..., perm] @ dequant(packed).T.
    """

    packed: PackedWeight
    perm: torch.Tensor | None = None


class InputPermutedLinear(nn.Module):
    """y = inner(x[..., perm]): runs an act-order GPTQ layer whose K axis was sorted into contiguous groups.

    A wrapper rather than a QuantLinear feature: the permutation is a property of the imported checkpoint,
    not of the packed format, and only act-order GPTQ needs it.
    """

    def __init__(self, inner: nn.Module, perm: torch.Tensor) -> None:
        super().__init__()
        self.inner = inner
        self.register_buffer("perm", perm.to(torch.int64), persistent=True)  # (K,)

    @property
    def in_features(self) -> int:
        return int(self.perm.numel())

    @property
    def out_features(self) -> int:
        return int(self.inner.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.index_select(-1, self.perm))  # (..., K) gathered into the sorted order


# ------------------------------------------------------------------------------------------------------------
# GGUF
# ------------------------------------------------------------------------------------------------------------


def _blocks(raw: np.ndarray, out_features: int, in_features: int, block_elems: int, block_bytes: int) -> np.ndarray:
    """(N, bytes_per_row) uint8 -> (N, K // block_elems, block_bytes)."""
    if in_features % block_elems:
        raise ValueError(f"in_features={in_features} is not a multiple of the block size {block_elems}")
    nb = in_features // block_elems
    if raw.shape != (out_features, nb * block_bytes):
        raise ValueError(f"raw tensor has shape {raw.shape}, expected {(out_features, nb * block_bytes)}")
    return raw.reshape(out_features, nb, block_bytes)


def _f16_field(blk: np.ndarray, start: int) -> np.ndarray:
    """The fp16 stored at byte `start` of every block: (N, nb) float16."""
    return np.ascontiguousarray(blk[..., start : start + 2]).view(_F16)[..., 0]


def _nibbles_32(qs: np.ndarray) -> np.ndarray:
    """ggml's 32-element nibble block: 16 bytes (..., 16) -> codes (..., 32); low nibbles are elements 0..15,
    high nibbles 16..31."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _to_groups_major(a: np.ndarray) -> torch.Tensor:
    """(N, groups) per-block values -> (groups, N) tensor, the (group, out) order of our scales."""
    return torch.from_numpy(np.ascontiguousarray(a.T))


def _exact_f16(x32: np.ndarray) -> np.ndarray | None:
    """fp16 copy of the fp32 array if every value survives the round trip, else None."""
    with np.errstate(over="ignore"):
        h = x32.astype(_F16)
    if not np.array_equal(h.astype(_F32), x32):
        return None
    return h


def _repack_q4_0(raw: np.ndarray, n: int, k: int) -> PackedWeight | None:
    blk = _blocks(raw, n, k, 32, 18)
    d = _f16_field(blk, 0)  # (N, nb)
    codes = _nibbles_32(blk[..., 2:18]).reshape(n, k)  # (N, K) in [0, 15]
    mins = _exact_f16(-8.0 * d.astype(_F32))  # exact unless -8d overflows fp16 (|d| >= 8192)
    if mins is None:
        return None
    return make_int4(torch.from_numpy(codes), _to_groups_major(d), _to_groups_major(mins), 32, symmetric=True)


def _repack_q4_1(raw: np.ndarray, n: int, k: int) -> PackedWeight:
    blk = _blocks(raw, n, k, 32, 20)
    d, m = _f16_field(blk, 0), _f16_field(blk, 2)
    codes = _nibbles_32(blk[..., 4:20]).reshape(n, k)
    return make_int4(torch.from_numpy(codes), _to_groups_major(d), _to_groups_major(m), 32)


def _repack_q8_0(raw: np.ndarray, n: int, k: int) -> PackedWeight:
    blk = _blocks(raw, n, k, 32, 34)
    d = _f16_field(blk, 0)
    codes = np.ascontiguousarray(blk[..., 2:34]).view(np.int8).reshape(n, k)
    return make_int8(torch.from_numpy(codes), _to_groups_major(d), 32)


def _repack_q5_0(raw: np.ndarray, n: int, k: int) -> PackedWeight:
    blk = _blocks(raw, n, k, 32, 22)
    d = _f16_field(blk, 0)
    qh = np.ascontiguousarray(blk[..., 2:6]).view("<u4")  # (N, nb, 1): bit i is the 5th bit of element i
    high = ((qh >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)  # (N, nb, 32)
    low = _nibbles_32(blk[..., 6:22])
    codes = ((low | (high << 4)).astype(np.int16) - 16).astype(np.int8).reshape(n, k)  # in [-16, 15]
    return make_int8(torch.from_numpy(codes), _to_groups_major(d), 32)


def _q4_k_scale_min(sc12: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unpack ggml's 12-byte field of eight 6-bit (scale, min) pairs: (..., 12) uint8 -> two (..., 8) uint8.

    Bytes 0-3 hold scales 0-3 in their low 6 bits, bytes 4-7 mins 0-3; scales/mins 4-7 keep their low 4 bits
    in the nibbles of bytes 8-11 and their top 2 bits in the spare top bits of bytes 0-3 / 4-7.
    """
    a, b, c = sc12[..., 0:4], sc12[..., 4:8], sc12[..., 8:12]
    scale = np.concatenate([a & 0x3F, (c & 0x0F) | ((a >> 6) << 4)], axis=-1)
    mn = np.concatenate([b & 0x3F, (c >> 4) | ((b >> 6) << 4)], axis=-1)
    return scale, mn


def _repack_q4_k(raw: np.ndarray, n: int, k: int) -> PackedWeight | None:
    blk = _blocks(raw, n, k, 256, 144)
    nb = blk.shape[1]
    d = _f16_field(blk, 0).astype(_F32)[..., None]  # (N, nb, 1)
    dmin = _f16_field(blk, 2).astype(_F32)[..., None]
    sc, mn = _q4_k_scale_min(blk[..., 4:16])  # (N, nb, 8) each
    scale32 = d * sc.astype(_F32)  # ggml's fp32 products, (N, nb, 8)
    min32 = -(dmin * mn.astype(_F32))
    scale16, min16 = _exact_f16(scale32), _exact_f16(min32)
    if scale16 is None or min16 is None:
        return None
    # 128 bytes = 4 chunks of 32; chunk c's low nibbles are sub-block 2c, its high nibbles sub-block 2c+1.
    qs = blk[..., 16:144].reshape(n, nb, 4, 32)
    codes = np.stack([qs & 0x0F, qs >> 4], axis=3).reshape(n, k)  # (N, nb, 4, 2, 32) -> (N, K)
    return make_int4(torch.from_numpy(codes), _to_groups_major(scale16.reshape(n, -1)),
                     _to_groups_major(min16.reshape(n, -1)), 32)


_GGUF_REPACKERS = {
    GQT.Q4_0: _repack_q4_0,
    GQT.Q4_1: _repack_q4_1,
    GQT.Q8_0: _repack_q8_0,
    GQT.Q5_0: _repack_q5_0,
    GQT.Q4_K: _repack_q4_k,
}


def gguf_repack(raw: np.ndarray, qtype: GQT, shape: tuple[int, ...]) -> PackedWeight | None:
    """Repack one GGUF weight's raw blocks (N, bytes_per_row) into our layout, or None when it has no exact
    packed form (the caller dequantizes it). Raises ValueError when the bytes do not fit the shape."""
    fn = _GGUF_REPACKERS.get(GQT(qtype))
    if fn is None or gguf_packed_spec(raw, qtype, shape) is None:  # header-only check: exact and fits our layout
        return None
    n, k = shape
    return fn(np.asarray(raw, dtype=np.uint8), n, k)


def gguf_packed_spec(raw: np.ndarray | None, qtype: GQT, shape: tuple[int, ...]) -> QuantSpec | None:
    """The spec a GGUF weight repacks to, or None when it has no exact packed form. Reads only the block
    headers (scales) and only for GGUF_DATA_DEPENDENT types (raw may be None for the others), so planning a
    load costs little."""
    if len(shape) != 2:
        return None
    qtype = GQT(qtype)
    spec = _gguf_spec(qtype, raw, shape)
    if spec is None:
        return None
    try:
        spec.check_shape(*shape)  # e.g. int4 needs out_features % 8 == 0 (a 32001-row lm_head does not fit)
    except ValueError:
        return None
    return spec


#: GGUF types whose exactness depends on the data (their block scales), so planning reads their headers.
GGUF_DATA_DEPENDENT = (GQT.Q4_0, GQT.Q4_K)


def _gguf_spec(qtype: GQT, raw: np.ndarray | None, shape: tuple[int, ...]) -> QuantSpec | None:
    n, k = shape
    if qtype in GGUF_DATA_DEPENDENT:
        if raw is None:
            raise ValueError(f"{qtype.name}: the raw blocks are needed to tell whether the repack is exact")
        raw = np.asarray(raw, dtype=np.uint8)
    if qtype == GQT.Q4_0:
        d = _f16_field(_blocks(raw, n, k, 32, 18), 0)
        return QuantSpec.int4(32, symmetric=True) if _exact_f16(-8.0 * d.astype(_F32)) is not None else None
    if qtype == GQT.Q4_1:
        return QuantSpec.int4(32)
    if qtype in (GQT.Q8_0, GQT.Q5_0):
        return QuantSpec.int8(32)
    if qtype == GQT.Q4_K:
        blk = _blocks(raw, n, k, 256, 144)
        sc, mn = _q4_k_scale_min(blk[..., 4:16])
        scale32 = _f16_field(blk, 0).astype(_F32)[..., None] * sc.astype(_F32)
        min32 = -(_f16_field(blk, 2).astype(_F32)[..., None] * mn.astype(_F32))
        exact = _exact_f16(scale32) is not None and _exact_f16(min32) is not None
        return QuantSpec.int4(32) if exact else None
    return None


# ------------------------------------------------------------------------------------------------------------
# HF GPTQ / AWQ checkpoints
# ------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HFQuantConfig:
    """What an HF quantized checkpoint says about itself (config.json's quantization_config, or the older
    quantize_config.json beside it).

    method:       "gptq" or "awq"
    group_size:   inputs per group; None for per-channel (GPTQ group_size = -1)
    desc_act:     GPTQ act-order (g_idx is a permutation of the groups, not k // G)
    zero_offset:  added to the stored zero point: 1 for GPTQ's v1 format ("gptq"), 0 for "gptq_v2" and AWQ
    skip:         module-name substrings the checkpoint left unquantized (modules_to_not_convert)
    """

    method: str
    bits: int
    group_size: int | None
    desc_act: bool = False
    sym: bool = True
    zero_offset: int = 0
    skip: tuple[str, ...] = ()


def detect_hf_quantization(hf_config: dict[str, Any], extra: dict[str, Any] | None = None) -> HFQuantConfig | None:
    """Parse a GPTQ/AWQ quantization_config; None when the checkpoint is not GPTQ/AWQ. ValueError names any
    setting we cannot import (bits other than 4, an AWQ kernel layout other than GEMM, ...)."""
    qc = hf_config.get("quantization_config") or extra
    if not isinstance(qc, dict):
        return None
    method = str(qc.get("quant_method", "gptq" if "desc_act" in qc else "")).lower()
    if method not in ("gptq", "awq"):
        return None
    bits = int(qc.get("bits", qc.get("w_bit", 4)))
    if bits != 4:
        raise ValueError(f"{method.upper()} checkpoint with bits={bits}: only 4-bit {method.upper()} can be imported")
    g = int(qc.get("group_size", qc.get("q_group_size", 128)))
    group_size = None if g in (-1, 0) else g
    skip = tuple(qc.get("modules_to_not_convert") or ())
    if method == "awq":
        version = str(qc.get("version", "gemm")).lower()
        if version != "gemm":
            raise ValueError(f"AWQ checkpoint in the '{version}' layout: only the GEMM layout (version 'gemm') "
                             "can be imported")
        if not qc.get("zero_point", True):
            raise ValueError("AWQ checkpoint without zero points (zero_point=false) cannot be imported")
        return HFQuantConfig("awq", bits, group_size, zero_offset=0, sym=False, skip=skip)
    fmt = str(qc.get("checkpoint_format", qc.get("format", "gptq"))).lower()
    if fmt not in ("gptq", "gptq_v2"):
        raise ValueError(f"GPTQ checkpoint_format '{fmt}' cannot be imported (supported: gptq, gptq_v2)")
    return HFQuantConfig("gptq", bits, group_size, desc_act=bool(qc.get("desc_act", False)),
                         sym=bool(qc.get("sym", True)), zero_offset=1 if fmt == "gptq" else 0, skip=skip)


_SHIFTS4 = torch.arange(0, 32, 4, dtype=torch.int32)  # (8,) bit offset of nibble i


def unpack_gptq_int32(qweight: torch.Tensor) -> torch.Tensor:
    """GPTQ packs along the input dimension: int32 (K // 8, N), bits [4i, 4i+4) of word (j, n) = q[8j + i, n].
    Returns codes int64 (K, N)."""
    kw, n = qweight.shape
    nib = (qweight.to(torch.int32).unsqueeze(1) >> _SHIFTS4.view(1, 8, 1)) & 0xF  # (K/8, 8, N)
    return nib.reshape(kw * 8, n).to(torch.int64)


def _unpack_cols_int32(packed: torch.Tensor, order: list[int] | None = None) -> torch.Tensor:
    """Pack along the output dimension: int32 (R, N // 8) -> codes int64 (R, N). Nibble i of word (r, j)
    holds column 8j + order[i] (order = identity for GPTQ's qzeros, AWQ's interleave for AWQ tensors)."""
    r, nw = packed.shape
    nib = (packed.to(torch.int32).unsqueeze(-1) >> _SHIFTS4) & 0xF  # (R, N/8, 8): nibble i
    if order is not None:
        out = torch.empty_like(nib)
        out[..., order] = nib  # column order[i] <- nibble i
        nib = out
    return nib.reshape(r, nw * 8).to(torch.int64)


#: AWQ's nibble order: nibble i of a word holds column AWQ_ORDER[i] of its 8 (the layout its GEMM kernel
#: reads with 2 x 4 interleaved dequantization).
AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


def unpack_awq_int32(packed: torch.Tensor) -> torch.Tensor:
    """AWQ GEMM packs along the output dimension with interleaved nibbles: int32 (R, N // 8) -> int64 (R, N)."""
    return _unpack_cols_int32(packed, AWQ_ORDER)


def our_group_size(k: int, group_size: int | None, what: str) -> int:
    """The largest of our int4 group sizes that divides both the checkpoint's group size (K when per-channel)
    and K: the checkpoint's (scale, zero) are then repeated over our smaller groups, which is exact."""
    g = k if group_size is None else group_size
    for ours in sorted(INT4_GROUP_SIZES, reverse=True):
        if g % ours == 0 and k % ours == 0:
            return ours
    raise ValueError(f"{what}: group size {g} (in_features {k}) is not a multiple of 32; "
                     f"our int4 layout needs groups of {', '.join(map(str, INT4_GROUP_SIZES))}")


def _to_ours(codes_kn: torch.Tensor, zeros_gn: torch.Tensor, scales_gn: torch.Tensor, ckpt_group: int,
             our_group: int, symmetric: bool) -> PackedWeight:
    """Codes (K, N) in the checkpoint's group structure (contiguous groups of ckpt_group along K), integer zero
    points and fp16 scales (K // ckpt_group, N) -> our W4A16 with groups of our_group."""
    rep = ckpt_group // our_group
    scales = scales_gn.to(torch.float16).repeat_interleave(rep, dim=0)  # (K // our_group, N)
    zeros = zeros_gn.repeat_interleave(rep, dim=0).to(torch.float32)
    # w = s * (q - z) = q * s + (-z * s): the min is rounded to fp16 once (exact for z = 8, see module doc).
    mins = (-zeros * scales.float()).to(torch.float16)
    return make_int4(codes_kn.t().contiguous(), scales, mins, our_group, symmetric=symmetric)


def repack_gptq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor | None,
                cfg: HFQuantConfig, name: str = "layer") -> ImportedWeight:
    """One GPTQ linear -> our W4A16.

    qweight int32 (K // 8, N)   packed along K (see unpack_gptq_int32)
    qzeros  int32 (groups, N // 8) packed along N, nibble i = column 8j + i; stored zero = z - zero_offset
    scales  fp16  (groups, N)
    g_idx   int32 (K,)           group of each input feature; k // G unless act-order (desc_act)
    Act-order: the columns are sorted by g_idx (stable) into contiguous groups and the layer gathers its
    input with the same permutation (InputPermutedLinear); a g_idx whose groups are not all of size G is
    rejected.
    """
    if qweight.dtype != torch.int32 or qweight.dim() != 2:
        raise ValueError(f"{name}: GPTQ qweight must be a 2-D int32 tensor, got {qweight.dtype} {tuple(qweight.shape)}")
    k, n = qweight.shape[0] * 8, qweight.shape[1]
    g = k if cfg.group_size is None else cfg.group_size
    groups = -(-k // g)
    if tuple(qzeros.shape) != (groups, n // 8) or tuple(scales.shape) != (groups, n) or n % 8:
        raise ValueError(f"{name}: GPTQ tensors do not fit qweight {tuple(qweight.shape)} with group size {g}: "
                         f"qzeros {tuple(qzeros.shape)} (want {(groups, n // 8)}), scales {tuple(scales.shape)} "
                         f"(want {(groups, n)})")
    ours = our_group_size(k, cfg.group_size, name)
    codes = unpack_gptq_int32(qweight)  # (K, N)
    zeros = (_unpack_cols_int32(qzeros) + cfg.zero_offset) & 0xF  # (groups, N); v1 stores z - 1 (mod 16)
    perm: torch.Tensor | None = None
    if g_idx is not None:
        g_idx = g_idx.to(torch.int64).reshape(-1)
        if g_idx.numel() != k:
            raise ValueError(f"{name}: g_idx has {g_idx.numel()} entries for in_features {k}")
        natural = torch.arange(k) // g
        if not torch.equal(g_idx, natural):
            order = torch.argsort(g_idx, stable=True)
            if not torch.equal(g_idx[order], natural):
                counts = torch.bincount(g_idx, minlength=groups)
                raise ValueError(f"{name}: act-order g_idx does not assign exactly {g} inputs to every group "
                                 f"(group sizes {counts.unique().tolist()}); cannot sort it into contiguous groups")
            perm = order
            codes = codes.index_select(0, perm)  # column i of the sorted weight = input feature perm[i]
    symmetric = cfg.method == "gptq" and cfg.sym and bool((zeros == 8).all())
    return ImportedWeight(_to_ours(codes, zeros, scales, g, ours, symmetric), perm)


def repack_awq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, cfg: HFQuantConfig,
               name: str = "layer") -> ImportedWeight:
    """One AWQ (GEMM layout) linear -> our W4A16.

    qweight int32 (K, N // 8)      packed along N, nibble i of word (k, j) = column 8j + AWQ_ORDER[i]
    qzeros  int32 (groups, N // 8) same packing; zero z stored as is
    scales  fp16  (groups, N)
    """
    if qweight.dtype != torch.int32 or qweight.dim() != 2:
        raise ValueError(f"{name}: AWQ qweight must be a 2-D int32 tensor, got {qweight.dtype} {tuple(qweight.shape)}")
    k, n = qweight.shape[0], qweight.shape[1] * 8
    g = k if cfg.group_size is None else cfg.group_size
    groups = -(-k // g)
    if tuple(qzeros.shape) != (groups, n // 8) or tuple(scales.shape) != (groups, n):
        raise ValueError(f"{name}: AWQ tensors do not fit qweight {tuple(qweight.shape)} with group size {g}: "
                         f"qzeros {tuple(qzeros.shape)} (want {(groups, n // 8)}), scales {tuple(scales.shape)} "
                         f"(want {(groups, n)})")
    ours = our_group_size(k, cfg.group_size, name)
    codes = unpack_awq_int32(qweight)  # (K, N)
    zeros = unpack_awq_int32(qzeros)  # (groups, N)
    return ImportedWeight(_to_ours(codes, zeros, scales, g, ours, symmetric=False))


def dequantize_imported(imported: ImportedWeight) -> torch.Tensor:
    """(N, K) fp32 weight in the checkpoint's own input order (perm undone): what the layer multiplies x by."""
    w = imported.packed.dequantize(torch.float32)
    if imported.perm is None:
        return w
    out = torch.empty_like(w)
    out[:, imported.perm] = w  # sorted column i is input feature perm[i]
    return out
