"""W4A16 matmul: y = x @ dequant(W).T with int4 weights (group-wise scale + min) and 16/32-bit activations.

Weight layout (vramwise.quant.formats, docs/quant-format.md), N = out_features, K = in_features:
    qweight int32 (N // 8, K // 8, 8): qweight[b, r, c] = codes q[8b + c, 8r + i] in bits [4i, 4i + 4)
    scales, mins fp16 (K // G, N):     w[n, k] = q[n, k] * scales[k // G, n] + mins[k // G, n]
The word holding (k, n) sits at flat offset (n // 8) * K + (k // 8) * 8 + n % 8.

Kernels (all fuse the dequantization, so weights are read from memory once, as int4):

* ``_w4_gemv_kernel`` -- decode, one row of x per program row (M <= GEMV_MAX_M). Memory-bound. A program
  owns BLOCK_N (= 8) output channels, i.e. one contiguous (K/8, 8) slab, and streams it in (BLOCK_K/8, 8)
  word tiles, prefetching the next tile while it computes on the current one. Products are accumulated
  elementwise in registers and reduced over K once at the end (no shuffles in the loop). Scale and min
  are applied per word: sum_i w_i x_i = scale * sum_i q_i x_i + min * sum_i x_i.
  Two inner paths:
    - fp16 activations on CUDA: inline PTX turns a word into four f16x2 pairs with the 0x6400 magic number
      (LOP3 + HSUB2) and does the 8 products with HFMA2 (fp16 products, fp32 across words); ~2.3
      instructions per weight instead of ~5 -- the difference between ALU-bound and memory-bound here.
    - everything else (bf16/fp32, Triton's CPU interpreter): fp32 math. A code is placed in the top
      mantissa bits of 1.0 (f = 1 + q/16, exact, one shift + one LOP3 + bitcast, no int->float convert),
      so sum_i q_i x_i = 16 * (sum_i f_i x_i - sum_i x_i).
* ``_w4_gemm_kernel`` -- skinny batches and mid-size prefill: tl.dot on dequantized (BLOCK_K, BLOCK_N)
  tiles in the activation dtype, fp32 accumulation, optional split-K (fp32 atomics, then cast).
  BLOCK_K divides the group size, so each K-tile needs one scale and one min per output channel.
* ``_w4_dequant_kernel`` + torch.matmul -- long prefills (M >= DEQUANT_MIN_M): dequantize the weight in
  column chunks into a bounded workspace and let cuBLAS run at full tensor-core rate; the one-off dequant
  pass is cheap next to an M-row GEMM, and a Triton dequant-in-the-loop GEMM loses to it there.

``w4a16_reference`` is the torch path (CPU and fallback) and the test oracle: it dequantizes to x.dtype in
row chunks (bounded temporary memory, nothing cached) and calls torch.matmul.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..quant.formats import INT4_TILE_N, dequantize_int4
from ._triton import HAS_TRITON, interpreting, sm_count, triton_supports, use_fixed_config

if HAS_TRITON:
    import triton
    import triton.language as tl

__all__ = ["w4a16_reference", "w4a16_matmul", "w4a16_dequantize", "GemvConfig", "GemmConfig",
           "GEMV_MAX_M", "SKINNY_MAX_M", "DEQUANT_MIN_M"]

#: M (rows of x) up to which the GEMV kernel runs (one program row per x row; the weight is re-read from
#: L2 per row and the dequant work repeats). Measured on H100, 13B shapes: at M=4 it still beats the
#: 16-row tl.dot kernel by 1.2-1.5x.
GEMV_MAX_M = 4
#: M up to which the tl.dot kernel uses BLOCK_M = 16 tiles with split-K (decode batches).
SKINNY_MAX_M = 16
#: M from which a prefill dequantizes W into a workspace and calls torch.matmul (cuBLAS).
DEQUANT_MIN_M = 256
#: Largest dequantized-weight workspace of the long-prefill path, in bytes (chunks over N beyond it; chunking
#: costs time, so the default holds a whole 13B MLP matrix in fp16: 13824 x 5120 x 2 = 135 MiB).
DEQUANT_WORKSPACE_BYTES = 160 << 20

# Elements of dequantized weight the torch reference materializes at once (fp32 temporary ~64 MiB).
_REF_CHUNK_ELEMS = 1 << 24


# ------------------------------------------------------------------------------------------------------------
# Torch reference
# ------------------------------------------------------------------------------------------------------------

def _check_args(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor,
                group_size: int, bias: torch.Tensor | None) -> tuple[int, int]:
    k = x.shape[-1]
    if qweight.dtype != torch.int32 or qweight.dim() != 3 or qweight.shape[2] != INT4_TILE_N \
            or qweight.shape[1] * 8 != k:
        raise ValueError(f"qweight must be int32 (N/8, K/8, 8) with K={k} from x, "
                         f"got {qweight.dtype} {tuple(qweight.shape)}")
    n = qweight.shape[0] * INT4_TILE_N
    if k % group_size:
        raise ValueError(f"group_size={group_size} does not divide in_features={k}")
    want = (k // group_size, n)
    for name, t in (("scales", scales), ("mins", mins)):
        if tuple(t.shape) != want:
            raise ValueError(f"{name} must have shape {want} (groups, out_features), got {tuple(t.shape)}")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"bias must have shape ({n},), got {tuple(bias.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"activations must be floating point, got {x.dtype}")
    return n, k


def w4a16_reference(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor,
                    group_size: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., K) -> (..., N) in x.dtype: dequantize W to x.dtype (fp32 math) and matmul. No caching."""
    n, k = _check_args(x, qweight, scales, mins, group_size, bias)
    x2 = x.reshape(-1, k)  # (M, K)
    out = torch.empty(x2.shape[0], n, dtype=x.dtype, device=x.device)
    blocks = max(1, _REF_CHUNK_ELEMS // (k * INT4_TILE_N))  # slabs of 8 output channels per step
    for b0 in range(0, qweight.shape[0], blocks):
        b1 = min(qweight.shape[0], b0 + blocks)
        n0, n1 = b0 * INT4_TILE_N, b1 * INT4_TILE_N
        w = dequantize_int4(qweight[b0:b1], scales[:, n0:n1], mins[:, n0:n1], group_size).to(x.dtype)  # (n1-n0, K)
        out[:, n0:n1] = x2 @ w.t()
    if bias is not None:
        out += bias.to(out.dtype)
    return out.reshape(*x.shape[:-1], n)


# ------------------------------------------------------------------------------------------------------------
# Configs
# ------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class GemvConfig:
    """Decode kernel tiling. block_n is a multiple of 8 (one slab); block_k a multiple of the group size.
    use_asm: None = the fp16 inline-PTX path where possible (fp16 x on CUDA, not interpreting)."""
    block_n: int = 8
    block_k: int = 1024
    num_warps: int = 4
    use_asm: bool | None = None


@dataclass(frozen=True)
class GemmConfig:
    """tl.dot kernel tiling. block_k must divide the group size; block_n a multiple of 8."""
    block_m: int = 64
    block_n: int = 64
    block_k: int = 32
    group_m: int = 8
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 2


def _choose_split_k(programs: int, k_tiles: int, device: torch.device, min_tiles_per_split: int = 4,
                    per_sm: int = 4) -> int:
    """Split K until the grid has ~per_sm programs per SM, keeping >= min_tiles_per_split K-tiles per split."""
    target = per_sm * sm_count(device)
    if programs >= target:
        return 1
    return max(1, min(math.ceil(target / programs), k_tiles // min_tiles_per_split))


def _default_gemv_config(m: int, n: int, k: int, group_size: int, device: torch.device) -> GemvConfig:
    if use_fixed_config(device):
        return GemvConfig(block_n=8, block_k=max(group_size, 64), num_warps=1)  # small tiles: fast in numpy
    # Measured on H100 (13B shapes): 8 channels per program; longer K-tiles when N gives fewer programs.
    block_k = 2048 if n < 8192 else 1024
    return GemvConfig(block_n=8, block_k=max(block_k, group_size), num_warps=4)


def _default_skinny_config(m: int, n: int, k: int, group_size: int, device: torch.device) -> GemmConfig:
    if use_fixed_config(device):
        cfg = GemmConfig(block_m=16, block_n=32, block_k=min(group_size, 32), num_stages=1)
    else:
        # Measured on H100 (13B shapes, M = 4..16): narrow tiles and deep split-K win.
        cfg = GemmConfig(block_m=16, block_n=32, block_k=min(group_size, 64), num_warps=4, num_stages=3)
    split = _choose_split_k(triton.cdiv(n, cfg.block_n), k // cfg.block_k, device,
                            per_sm=4 if use_fixed_config(device) else 8)
    return GemmConfig(cfg.block_m, cfg.block_n, cfg.block_k, 1, split, cfg.num_warps, cfg.num_stages)


def _gemm_candidates(m: int, n: int, k: int, group_size: int, device: torch.device) -> list[GemmConfig]:
    """A short list for mid-size M (SKINNY_MAX_M < M < DEQUANT_MIN_M); split-K where the tiles alone
    would leave SMs idle."""
    out = []
    for bm, bn, bk, warps, stages in ((64, 128, 64, 4, 4), (128, 128, 64, 8, 3), (64, 64, 64, 4, 4),
                                      (128, 128, 32, 4, 4)):
        bk = min(bk, group_size)
        programs = triton.cdiv(m, bm) * triton.cdiv(n, bn)
        split = _choose_split_k(programs, k // bk, device)
        out.append(GemmConfig(bm, bn, bk, 8, split, warps, stages))
    return list(dict.fromkeys(out))


# ------------------------------------------------------------------------------------------------------------
# Triton kernels
# ------------------------------------------------------------------------------------------------------------

if HAS_TRITON:

    # f16x2 magic-number dequant + dot of one int32 word (8 codes) with 8 fp16 activations.
    # $1: the word; $2..$5: activation pairs (x_j | x_{j+4} << 16), j = 0..3; $0 (f32): sum_i q_i x_i.
    # (w & 0x000F000F) | 0x64006400 is the f16x2 pair (1024 + q_j, 1024 + q_{j+4}); subtracting 1024 is exact.
    _W4_DOT8_F16_ASM = tl.constexpr("""{
    .reg .b32 a0, a1, a2, a3, t, acc, c;
    .reg .f16 lo, hi;
    .reg .f32 flo, fhi;
    mov.b32 c, 0x64006400;
    lop3.b32 a0, $1, 0x000F000F, c, 0xEA;
    shr.u32 t, $1, 4;
    lop3.b32 a1, t, 0x000F000F, c, 0xEA;
    shr.u32 t, $1, 8;
    lop3.b32 a2, t, 0x000F000F, c, 0xEA;
    shr.u32 t, $1, 12;
    lop3.b32 a3, t, 0x000F000F, c, 0xEA;
    sub.f16x2 a0, a0, c;
    sub.f16x2 a1, a1, c;
    sub.f16x2 a2, a2, c;
    sub.f16x2 a3, a3, c;
    mul.rn.f16x2 acc, a0, $2;
    fma.rn.f16x2 acc, a1, $3, acc;
    fma.rn.f16x2 acc, a2, $4, acc;
    fma.rn.f16x2 acc, a3, $5, acc;
    mov.b32 {lo, hi}, acc;
    cvt.f32.f16 flo, lo;
    cvt.f32.f16 fhi, hi;
    add.f32 $0, flo, fhi;
    }""")

    @triton.jit
    def _pack_f16_pair(a, b):
        # Two fp16 tensors -> int32 tensor with a in the low and b in the high half (an f16x2 register).
        return (a.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF) | (b.to(tl.int16, bitcast=True).to(tl.int32) << 16)

    @triton.jit
    def _nibble_one_plus(pu, i: tl.constexpr):
        # Nibble i of uint32 words -> fp32 1 + q/16 (exact): shift the code to mantissa bits 19..22 of 1.0.
        if i <= 4:
            v = pu << (19 - 4 * i)
        else:
            v = pu >> (4 * i - 19)
        return ((v & 0x00780000) | 0x3F800000).to(tl.float32, bitcast=True)

    @triton.jit
    def _w4_gemv_kernel(
        x_ptr, qw_ptr, s_ptr, m_ptr, b_ptr, y_ptr,
        N, K, stride_xm, stride_ym,
        G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        HAS_BIAS: tl.constexpr, USE_ASM: tl.constexpr,
    ):
        # grid = (M, cdiv(N, BLOCK_N)): x rows fastest so programs sharing a slab run together (L2 reuse).
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        BKW: tl.constexpr = BLOCK_K // 8   # packed K-rows (words per channel) per tile
        RPG: tl.constexpr = G // 8         # packed K-rows per group
        K8 = K // 8

        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)        # (BN,)
        n_mask = offs_n < N
        col = (offs_n // 8).to(tl.int64) * K + offs_n % 8        # (BN,) word offset of (k=0, n)
        offs_r = tl.arange(0, BKW)                               # (BKW,)
        x_row = x_ptr + pid_m.to(tl.int64) * stride_xm
        num_tiles = tl.cdiv(K8, BKW)

        shape: tl.constexpr = (BKW, BLOCK_N)
        acc = tl.zeros(shape, dtype=tl.float32)                  # elementwise partial sums, reduced at the end
        p_next = tl.load(qw_ptr + offs_r[:, None] * 8 + col[None, :],
                         mask=(offs_r < K8)[:, None] & n_mask[None, :], other=0)
        for t in range(0, num_tiles):
            rows = t * BKW + offs_r                              # (BKW,) packed row = k // 8
            r_mask = rows < K8
            mask2 = r_mask[:, None] & n_mask[None, :]
            p = p_next                                           # (BKW, BN) int32, 8 codes each
            nxt = rows + BKW                                     # prefetch the next tile during this one's math
            p_next = tl.load(qw_ptr + nxt[:, None] * 8 + col[None, :],
                             mask=(nxt < K8)[:, None] & n_mask[None, :], other=0)
            sm_off = (rows // RPG)[:, None] * N + offs_n[None, :]                     # (BKW, BN) into (K/G, N)
            sc = tl.load(s_ptr + sm_off, mask=mask2, other=0.0).to(tl.float32)
            mn = tl.load(m_ptr + sm_off, mask=mask2, other=0.0).to(tl.float32)
            xk = x_row + rows * 8                                                      # (BKW,) ptr to x[8r]
            if USE_ASM:
                x0 = tl.load(xk + 0, mask=r_mask, other=0.0)
                x1 = tl.load(xk + 1, mask=r_mask, other=0.0)
                x2 = tl.load(xk + 2, mask=r_mask, other=0.0)
                x3 = tl.load(xk + 3, mask=r_mask, other=0.0)
                x4 = tl.load(xk + 4, mask=r_mask, other=0.0)
                x5 = tl.load(xk + 5, mask=r_mask, other=0.0)
                x6 = tl.load(xk + 6, mask=r_mask, other=0.0)
                x7 = tl.load(xk + 7, mask=r_mask, other=0.0)
                xs = ((x0.to(tl.float32) + x1.to(tl.float32)) + (x2.to(tl.float32) + x3.to(tl.float32))) + \
                     ((x4.to(tl.float32) + x5.to(tl.float32)) + (x6.to(tl.float32) + x7.to(tl.float32)))
                d = tl.inline_asm_elementwise(
                    asm=_W4_DOT8_F16_ASM, constraints="=f,r,r,r,r,r",
                    args=[p,
                          tl.broadcast_to(_pack_f16_pair(x0, x4)[:, None], shape),
                          tl.broadcast_to(_pack_f16_pair(x1, x5)[:, None], shape),
                          tl.broadcast_to(_pack_f16_pair(x2, x6)[:, None], shape),
                          tl.broadcast_to(_pack_f16_pair(x3, x7)[:, None], shape)],
                    dtype=tl.float32, is_pure=True, pack=1)                           # (BKW, BN) sum_i q_i x_i
                acc += sc * d + mn * xs[:, None]
            else:
                pu = p.to(tl.uint32, bitcast=True)
                d = tl.zeros((BKW, BLOCK_N), dtype=tl.float32)
                xs = tl.zeros((BKW,), dtype=tl.float32)
                for i in tl.static_range(8):
                    xi = tl.load(xk + i, mask=r_mask, other=0.0).to(tl.float32)      # (BKW,) x[8r + i]
                    d += _nibble_one_plus(pu, i) * xi[:, None]
                    xs += xi
                # sum_i q_i x_i = 16 * (d - xs); fold into scale: sc*16*d + (mn - 16*sc)*xs
                sc16 = 16.0 * sc
                acc += sc16 * d + (mn - sc16) * xs[:, None]

        y = tl.sum(acc, axis=0)                                  # (BN,)
        if HAS_BIAS:
            y += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        tl.store(y_ptr + pid_m.to(tl.int64) * stride_ym + offs_n, y.to(y_ptr.dtype.element_ty), mask=n_mask)

    @triton.jit
    def _w4_gemm_kernel(
        x_ptr, qw_ptr, s_ptr, m_ptr, b_ptr, y_ptr,
        M, N, K, stride_xm, stride_ym,
        G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr, SPLIT_K: tl.constexpr,
        HAS_BIAS: tl.constexpr, USE_ATOMIC: tl.constexpr, DOT_F32: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ):
        # grid = (cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N), SPLIT_K)
        pid = tl.program_id(0)
        pid_k = tl.program_id(1)
        num_pid_m = tl.cdiv(M, BLOCK_M)
        num_pid_n = tl.cdiv(N, BLOCK_N)
        # Grouped ordering: GROUP_M row-blocks walk the same band of weight tiles while it is in L2.
        num_pid_in_group = GROUP_M * num_pid_n
        group_id = pid // num_pid_in_group
        first_pid_m = group_id * GROUP_M
        group_rows = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
        pid_m = first_pid_m + (pid % num_pid_in_group) % group_rows
        pid_n = (pid % num_pid_in_group) // group_rows

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_mask = offs_m < M
        n_mask = offs_n < N
        offs_k = tl.arange(0, BLOCK_K)
        col = (offs_n // 8).to(tl.int64) * K + offs_n % 8                                # (BN,)
        x_ptrs = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + offs_k[None, :]      # (BM, BK)
        # Each word is addressed once per code it holds (k // 8); the repeats hit L1/shared memory, and the
        # tile then lands in registers already in (k, n) order for the dot.
        q_ptrs = qw_ptr + (offs_k // 8 * 8)[:, None] + col[None, :]                      # (BK, BN)
        shifts = ((offs_k % 8) * 4)[:, None]                                             # (BK, 1)
        num_tiles = K // BLOCK_K  # K % G == 0 and G % BLOCK_K == 0
        tiles_per_split = tl.cdiv(num_tiles, SPLIT_K)
        t_start = pid_k * tiles_per_split
        t_end = tl.minimum(t_start + tiles_per_split, num_tiles)

        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for t in range(t_start, t_end):
            a = tl.load(x_ptrs + t * BLOCK_K, mask=m_mask[:, None], other=0.0)          # (BM, BK)
            p = tl.load(q_ptrs + t * BLOCK_K, mask=n_mask[None, :], other=0)            # (BK, BN) int32
            q = (p >> shifts) & 0xF
            g = (t * BLOCK_K) // G
            sc = tl.load(s_ptr + g * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)  # (BN,)
            mn = tl.load(m_ptr + g * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
            # 2^23 magic: OR the code into the mantissa of 8388608.0, subtract -> exact q without I2F.
            w = ((q | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0) * sc[None, :] + mn[None, :]
            if DOT_F32:
                acc = tl.dot(a.to(tl.float32), w, acc, input_precision=DOT_PRECISION)
            else:
                acc = tl.dot(a, w.to(x_ptr.dtype.element_ty), acc, input_precision=DOT_PRECISION)

        if HAS_BIAS:
            b = tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
            acc += tl.where(pid_k == 0, b, 0.0)[None, :]
        y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
        mask = m_mask[:, None] & n_mask[None, :]
        if USE_ATOMIC:
            tl.atomic_add(y_ptrs, acc, mask=mask)
        else:
            tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _w4_dequant_kernel(
        qw_ptr, s_ptr, m_ptr, w_ptr, N, K, n0, n_count,
        G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        # Writes w[k, j] = dequant(k, n0 + j) for j < n_count into a (K, n_count) row-major buffer.
        pid_k = tl.program_id(0)
        pid_n = tl.program_id(1)
        offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        offs_j = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_n = n0 + offs_j
        mask = (offs_k < K)[:, None] & (offs_j < n_count)[None, :]
        col = (offs_n // 8).to(tl.int64) * K + offs_n % 8
        p = tl.load(qw_ptr + (offs_k // 8 * 8)[:, None] + col[None, :], mask=mask, other=0)
        q = (p >> ((offs_k % 8) * 4)[:, None]) & 0xF
        sm_off = (offs_k // G)[:, None] * N + offs_n[None, :]
        sc = tl.load(s_ptr + sm_off, mask=mask, other=0.0).to(tl.float32)
        mn = tl.load(m_ptr + sm_off, mask=mask, other=0.0).to(tl.float32)
        w = ((q | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0) * sc + mn
        tl.store(w_ptr + offs_k.to(tl.int64)[:, None] * n_count + offs_j[None, :], w.to(w_ptr.dtype.element_ty),
                 mask=mask)


# ------------------------------------------------------------------------------------------------------------
# Launchers
# ------------------------------------------------------------------------------------------------------------

def _dot_flags(x: torch.Tensor) -> tuple[bool, str]:
    """(DOT_F32, DOT_PRECISION). fp32 activations use IEEE fp32 dots (no silent TF32). Triton's interpreter
    computes bf16 dots wrongly (numpy has no bf16), so there bf16 tiles are upcast to fp32 (exact products)."""
    if x.dtype == torch.float32:
        return True, "ieee"
    if x.dtype == torch.bfloat16 and x.device.type != "cuda":
        return True, "ieee"
    return False, "tf32"


def _launch_gemv(x2: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, group_size: int,
                 bias: torch.Tensor | None, cfg: GemvConfig) -> torch.Tensor:
    m, k = x2.shape
    n = qweight.shape[0] * INT4_TILE_N
    if cfg.block_k % group_size or cfg.block_n % INT4_TILE_N:
        raise ValueError(f"GEMV block_k={cfg.block_k} must be a multiple of group_size={group_size} and "
                         f"block_n={cfg.block_n} a multiple of {INT4_TILE_N}")
    asm_ok = x2.dtype == torch.float16 and x2.is_cuda and not interpreting()
    use_asm = asm_ok if cfg.use_asm is None else (cfg.use_asm and asm_ok)
    y = torch.empty(m, n, device=x2.device, dtype=x2.dtype)
    grid = (m, triton.cdiv(n, cfg.block_n))
    _w4_gemv_kernel[grid](
        x2, qweight, scales, mins, bias if bias is not None else scales, y,
        n, k, x2.stride(0), y.stride(0),
        G=group_size, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, HAS_BIAS=bias is not None, USE_ASM=use_asm,
        num_warps=cfg.num_warps, num_stages=1,
    )
    return y


def _launch_gemm(x2: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, group_size: int,
                 bias: torch.Tensor | None, cfg: GemmConfig) -> torch.Tensor:
    m, k = x2.shape
    n = qweight.shape[0] * INT4_TILE_N
    if group_size % cfg.block_k:
        raise ValueError(f"GEMM block_k={cfg.block_k} must divide group_size={group_size}")
    dot_f32, precision = _dot_flags(x2)
    use_atomic = cfg.split_k > 1
    # split-K partial sums meet in an fp32 buffer (atomics), cast to x.dtype afterwards
    y = (torch.zeros if use_atomic else torch.empty)(m, n, device=x2.device,
                                                     dtype=torch.float32 if use_atomic else x2.dtype)
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n), cfg.split_k)
    _w4_gemm_kernel[grid](
        x2, qweight, scales, mins, bias if bias is not None else scales, y, m, n, k, x2.stride(0), y.stride(0),
        G=group_size, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        SPLIT_K=cfg.split_k, HAS_BIAS=bias is not None, USE_ATOMIC=use_atomic, DOT_F32=dot_f32,
        DOT_PRECISION=precision, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return y.to(x2.dtype) if use_atomic else y


def w4a16_dequantize(qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, group_size: int,
                     dtype: torch.dtype, n0: int = 0, n_count: int | None = None) -> torch.Tensor:
    """Dequantize output channels [n0, n0 + n_count) into a (K, n_count) tensor of `dtype` with the Triton
    kernel (W transposed, the orientation torch.matmul(x, w) wants)."""
    k = qweight.shape[1] * 8
    n = qweight.shape[0] * INT4_TILE_N
    n_count = n - n0 if n_count is None else n_count
    w = torch.empty(k, n_count, device=qweight.device, dtype=dtype)
    bk, bn = (64, 64) if use_fixed_config(qweight.device) else (64, 128)
    grid = (triton.cdiv(k, bk), triton.cdiv(n_count, bn))
    _w4_dequant_kernel[grid](qweight, scales, mins, w, n, k, n0, n_count, G=group_size, BLOCK_N=bn, BLOCK_K=bk,
                             num_warps=4)
    return w


def _dequant_matmul(x2: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor,
                    group_size: int, bias: torch.Tensor | None) -> torch.Tensor:
    """Long prefill: dequantize W in column chunks (workspace <= DEQUANT_WORKSPACE_BYTES) and use cuBLAS."""
    m, k = x2.shape
    n = qweight.shape[0] * INT4_TILE_N
    chunk = max(INT4_TILE_N, DEQUANT_WORKSPACE_BYTES // (k * x2.element_size()) // 128 * 128)
    if chunk >= n:
        w = w4a16_dequantize(qweight, scales, mins, group_size, x2.dtype)  # (K, N)
        y = torch.matmul(x2, w)
    else:
        y = torch.empty(m, n, device=x2.device, dtype=x2.dtype)
        for n0 in range(0, n, chunk):
            nc = min(chunk, n - n0)
            w = w4a16_dequantize(qweight, scales, mins, group_size, x2.dtype, n0, nc)  # (K, nc)
            y[:, n0:n0 + nc] = torch.matmul(x2, w)
    if bias is not None:
        y += bias.to(y.dtype)
    return y


# Mid-size prefill config chosen by timing the candidates once per (M bucket, N, K, G, dtype, device).
_TUNED: dict[tuple, GemmConfig] = {}


def _time_config(fn, reps: int = 5) -> float:
    fn()  # compile + warm up
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps


def _tuned_gemm_config(x2: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor,
                       group_size: int) -> GemmConfig:
    m, k = x2.shape
    n = qweight.shape[0] * INT4_TILE_N
    key = (min(triton.next_power_of_2(m), DEQUANT_MIN_M), n, k, group_size, x2.dtype, x2.device)
    cfg = _TUNED.get(key)
    if cfg is not None:
        return cfg
    cands = _gemm_candidates(m, n, k, group_size, x2.device)
    if torch.cuda.is_current_stream_capturing():  # no timing inside a CUDA graph capture
        return cands[0]
    times = [(_time_config(lambda c=c: _launch_gemm(x2, qweight, scales, mins, group_size, None, c)), i)
             for i, c in enumerate(cands)]
    cfg = cands[min(times)[1]]
    _TUNED[key] = cfg
    return cfg


def w4a16_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, group_size: int,
                 bias: torch.Tensor | None = None, *, backend: str = "auto",
                 config: GemvConfig | GemmConfig | None = None) -> torch.Tensor:
    """y (..., N) = x (..., K) @ dequant(W).T (+ bias), in x.dtype.

    backend: "auto" -- Triton on CUDA tensors when Triton is installed, else the torch reference;
             "triton" -- force the kernels (CPU tensors need TRITON_INTERPRET=1); "torch" -- the reference.
    config:  override the tiling (tests use it for small tiles and split-K): a GemvConfig selects the GEMV
             kernel, a GemmConfig the tl.dot kernel. By default M <= GEMV_MAX_M -> GEMV; M <= SKINNY_MAX_M ->
             tl.dot with 16-row tiles and split-K; M < DEQUANT_MIN_M -> tl.dot (timed once per shape on CUDA);
             larger M -> dequantize + torch.matmul.
    """
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    n, k = _check_args(x, qweight, scales, mins, group_size, bias)
    if backend == "torch" or (backend == "auto" and not (x.is_cuda and triton_supports(x.device))):
        return w4a16_reference(x, qweight, scales, mins, group_size, bias)
    if not triton_supports(x.device):
        raise RuntimeError(f"Triton kernels cannot run on {x.device} here (install triton, or set TRITON_INTERPRET=1 "
                           "for CPU tensors)")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"activations must be float16, bfloat16 or float32, got {x.dtype}")
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    if m == 0:
        return x.new_empty(*x.shape[:-1], n)
    device = x.device
    if isinstance(config, GemvConfig) or (config is None and m <= GEMV_MAX_M):
        y = _launch_gemv(x2, qweight, scales, mins, group_size, bias,
                         config or _default_gemv_config(m, n, k, group_size, device))
    elif isinstance(config, GemmConfig):
        y = _launch_gemm(x2, qweight, scales, mins, group_size, bias, config)
    elif m <= SKINNY_MAX_M:
        y = _launch_gemm(x2, qweight, scales, mins, group_size, bias,
                         _default_skinny_config(m, n, k, group_size, device))
    elif use_fixed_config(device):
        y = _launch_gemm(x2, qweight, scales, mins, group_size, bias,
                         GemmConfig(block_m=32, block_n=32, block_k=min(group_size, 32), group_m=4, num_stages=1))
    elif m >= DEQUANT_MIN_M:
        y = _dequant_matmul(x2, qweight, scales, mins, group_size, bias)
    else:
        y = _launch_gemm(x2, qweight, scales, mins, group_size, bias,
                         _tuned_gemm_config(x2, qweight, scales, mins, group_size))
    return y.reshape(*x.shape[:-1], n)
