"""Packed weight formats for weight-only quantization (W8A16 and W4A16).

The layouts are chosen for the kernels in ``vramwise.kernels`` (docs/quant-format.md has the long version).
N = out_features, K = in_features, G = group_size; "codes" are the unpacked small integers.

W4A16 (bits=4), group-wise, (scale, min) form:
    qweight  int32   (N // 8, K // 8, 8)  packed along K, tiled by 8 output channels:
                     qweight[b, r, c] holds the codes q[8*b + c, 8*r + i] (i = 0..7) of output channel
                     8*b + c in bits [4*i, 4*i + 4) (little-endian nibbles). Each block b is one contiguous
                     (K // 8, 8) slab: a decode GEMV program that owns 8 output channels streams one
                     contiguous region, and a K-tile of any 8-aligned set of channels is 32-byte runs.
                     Words are int32 (two's complement): a code >= 8 in nibble 7 makes the word negative.
    scales   float16 (K // G, N)   one scale per (group, output channel)
    mins     float16 (K // G, N)   one additive offset per (group, output channel)
    dequant  w[n, k] = q[n, k] * scales[k // G, n] + mins[k // G, n]
    G is 32, 64 or 128 and divides K; N must be a multiple of 8.

    The (scale, min) form represents GGUF blocks exactly (each group of 32 is one GGUF block):
      Q4_1  w = d * q + m        ->  scales = d, mins = m
      Q4_0  w = d * (q - 8)      ->  scales = d, mins = -8 * d   (a power-of-two multiple of an fp16 is exact)
    and the fp32 reference dequant reproduces ggml's fp32 values bit for bit: q * d has at most 4 + 11
    significant bits, so the product is exact in fp32 and the only rounding is that of the final add,
    which ggml performs too. A symmetric int4 spec is stored the same way, with mins = -8 * scales.

W8A16 (bits=8), symmetric, per output channel or group-wise:
    qweight  int8    (K, N)        the transposed weight, output channels contiguous
    scales   float16 (K // G, N)   G = K for per-channel (scales has shape (1, N)); G = 32 represents GGUF Q8_0
    dequant  w[n, k] = q[k, n] * scales[k // G, n]

Scales (and mins) are stored (group, out) so one K-group's scales for a block of outputs are contiguous.
Use pack_int4 / make_int4 / make_int8 rather than building these by hand.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SUPPORTED_BITS = (4, 8)
INT4_GROUP_SIZES = (32, 64, 128)
#: Codes per int32 word in the W4A16 layout.
INT4_PER_WORD = 8
#: Output channels per contiguous slab in the W4A16 layout (qweight is (N // 8, K // 8, 8)).
INT4_TILE_N = 8
#: GGUF's block size; Q4_0/Q4_1/Q8_0 map onto group_size 32.
GGUF_BLOCK = 32
SCALE_DTYPE = torch.float16


#: Sentinel for "the format's default group size": 128 for 4-bit, per-channel (None) for 8-bit.
DEFAULT_GROUP = -1


@dataclass(frozen=True)
class QuantSpec:
    """What to quantize a linear layer to.

    bits:        8 (W8A16, symmetric int8) or 4 (W4A16, int4 codes with a per-group scale and min).
    group_size:  number of consecutive input features sharing one scale. For bits=4: 32, 64 or 128
                 (default 128). For bits=8: None (per output channel, the default) or a positive
                 multiple of 32 (32 represents GGUF Q8_0).
    symmetric:   bits=4: codes are centred on 8 (mins = -8 * scales, GGUF Q4_0 style) instead of
                 spanning each group's [min, max]; default False. bits=8 is always symmetric
                 (None or True; False raises).
    """

    bits: int = 4
    group_size: int | None = DEFAULT_GROUP
    symmetric: bool | None = None

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS or isinstance(self.bits, bool):
            raise ValueError(
                f"unsupported quantization bits={self.bits!r}: supported are {', '.join(map(str, SUPPORTED_BITS))}"
            )
        if self.group_size == DEFAULT_GROUP:
            object.__setattr__(self, "group_size", 128 if self.bits == 4 else None)
        if self.bits == 4:
            object.__setattr__(self, "symmetric", bool(self.symmetric))
            if self.group_size not in INT4_GROUP_SIZES:
                raise ValueError(
                    f"unsupported group_size={self.group_size!r} for 4-bit quantization: "
                    f"supported are {', '.join(map(str, INT4_GROUP_SIZES))}"
                )
        else:
            if self.symmetric is False:
                raise ValueError("8-bit quantization is symmetric only (int8 codes times a scale); "
                                 "asymmetric int8 is not supported")
            object.__setattr__(self, "symmetric", True)
            if self.group_size is not None and (
                not isinstance(self.group_size, int) or self.group_size <= 0 or self.group_size % GGUF_BLOCK
            ):
                raise ValueError(
                    f"unsupported group_size={self.group_size!r} for 8-bit quantization: "
                    f"use None (per output channel) or a positive multiple of {GGUF_BLOCK}"
                )

    # Convenience constructors, so call sites read like the format names.
    @classmethod
    def int8(cls, group_size: int | None = None) -> "QuantSpec":
        return cls(bits=8, group_size=group_size, symmetric=True)

    @classmethod
    def int4(cls, group_size: int = 128, symmetric: bool = False) -> "QuantSpec":
        return cls(bits=4, group_size=group_size, symmetric=symmetric)

    @property
    def name(self) -> str:
        """Short tag such as 'w4g128', 'w4g32s' or 'w8' (per-channel), for logs and reports."""
        g = "" if self.group_size is None else f"g{self.group_size}"
        s = "s" if (self.bits == 4 and self.symmetric) else ""
        return f"w{self.bits}{g}{s}"

    def group_size_for(self, in_features: int) -> int:
        """The effective group size for a layer with `in_features` inputs (K for per-channel)."""
        return in_features if self.group_size is None else self.group_size

    def check_shape(self, out_features: int, in_features: int) -> None:
        """Raise ValueError when a (out_features, in_features) weight cannot be stored in this format."""
        if in_features <= 0 or out_features <= 0:
            raise ValueError(f"weight shape must be positive, got ({out_features}, {in_features})")
        g = self.group_size_for(in_features)
        if in_features % g:
            raise ValueError(
                f"group_size={g} does not divide in_features={in_features} (spec {self.name})"
            )
        if self.bits == 4 and out_features % INT4_TILE_N:
            raise ValueError(f"out_features={out_features} must be a multiple of {INT4_TILE_N} for 4-bit packing "
                             f"(spec {self.name}); pad the layer or keep it unquantized")

    def weight_bytes(self, out_features: int, in_features: int) -> int:
        """Bytes of the packed weight plus scales (and mins), as the memory planner counts them."""
        g = self.group_size_for(in_features)
        groups = in_features // g
        code_bytes = out_features * in_features * self.bits // 8
        per_group = 2 if self.bits == 4 else 1  # scales (+ mins), fp16 each
        return code_bytes + groups * out_features * per_group * 2


@dataclass
class PackedWeight:
    """A quantized (N, K) weight in one of the layouts above. Plain tensors; QuantLinear holds them as buffers.

    qweight: int32 (N // 8, K // 8, 8) for bits=4, int8 (K, N) for bits=8
    scales:  float16 (K // G, N)
    mins:    float16 (K // G, N) for bits=4, None for bits=8
    """

    qweight: torch.Tensor
    scales: torch.Tensor
    mins: torch.Tensor | None
    spec: QuantSpec
    in_features: int
    out_features: int

    @property
    def group_size(self) -> int:
        return self.spec.group_size_for(self.in_features)

    def validate(self) -> None:
        """Check dtypes and shapes against the layout; raise ValueError naming what is off."""
        n, k, bits = self.out_features, self.in_features, self.spec.bits
        self.spec.check_shape(n, k)
        g = self.group_size
        want_q = (torch.int32, (n // INT4_TILE_N, k // INT4_PER_WORD, INT4_TILE_N)) if bits == 4 else (torch.int8, (k, n))
        got_q = (self.qweight.dtype, tuple(self.qweight.shape))
        if got_q != want_q:
            raise ValueError(f"qweight for {self.spec.name} ({n}x{k}) must be {want_q[0]} {want_q[1]}, got {got_q[0]} {got_q[1]}")
        for name, t in (("scales", self.scales), ("mins", self.mins)):
            if name == "mins" and bits == 8:
                if t is not None:
                    raise ValueError("8-bit weights are symmetric and take no mins")
                continue
            if t is None:
                raise ValueError(f"{name} missing for {self.spec.name}")
            if t.dtype != SCALE_DTYPE or tuple(t.shape) != (k // g, n):
                raise ValueError(
                    f"{name} for {self.spec.name} ({n}x{k}) must be {SCALE_DTYPE} {(k // g, n)}, got {t.dtype} {tuple(t.shape)}"
                )

    def to(self, device: torch.device | str) -> "PackedWeight":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return PackedWeight(move(self.qweight), move(self.scales), move(self.mins), self.spec,
                            self.in_features, self.out_features)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scales, self.mins) if t is not None)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(N, K) weight in `dtype`, computed in fp32 first (the reference the kernels are tested against)."""
        if self.spec.bits == 4:
            return dequantize_int4(self.qweight, self.scales, self.mins, self.group_size).to(dtype)
        return dequantize_int8(self.qweight, self.scales, self.group_size).to(dtype)


# ----------------------------------------------------------------------------------------------------------------
# Packing helpers (shared by RTN, the GGUF/GPTQ/AWQ repackers and the tests)
# ----------------------------------------------------------------------------------------------------------------

_NIBBLE_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)  # (8,) bit offset of nibble i


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Pack unsigned 4-bit codes (N, K) with values in [0, 15] into the W4A16 layout: int32 (N // 8, K // 8, 8).

    qweight[b, r, c] holds codes[8*b + c, 8*r + i] in bits [4*i, 4*i + 4), i = 0..7.
    """
    if codes.dim() != 2 or codes.shape[0] % INT4_TILE_N or codes.shape[1] % INT4_PER_WORD:
        raise ValueError(f"codes must be (N, K) with N and K multiples of 8, got {tuple(codes.shape)}")
    c = codes.to(torch.int64)
    if c.numel() and (int(c.min()) < 0 or int(c.max()) > 15):
        raise ValueError("int4 codes must lie in [0, 15]")
    n, k = c.shape
    c = c.view(n, k // INT4_PER_WORD, INT4_PER_WORD) << _NIBBLE_SHIFTS.to(c.device, torch.int64)  # (N, K/8, 8)
    words = c.sum(dim=-1)  # (N, K/8); disjoint bit fields, so the sum is an OR; fits in uint32
    # Reinterpret the uint32 bit pattern as int32 (two's complement).
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    # (N, K/8) -> (N/8, 8, K/8) -> (N/8, K/8, 8): slab b holds output channels 8b..8b+7, K-major.
    return words.view(n // INT4_TILE_N, INT4_TILE_N, k // INT4_PER_WORD).transpose(1, 2).contiguous()


def unpack_int4(qweight: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_int4: int32 (N // 8, K // 8, 8) -> uint8 codes (N, K)."""
    nb, k8, t = qweight.shape
    words = qweight.transpose(1, 2).reshape(nb * t, k8)  # (N, K/8)
    shifts = _NIBBLE_SHIFTS.to(qweight.device)
    codes = (words.unsqueeze(-1) >> shifts) & 0xF  # arithmetic shift, then mask: sign bits are dropped
    return codes.to(torch.uint8).reshape(nb * t, k8 * INT4_PER_WORD)


def _expand_groups(t: torch.Tensor, group_size: int) -> torch.Tensor:
    """(K // G, N) per-group values -> (N, K) per-weight values, in fp32."""
    return t.float().t().repeat_interleave(group_size, dim=1)


def dequantize_int4(qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, group_size: int) -> torch.Tensor:
    """fp32 (N, K) = q * scale + min, per group. Two separate fp32 ops (no FMA), matching ggml's Q4_0/Q4_1."""
    q = unpack_int4(qweight).float()
    return q * _expand_groups(scales, group_size) + _expand_groups(mins, group_size)


def dequantize_int8(qweight: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    """fp32 (N, K) = q * scale, per group (group_size = K for per-channel). qweight is (K, N)."""
    return qweight.t().float() * _expand_groups(scales, group_size)


def make_int4(codes: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, group_size: int,
              symmetric: bool = False) -> PackedWeight:
    """Build a W4A16 PackedWeight from unpacked codes (N, K) in [0, 15] and per-group (K // G, N) scales and mins.

    This is the entry point for importers: GGUF Q4_1 gives scales=d, mins=m; Q4_0 gives scales=d, mins=-8*d.
    scales/mins are converted to fp16 (exact when they come from fp16 GGUF fields).
    """
    n, k = codes.shape
    spec = QuantSpec(bits=4, group_size=group_size, symmetric=symmetric)
    pw = PackedWeight(pack_int4(codes), scales.to(SCALE_DTYPE).contiguous(), mins.to(SCALE_DTYPE).contiguous(),
                      spec, in_features=k, out_features=n)
    pw.validate()
    return pw


def make_int8(codes: torch.Tensor, scales: torch.Tensor, group_size: int | None = None) -> PackedWeight:
    """Build a W8A16 PackedWeight from int8 codes (N, K) (nn.Linear orientation) and (K // G, N) scales
    (G = K when group_size is None). GGUF Q8_0 gives group_size=32, scales=d.
    """
    if codes.dim() != 2:
        raise ValueError(f"codes must be (N, K), got {tuple(codes.shape)}")
    if codes.numel() and (int(codes.min()) < -128 or int(codes.max()) > 127):
        raise ValueError("int8 codes must lie in [-128, 127]")
    n, k = codes.shape
    spec = QuantSpec.int8(group_size)
    pw = PackedWeight(codes.to(torch.int8).t().contiguous(), scales.to(SCALE_DTYPE).contiguous(), None, spec,
                      in_features=k, out_features=n)
    pw.validate()
    return pw
