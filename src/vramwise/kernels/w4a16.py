"""W4A16 matmul: y = x @ dequant(W).T with int4 weights (group-wise scale + min) and 16/32-bit activations.

Weight layout (vramwise.quant.formats, docs/quant-format.md), N = out_features, K = in_features:
    qweight int32 (N // 8, K // 8, 8): qweight[b, r, c] = codes q[8b + c, 8r + i] in bits [4i, 4i + 4)
    scales, mins fp16 (K // G, N):     w[n, k] = q[n, k] * scales[k // G, n] + mins[k // G, n]
The word holding (k, n) sits at flat offset (n // 8) * K + (k // 8) * 8 + n % 8.

Kernels (all fuse the dequantization, so weights are read from memory once, as int4). Version 1 kernels are
the defaults measured on the H100 before first-use tuning existed; version 2 were written against the sm_90
SASS of their loops (instruction counts from ptxas here, no GPU), and the choice between them is timed.

* ``_w4_gemv_kernel`` (v1) -- decode, one row of x per program row (M <= GEMV_MAX_M). A program owns
  BLOCK_N (= 8) output channels, i.e. one contiguous (K/8, 8) slab, and streams it in (BLOCK_K/8, 8)
  word tiles, prefetching the next tile while it computes on the current one. Products are accumulated
  elementwise in registers and reduced over K once at the end (no shuffles in the loop). Scale and min
  are applied per word: sum_i w_i x_i = scale * sum_i q_i x_i + min * sum_i x_i.
  Two inner paths:
    - fp16 activations on CUDA: inline PTX turns a word into four f16x2 pairs with the 0x6400 magic number
      (LOP3 + HSUB2) and does the 8 products with HFMA2 (fp16 products, fp32 across words).
    - everything else (bf16/fp32, Triton's CPU interpreter): fp32 math. A code is placed in the top
      mantissa bits of 1.0 (f = 1 + q/16, exact, one shift + one LOP3 + bitcast, no int->float convert),
      so sum_i q_i x_i = 16 * (sum_i f_i x_i - sum_i x_i).
  The loop is issue-bound (v1 fp16: 32.5 SASS instructions per weight word; bf16: 45), which is why it
  reached only 0.63 of the copy bandwidth.
* ``_w4_gemv2_kernel`` (v2, fp16/bf16) -- same structure with less work per word: x read as int32 pair words
  (4 loads per packed row, f16x2 operands in two bit operations), one shift per word in the fp16 PTX (odd
  codes fixed in place by an exact fma), a bf16x2 PTX path, the x row sum in PTX, 32-bit offsets with
  contiguity hints (128-bit weight loads) and no masks on even shapes: 23.5-26.6 instructions per word (fp16),
  25.5-27.7 (bf16), depending on BLOCK_N x BLOCK_K.
* GEMV epilogues (both versions, EPILOGUE constexpr): 1 = the residual add after the projection (y = W x +
  residual; the down_proj of a decoder layer), 2 = SwiGLU over a fused [gate | up] weight (a program reads
  BLOCK_N gate channels' slabs and the matching up channels' slabs, layout unchanged, and stores
  silu(gate) * up). Each saves a launch and a round trip of the activations per layer in a decode step; the
  numerics are the unfused path's (``w4a16_matmul_add``, ``w4a16_matmul_silu_mul``).
* ``_w4_gemm_kernel`` (v1) -- skinny batches and mid-size prefill: tl.dot on dequantized (BLOCK_K, BLOCK_N)
  tiles in the activation dtype, fp32 accumulation, optional split-K (fp32 atomics, then cast). Each word
  is addressed once per code it holds. BLOCK_K divides the group size (one scale/min per channel per tile).
* ``_w4_gemm2_kernel`` (v2) -- the same GEMM loading each (BLOCK_K/8, BLOCK_N) word tile once; the nibbles
  are unpacked with tl.join so they stay in the thread that loaded the word (128-bit stores of the tile to
  shared memory for wgmma), fp16 dequant math for fp16 x (HADD2/HFMA2 pairs): 7.4-8.1 instructions per
  element and tile for 128x128 / 256x128 tiles; large tiles and wave-filling split-K for prefill.
* ``_w4_dequant_kernel`` (v1) / ``_w4_dequant2_kernel`` (v2, word loaded once) + torch.matmul -- long
  prefills: dequantize W in column chunks into a bounded workspace and let cuBLAS run. Writing W in fp16
  costs ~47 us for 13824 x 5120, so this cannot reach 1.3x an fp16 matmul; it stays a timed candidate.

Choice (``choose_config``): on CUDA with AUTOTUNE, a short candidate list per (M bucket, N, K, G, dtype),
the fixed default first, each timed at first use in interleaved rounds (for M <= 64 a CUDA graph of calls over
weight copies larger than L2, as a model step runs them; larger M single calls with CUDA events) and checked
against the default's output; the fastest correct one is cached. During CUDA-graph capture an untuned
shape gets the fixed default. AUTOTUNE = False (and the interpreter) use the fixed defaults.

``w4a16_reference`` is the torch path (CPU and fallback) and the test oracle: it dequantizes to x.dtype in
row chunks (bounded temporary memory, nothing cached) and calls torch.matmul.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from ..memory.budget import dequant_chunk_columns
from ..quant.formats import INT4_TILE_N, dequantize_int4
from ._triton import HAS_PDL  # noqa: F401 - re-exported: the sm_90 compile test builds the PDL path where it exists
from ._triton import HAS_TRITON, interpreting, pdl_launch_args, sm_count, triton_supports, use_fixed_config
from .timing import graph_time_per_call

if HAS_TRITON:
    import triton
    import triton.language as tl

    from ._triton import grouped_tile, pdl_wait

__all__ = ["w4a16_reference", "w4a16_matmul", "w4a16_matmul_add", "w4a16_matmul_silu_mul", "w4a16_dequantize",
           "GemvConfig", "GemmConfig", "DequantConfig", "choose_config", "AUTOTUNE", "EPILOGUES",
           "SWIGLU_EPILOGUE",
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
    use_asm: None = the inline-PTX path where possible (on CUDA, not interpreting; version 1: fp16 only,
    version 2: fp16 and bf16). version 1 = ``_w4_gemv_kernel``, 2 = ``_w4_gemv2_kernel``."""
    block_n: int = 8
    block_k: int = 1024
    num_warps: int = 4
    use_asm: bool | None = None
    version: int = 1
    prefetch_all: bool = True  # version 2: scales, mins and x of the next tile prefetched with its words


@dataclass(frozen=True)
class GemmConfig:
    """tl.dot kernel tiling. block_k must divide the group size; block_n a multiple of 8.
    version 1 = ``_w4_gemm_kernel`` (each word addressed once per code), 2 = ``_w4_gemm2_kernel`` (each word
    loaded once per tile, block_k a multiple of 8); swap_ab (version 2 only) computes y^T = W x^T so the
    dequantized tile is the dot's first operand (registers) and x^T the second."""
    block_m: int = 64
    block_n: int = 64
    block_k: int = 32
    group_m: int = 8
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 2
    version: int = 1
    swap_ab: bool = False
    prefetch: bool = False


@dataclass(frozen=True)
class DequantConfig:
    """Long-prefill path: dequantize W into a (K, N) workspace, then torch.matmul (cuBLAS).
    version 1 = ``_w4_dequant_kernel`` (word addressed per code), 2 = ``_w4_dequant2_kernel`` (once per tile)."""
    version: int = 1


def _choose_split_k(programs: int, k_tiles: int, device: torch.device, min_tiles_per_split: int = 4,
                    per_sm: int = 4) -> int:
    """Split K until the grid has ~per_sm programs per SM, keeping >= min_tiles_per_split K-tiles per split."""
    target = per_sm * sm_count(device)
    if programs >= target:
        return 1
    return max(1, min(math.ceil(target / programs), k_tiles // min_tiles_per_split))


def _default_gemv_config(m: int, n: int, k: int, group_size: int, device: torch.device,
                         dtype: torch.dtype | None = None) -> GemvConfig:
    if use_fixed_config(device):
        return GemvConfig(block_n=8, block_k=max(group_size, 64), num_warps=1)  # small tiles: fast in numpy
    if dtype in (torch.float16, torch.bfloat16):
        # v2 with the next tile's scales, mins and x prefetched (GemvConfig.prefetch_all) and 4 warps, timed on an
        # H200 in CUDA graphs over weight copies larger than L2 (7B/13B fused decode shapes, g128, fp16 and bf16):
        # 8 channels x 1024-deep tiles on the 4096/5120-deep layers (7B QKV 12.2 -> 11.3 us, gate+up 19.0 ->
        # 17.9, 13B q 9.4 -> 7.0, up 15.5 -> 14.7 against the earlier 8/4-warp defaults without it), 16 channels
        # on the 4096-wide outputs (7B o 5.5 -> 4.8, down 11.6 -> 10.7: twice the programs' bytes, one wave),
        # 2048-deep tiles on the 13824-deep down_proj (22.1 -> 14.9). With 8 warps the prefetch made the
        # narrow layers slower (7B down 15.3 us).
        if n <= 4096:
            return GemvConfig(16, max(1024, group_size), 4, None, 2)
        return GemvConfig(8, max(2048 if k >= 8192 else 1024, group_size), 4, None, 2)
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
    def _gemv_columns(pid_n, N, BLOCK_N: tl.constexpr, EPILOGUE: tl.constexpr):
        # The BLOCK_N weight columns (output channels of W) program pid_n reads, and their mask.
        # EPILOGUE == 2 (SwiGLU over W = [gate | up], N = 2I): gate channels [pid_n * HB, pid_n * HB + HB) and
        # the matching up channels I + those (HB = BLOCK_N // 2, a multiple of 8: whole slabs, and I % 8 == 0,
        # so every run of 8 columns is one slab and starts at a multiple of 8); the mask is on the gate index.
        # Otherwise: columns [pid_n * BLOCK_N, pid_n * BLOCK_N + BLOCK_N).
        if EPILOGUE == 2:
            HB: tl.constexpr = BLOCK_N // 2
            j = tl.arange(0, BLOCK_N)
            ch = pid_n * HB + j % HB                                 # (BN,) gate channel of each column
            half = N // 2
            offs_n = tl.max_contiguous(tl.multiple_of(ch + (j // HB) * half, 8), 8)
            n_mask = ch < half
        else:
            offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            n_mask = offs_n < N
        return offs_n, n_mask

    @triton.jit
    def _gemv_epilogue(y, offs_n, n_mask, pid_m, pid_n, N, b_ptr, r_ptr, y_ptr, stride_rm, stride_ym,
                       BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr, EPILOGUE: tl.constexpr):
        # y (BN,) fp32 sums of the program's columns (see _gemv_columns) -> stores of one output row.
        #   0: y (+ bias)                                   -> y_ptr[m, offs_n]
        #   1: (y (+ bias)) + residual[m, offs_n]          -> y_ptr[m, offs_n]        (N outputs)
        #   2: silu(gate) * up of (y (+ bias)) = [gate | up] -> y_ptr[m, ch]           (N / 2 outputs)
        # Modes 1 and 2 round y to the output dtype first, as the unfused GEMV's store does, then do the
        # unfused op's math (torch's add: fp32 sum, one rounding; kernels/fused.py's SwiGLU kernel), so a
        # fused step gives the unfused step's bits.
        out_ty = y_ptr.dtype.element_ty
        if HAS_BIAS:
            y += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        row = y_ptr + pid_m.to(tl.int64) * stride_ym
        if EPILOGUE == 0:
            tl.store(row + offs_n, y.to(out_ty), mask=n_mask)
        elif EPILOGUE == 1:
            r = tl.load(r_ptr + pid_m.to(tl.int64) * stride_rm + offs_n, mask=n_mask, other=0.0).to(tl.float32)
            tl.store(row + offs_n, (y.to(out_ty).to(tl.float32) + r).to(out_ty), mask=n_mask)
        else:
            HB: tl.constexpr = BLOCK_N // 2
            yv = tl.reshape(y.to(out_ty).to(tl.float32), (2, HB))   # row 0: gate, row 1: up
            g, u = tl.split(tl.permute(yv, (1, 0)))                  # (HB,), (HB,)
            act = (g / (1.0 + tl.exp(-g))).to(out_ty).to(tl.float32)  # F.silu rounds before the multiply
            ch = pid_n * HB + tl.arange(0, HB)
            tl.store(row + ch, (act * u).to(out_ty), mask=ch < N // 2)

    @triton.jit
    def _w4_gemv_kernel(
        x_ptr, qw_ptr, s_ptr, m_ptr, b_ptr, r_ptr, y_ptr,
        N, K, stride_xm, stride_rm, stride_ym,
        G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        HAS_BIAS: tl.constexpr, USE_ASM: tl.constexpr, EPILOGUE: tl.constexpr,
        PDL: tl.constexpr = False,  # programmatic dependent launch: see _triton.pdl_wait
    ):
        # grid = (M, cdiv(N, BLOCK_N)), or (M, cdiv(N / 2, BLOCK_N / 2)) for EPILOGUE == 2: x rows fastest so
        # programs sharing a slab run together (L2 reuse). EPILOGUE: see _gemv_epilogue (r_ptr: the residual).
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        BKW: tl.constexpr = BLOCK_K // 8   # packed K-rows (words per channel) per tile
        RPG: tl.constexpr = G // 8         # packed K-rows per group
        K8 = K // 8

        offs_n, n_mask = _gemv_columns(pid_n, N, BLOCK_N, EPILOGUE)  # (BN,)
        col = (offs_n // 8).to(tl.int64) * K + offs_n % 8        # (BN,) word offset of (k=0, n)
        offs_r = tl.arange(0, BKW)                               # (BKW,)
        x_row = x_ptr + pid_m.to(tl.int64) * stride_xm
        num_tiles = tl.cdiv(K8, BKW)

        shape: tl.constexpr = (BKW, BLOCK_N)
        acc = tl.zeros(shape, dtype=tl.float32)                  # elementwise partial sums, reduced at the end
        p_next = tl.load(qw_ptr + offs_r[:, None] * 8 + col[None, :],
                         mask=(offs_r < K8)[:, None] & n_mask[None, :], other=0)
        # Tile 0 of the weights (static) is in flight; x and the residual come from the kernel before.
        pdl_wait(PDL)
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
        _gemv_epilogue(y, offs_n, n_mask, pid_m, pid_n, N, b_ptr, r_ptr, y_ptr, stride_rm, stride_ym,
                       BLOCK_N, HAS_BIAS, EPILOGUE)

    @triton.jit
    def _w4_gemm_kernel(
        x_ptr, qw_ptr, s_ptr, m_ptr, b_ptr, y_ptr,
        M, N, K, stride_xm, stride_ym,
        G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr, SPLIT_K: tl.constexpr,
        HAS_BIAS: tl.constexpr, USE_ATOMIC: tl.constexpr, DOT_F32: tl.constexpr, DOT_PRECISION: tl.constexpr,
        PDL: tl.constexpr = False,  # programmatic dependent launch: see _triton.pdl_wait
    ):
        pdl_wait(PDL)  # reads what the kernel before wrote: after this
        # grid = (cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N), SPLIT_K)
        pid = tl.program_id(0)
        pid_k = tl.program_id(1)
        pid_m, pid_n = grouped_tile(pid, M, N, BLOCK_M, BLOCK_N, GROUP_M)  # L2-friendly order

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

    # ---- version 2 kernels ---------------------------------------------------------------------------------

    # Like _W4_DOT8_F16_ASM with one shift per word instead of three: the odd codes are taken in place
    # ((w & 0x00F000F0) | 0x6400 is 1024 + 16q) and fixed by one exact fma (v/16 - 64 = q).
    # $1: the word; $2..$5: activation pairs (x_j | x_{j+4} << 16), j = 0..3; $0 (f32): sum_i q_i x_i.
    _W4_DOT8_F16_ASM_V2 = tl.constexpr("""{
    .reg .b32 a0, a1, a2, a3, t, acc, c, k16, k64;
    .reg .f16 lo, hi;
    .reg .f32 flo, fhi;
    mov.b32 c, 0x64006400;
    mov.b32 k16, 0x2C002C00;
    mov.b32 k64, 0xD400D400;
    lop3.b32 a0, $1, 0x000F000F, c, 0xEA;
    lop3.b32 a1, $1, 0x00F000F0, c, 0xEA;
    shr.u32 t, $1, 8;
    lop3.b32 a2, t, 0x000F000F, c, 0xEA;
    lop3.b32 a3, t, 0x00F000F0, c, 0xEA;
    sub.f16x2 a0, a0, c;
    fma.rn.f16x2 a1, a1, k16, k64;
    sub.f16x2 a2, a2, c;
    fma.rn.f16x2 a3, a3, k16, k64;
    mul.rn.f16x2 acc, a0, $2;
    fma.rn.f16x2 acc, a1, $3, acc;
    fma.rn.f16x2 acc, a2, $4, acc;
    fma.rn.f16x2 acc, a3, $5, acc;
    mov.b32 {lo, hi}, acc;
    cvt.f32.f16 flo, lo;
    cvt.f32.f16 fhi, hi;
    add.f32 $0, flo, fhi;
    }""")

    # bf16 version: (w & 0x000F000F) | 0x43004300 is the bf16x2 pair (128 + q_j, 128 + q_{j+4}) (7-bit
    # mantissa: no room for the in-place trick, so three shifts); fma(v, 1, -128) = q exactly. Products are
    # summed in bf16 (4 per lane), then the two lanes in fp32 (bf16 -> f32 is a 16-bit shift).
    _W4_DOT8_BF16_ASM = tl.constexpr("""{
    .reg .b32 a0, a1, a2, a3, t, acc, c, one, n128, z;
    .reg .f32 flo, fhi;
    mov.b32 c, 0x43004300;
    mov.b32 one, 0x3F803F80;
    mov.b32 n128, 0xC300C300;
    mov.b32 z, 0x80008000;
    lop3.b32 a0, $1, 0x000F000F, c, 0xEA;
    shr.u32 t, $1, 4;
    lop3.b32 a1, t, 0x000F000F, c, 0xEA;
    shr.u32 t, $1, 8;
    lop3.b32 a2, t, 0x000F000F, c, 0xEA;
    shr.u32 t, $1, 12;
    lop3.b32 a3, t, 0x000F000F, c, 0xEA;
    fma.rn.bf16x2 a0, a0, one, n128;
    fma.rn.bf16x2 a1, a1, one, n128;
    fma.rn.bf16x2 a2, a2, one, n128;
    fma.rn.bf16x2 a3, a3, one, n128;
    fma.rn.bf16x2 acc, a0, $2, z;
    fma.rn.bf16x2 acc, a1, $3, acc;
    fma.rn.bf16x2 acc, a2, $4, acc;
    fma.rn.bf16x2 acc, a3, $5, acc;
    shl.b32 t, acc, 16;
    mov.b32 flo, t;
    and.b32 t, acc, 0xFFFF0000;
    mov.b32 fhi, t;
    add.f32 $0, flo, fhi;
    }""")

    # Sum of the 8 fp16 values in 4 pair words ($1..$4), exact conversions, fp32 adds -> $0.
    _X8_SUM_F16_ASM = tl.constexpr("""{
    .reg .f16 l0, h0, l1, h1, l2, h2, l3, h3;
    .reg .f32 fa, fb, fc, fd, fe, ff, fg, fh;
    mov.b32 {l0, h0}, $1;
    mov.b32 {l1, h1}, $2;
    mov.b32 {l2, h2}, $3;
    mov.b32 {l3, h3}, $4;
    cvt.f32.f16 fa, l0;
    cvt.f32.f16 fb, h0;
    cvt.f32.f16 fc, l1;
    cvt.f32.f16 fd, h1;
    cvt.f32.f16 fe, l2;
    cvt.f32.f16 ff, h2;
    cvt.f32.f16 fg, l3;
    cvt.f32.f16 fh, h3;
    add.f32 fa, fa, fb;
    add.f32 fc, fc, fd;
    add.f32 fe, fe, ff;
    add.f32 fg, fg, fh;
    add.f32 fa, fa, fc;
    add.f32 fe, fe, fg;
    add.f32 $0, fa, fe;
    }""")

    @triton.jit
    def _half_lo_f32(w, IS_BF16: tl.constexpr):
        # Low 16-bit half of uint32 words, read as fp16/bf16 -> fp32 (exact).
        if IS_BF16:
            return (w << 16).to(tl.float32, bitcast=True)
        return (w & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)

    @triton.jit
    def _half_hi_f32(w, IS_BF16: tl.constexpr):
        if IS_BF16:
            return (w & 0xFFFF0000).to(tl.float32, bitcast=True)
        return (w >> 16).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)

    @triton.jit
    def _gemv2_tile(acc, p, sc, mn, w0, w1, w2, w3, BKW: tl.constexpr, BLOCK_N: tl.constexpr,
                    USE_ASM: tl.constexpr, X_BF16: tl.constexpr):
        # acc (BKW, BN) += per-word sums of one tile: p (BKW, BN) words, sc/mn (BKW, BN) fp32, w0..w3 (BKW,)
        # uint32 x pair words of each packed row.
        shape: tl.constexpr = (BKW, BLOCK_N)
        if USE_ASM and not X_BF16:
            xs = tl.inline_asm_elementwise(
                asm=_X8_SUM_F16_ASM, constraints="=f,r,r,r,r",
                args=[w0.to(tl.int32, bitcast=True), w1.to(tl.int32, bitcast=True),
                      w2.to(tl.int32, bitcast=True), w3.to(tl.int32, bitcast=True)],
                dtype=tl.float32, is_pure=True, pack=1)                                # (BKW,) fp32
        else:
            x0 = _half_lo_f32(w0, X_BF16)
            x1 = _half_hi_f32(w0, X_BF16)
            x2 = _half_lo_f32(w1, X_BF16)
            x3 = _half_hi_f32(w1, X_BF16)
            x4 = _half_lo_f32(w2, X_BF16)
            x5 = _half_hi_f32(w2, X_BF16)
            x6 = _half_lo_f32(w3, X_BF16)
            x7 = _half_hi_f32(w3, X_BF16)
            xs = ((x0 + x1) + (x2 + x3)) + ((x4 + x5) + (x6 + x7))                  # (BKW,) fp32
        if USE_ASM:
            p04 = ((w0 & 0xFFFF) | (w2 << 16)).to(tl.int32, bitcast=True)           # (x0 | x4 << 16)
            p15 = ((w0 >> 16) | (w2 & 0xFFFF0000)).to(tl.int32, bitcast=True)      # (x1 | x5 << 16)
            p26 = ((w1 & 0xFFFF) | (w3 << 16)).to(tl.int32, bitcast=True)
            p37 = ((w1 >> 16) | (w3 & 0xFFFF0000)).to(tl.int32, bitcast=True)
            if X_BF16:
                d = tl.inline_asm_elementwise(
                    asm=_W4_DOT8_BF16_ASM, constraints="=f,r,r,r,r,r",
                    args=[p, tl.broadcast_to(p04[:, None], shape), tl.broadcast_to(p15[:, None], shape),
                          tl.broadcast_to(p26[:, None], shape), tl.broadcast_to(p37[:, None], shape)],
                    dtype=tl.float32, is_pure=True, pack=1)
            else:
                d = tl.inline_asm_elementwise(
                    asm=_W4_DOT8_F16_ASM_V2, constraints="=f,r,r,r,r,r",
                    args=[p, tl.broadcast_to(p04[:, None], shape), tl.broadcast_to(p15[:, None], shape),
                          tl.broadcast_to(p26[:, None], shape), tl.broadcast_to(p37[:, None], shape)],
                    dtype=tl.float32, is_pure=True, pack=1)
            acc += sc * d          # two fma per word (a sum of both products costs a third op)
            acc += mn * xs[:, None]
        else:
            pu = p.to(tl.uint32, bitcast=True)
            d = _nibble_one_plus(pu, 0) * x0[:, None] + _nibble_one_plus(pu, 1) * x1[:, None]
            d += _nibble_one_plus(pu, 2) * x2[:, None] + _nibble_one_plus(pu, 3) * x3[:, None]
            d += _nibble_one_plus(pu, 4) * x4[:, None] + _nibble_one_plus(pu, 5) * x5[:, None]
            d += _nibble_one_plus(pu, 6) * x6[:, None] + _nibble_one_plus(pu, 7) * x7[:, None]
            sc16 = 16.0 * sc                                     # sum_i q_i x_i = 16 * (d - xs)
            acc += sc16 * d + (mn - sc16) * xs[:, None]
        return acc

    @triton.jit
    def _w4_gemv2_kernel(
        xw_ptr, qw_ptr, s_ptr, m_ptr, b_ptr, r_ptr, y_ptr,
        N, K, stride_xwm, stride_rm, stride_ym,
        G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        HAS_BIAS: tl.constexpr, USE_ASM: tl.constexpr, X_BF16: tl.constexpr, EVEN_N: tl.constexpr,
        EPILOGUE: tl.constexpr, PREFETCH_ALL: tl.constexpr = True,
        PDL: tl.constexpr = False,  # programmatic dependent launch: see _triton.pdl_wait
    ):
        # As _w4_gemv_kernel, with the per-word overhead cut (the loop is issue-bound, not memory-bound):
        #  * x (fp16/bf16) is read as int32 pair words: xw[m, 4r + j] = (x[8r + 2j], x[8r + 2j + 1]); 4 loads
        #    per packed row instead of 8, and the f16x2/bf16x2 operands are two bit operations per pair;
        #  * 32-bit offsets with contiguity hints (128-bit weight loads), no masks in the loop: it runs over the
        #    whole tiles (the prefetch after the last one re-reads it), a masked step does the K tail, and
        #    EVEN_N (no channel of the grid is past the end: N % BLOCK_N == 0, or (N / 2) % (BLOCK_N / 2) == 0
        #    for EPILOGUE == 2) drops the channel mask.
        # grid = (M, cdiv(N, BLOCK_N)), or (M, cdiv(N / 2, BLOCK_N / 2)) for EPILOGUE == 2 (see _gemv_epilogue).
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        BKW: tl.constexpr = BLOCK_K // 8
        RPG: tl.constexpr = G // 8
        K8 = K // 8

        offs_n, n_mask = _gemv_columns(pid_n, N, BLOCK_N, EPILOGUE)                # (BN,)
        col = (offs_n // 8) * K + offs_n % 8                                       # (BN,) word of (k=0, n)
        col = tl.max_contiguous(tl.multiple_of(col, 8), 8)
        offs_r = tl.arange(0, BKW)                                                 # (BKW,)
        q_ptrs = qw_ptr + (offs_r * 8)[:, None] + col[None, :]                     # (BKW, BN)
        s_ptrs = s_ptr + (offs_r // RPG * N)[:, None] + offs_n[None, :]            # (BKW, BN) into (K/G, N)
        m_ptrs = m_ptr + (offs_r // RPG * N)[:, None] + offs_n[None, :]
        x_ptrs = xw_ptr + pid_m * stride_xwm + offs_r * 4                          # (BKW,) pair words of row r
        num_full = K8 // BKW
        QSTEP: tl.constexpr = BKW * 8                                              # words per tile
        SSTEP = (BKW // RPG) * N                                                   # scale elements per tile
        XSTEP: tl.constexpr = BKW * 4                                              # x pair words per tile

        acc = tl.zeros((BKW, BLOCK_N), dtype=tl.float32)
        full_mask = (offs_r < K8)[:, None]
        if not EVEN_N:
            full_mask = full_mask & n_mask[None, :]
        p_next = tl.load(q_ptrs, mask=full_mask, other=0)                          # tile 0 (masked once)
        if PREFETCH_ALL:
            # Tile 0's scales and mins too (static, like the words), and x below once it is written: the loop
            # then waits only on loads issued a tile earlier, not on scale loads issued in the same iteration
            # (measured with benchmarks/sweep_gemv_prefetch.py, RESULTS.md session 6).
            sc_next = tl.load(s_ptrs, mask=full_mask, other=0.0)
            mn_next = tl.load(m_ptrs, mask=full_mask, other=0.0)
        # Tile 0 of the weights (static) is in flight; x and the residual come from the kernel before.
        pdl_wait(PDL)
        if PREFETCH_ALL:
            x_mask = offs_r < K8
            w0n = tl.load(x_ptrs + 0, mask=x_mask, other=0)
            w1n = tl.load(x_ptrs + 1, mask=x_mask, other=0)
            w2n = tl.load(x_ptrs + 2, mask=x_mask, other=0)
            w3n = tl.load(x_ptrs + 3, mask=x_mask, other=0)
        for t in range(0, num_full):
            p = p_next
            tn = tl.minimum(t + 1, num_full - 1)                                   # prefetch the next tile
            nxt = q_ptrs + tn * QSTEP
            if EVEN_N:
                p_next = tl.load(nxt)
            else:
                p_next = tl.load(nxt, mask=n_mask[None, :], other=0)
            if PREFETCH_ALL:
                sc = sc_next.to(tl.float32)
                mn = mn_next.to(tl.float32)
                w0 = w0n.to(tl.uint32, bitcast=True)                               # (x0, x1)
                w1 = w1n.to(tl.uint32, bitcast=True)                               # (x2, x3)
                w2 = w2n.to(tl.uint32, bitcast=True)                               # (x4, x5)
                w3 = w3n.to(tl.uint32, bitcast=True)                               # (x6, x7)
                if EVEN_N:
                    sc_next = tl.load(s_ptrs + tn * SSTEP)
                    mn_next = tl.load(m_ptrs + tn * SSTEP)
                else:
                    sc_next = tl.load(s_ptrs + tn * SSTEP, mask=n_mask[None, :], other=0.0)
                    mn_next = tl.load(m_ptrs + tn * SSTEP, mask=n_mask[None, :], other=0.0)
                xn = x_ptrs + tn * XSTEP
                w0n = tl.load(xn + 0)
                w1n = tl.load(xn + 1)
                w2n = tl.load(xn + 2)
                w3n = tl.load(xn + 3)
            else:
                if EVEN_N:
                    sc = tl.load(s_ptrs + t * SSTEP).to(tl.float32)
                    mn = tl.load(m_ptrs + t * SSTEP).to(tl.float32)
                else:
                    sc = tl.load(s_ptrs + t * SSTEP, mask=n_mask[None, :], other=0.0).to(tl.float32)
                    mn = tl.load(m_ptrs + t * SSTEP, mask=n_mask[None, :], other=0.0).to(tl.float32)
                xk = x_ptrs + t * XSTEP
                w0 = tl.load(xk + 0).to(tl.uint32, bitcast=True)                   # (x0, x1)
                w1 = tl.load(xk + 1).to(tl.uint32, bitcast=True)                   # (x2, x3)
                w2 = tl.load(xk + 2).to(tl.uint32, bitcast=True)                   # (x4, x5)
                w3 = tl.load(xk + 3).to(tl.uint32, bitcast=True)                   # (x6, x7)
            acc = _gemv2_tile(acc, p, sc, mn, w0, w1, w2, w3, BKW, BLOCK_N, USE_ASM, X_BF16)
        if num_full * BKW < K8:                                                    # K tail: one masked tile
            rows = num_full * BKW + offs_r
            r_mask = rows < K8
            mask2 = r_mask[:, None] & n_mask[None, :]
            p = tl.load(q_ptrs + num_full * QSTEP, mask=mask2, other=0)
            sc = tl.load(s_ptrs + num_full * SSTEP, mask=mask2, other=0.0).to(tl.float32)
            mn = tl.load(m_ptrs + num_full * SSTEP, mask=mask2, other=0.0).to(tl.float32)
            xk = x_ptrs + num_full * XSTEP
            w0 = tl.load(xk + 0, mask=r_mask, other=0).to(tl.uint32, bitcast=True)
            w1 = tl.load(xk + 1, mask=r_mask, other=0).to(tl.uint32, bitcast=True)
            w2 = tl.load(xk + 2, mask=r_mask, other=0).to(tl.uint32, bitcast=True)
            w3 = tl.load(xk + 3, mask=r_mask, other=0).to(tl.uint32, bitcast=True)
            acc = _gemv2_tile(acc, p, sc, mn, w0, w1, w2, w3, BKW, BLOCK_N, USE_ASM, X_BF16)

        y = tl.sum(acc, axis=0)
        _gemv_epilogue(y, offs_n, n_mask, pid_m, pid_n, N, b_ptr, r_ptr, y_ptr, stride_rm, stride_ym,
                       BLOCK_N, HAS_BIAS, EPILOGUE)

    @triton.jit
    def _unpack_words(p, BKW: tl.constexpr, BN: tl.constexpr, K_AXIS0: tl.constexpr):
        # Packed words -> codes, each word loaded once, k = 8 * row + i for nibble i.
        #   K_AXIS0: p (BKW, BN) -> (8 * BKW, BN);  else p (BN, BKW) -> (BN, 8 * BKW)
        if K_AXIS0:
            # The 8 nibbles are stacked with tl.join, which keeps them in the thread that holds the word (and
            # its neighbours along N from the vectorized load); joins build [r, n, c, b, a] = q_{4a + 2b + c},
            # permuted to (r, a, b, c, n) and merged into K. In the sm_90 SASS the tile then reaches shared
            # memory for the dot with 128-bit stores (a broadcast shift over a new axis got a layout with one
            # N column per thread, i.e. a 16-bit store per element).
            q0 = p & 0xF
            q1 = (p >> 4) & 0xF
            q2 = (p >> 8) & 0xF
            q3 = (p >> 12) & 0xF
            q4 = (p >> 16) & 0xF
            q5 = (p >> 20) & 0xF
            q6 = (p >> 24) & 0xF
            q7 = (p >> 28) & 0xF
            j = tl.join(tl.join(tl.join(q0, q1), tl.join(q2, q3)), tl.join(tl.join(q4, q5), tl.join(q6, q7)))
            return tl.reshape(tl.permute(j, (0, 4, 3, 2, 1)), (BKW * 8, BN))
        else:
            shifts = tl.arange(0, 8) * 4
            q = (p[:, :, None] >> shifts[None, None, :]) & 0xF            # (BN, BKW, 8)
            return tl.reshape(q, (BN, BKW * 8))

    @triton.jit
    def _w4_gemm2_kernel(
        x_ptr, qw_ptr, s_ptr, m_ptr, b_ptr, y_ptr,
        M, N, K, stride_xm, stride_ym,
        G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr, SPLIT_K, SWAP_AB: tl.constexpr,
        HAS_BIAS: tl.constexpr, USE_ATOMIC: tl.constexpr, DOT_F32: tl.constexpr, DOT_PRECISION: tl.constexpr,
        DQ_F16: tl.constexpr, PREFETCH: tl.constexpr = False,
        PDL: tl.constexpr = False,  # programmatic dependent launch: see _triton.pdl_wait
    ):
        pdl_wait(PDL)  # reads what the kernel before wrote: after this
        # grid = (cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N), SPLIT_K). Like _w4_gemm_kernel, but the (BLOCK_K/8,
        # BLOCK_N) words of a tile are loaded once (not once per code) and unpacked in registers. SPLIT_K is a
        # runtime argument (one compile serves every split of a shape family).
        pid = tl.program_id(0)
        pid_k = tl.program_id(1)
        pid_m, pid_n = grouped_tile(pid, M, N, BLOCK_M, BLOCK_N, GROUP_M)  # L2-friendly order

        BKW: tl.constexpr = BLOCK_K // 8
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_mask = offs_m < M
        n_mask = offs_n < N
        offs_k = tl.arange(0, BLOCK_K)
        offs_r = tl.arange(0, BKW)
        col = (offs_n // 8).to(tl.int64) * K + offs_n % 8                                # (BN,)
        x_ptrs = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + offs_k[None, :]      # (BM, BK)
        if SWAP_AB:
            q_ptrs = qw_ptr + col[:, None] + (offs_r * 8)[None, :]                       # (BN, BKW)
            q_mask = n_mask[:, None]
        else:
            q_ptrs = qw_ptr + (offs_r * 8)[:, None] + col[None, :]                       # (BKW, BN)
            q_mask = n_mask[None, :]
        num_tiles = K // BLOCK_K  # K % G == 0 and G % BLOCK_K == 0
        tiles_per_split = tl.cdiv(num_tiles, SPLIT_K)
        t_start = pid_k * tiles_per_split
        t_end = tl.minimum(t_start + tiles_per_split, num_tiles)

        if SWAP_AB:
            acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)                         # y^T tile
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        # PREFETCH: the next tile's words are requested before this tile's dequant and dot (register double
        # buffering; the words feed the dot only through the unpack, so Triton's pipeliner does not stage
        # them). The next-tile index is clamped to a valid tile: the last iteration reloads its own.
        if PREFETCH:
            p_next = tl.load(q_ptrs + tl.minimum(t_start, num_tiles - 1) * (BKW * 8), mask=q_mask, other=0)
        for t in range(t_start, t_end):
            a = tl.load(x_ptrs + t * BLOCK_K, mask=m_mask[:, None], other=0.0)          # (BM, BK)
            if PREFETCH:
                p = p_next
                p_next = tl.load(q_ptrs + tl.minimum(t + 1, t_end - 1) * (BKW * 8), mask=q_mask, other=0)
            else:
                p = tl.load(q_ptrs + t * (BKW * 8), mask=q_mask, other=0)               # words, once each
            g = (t * BLOCK_K) // G
            if SWAP_AB and DQ_F16:
                # the dequantized tile is the wgmma's register operand: fp16 math, no fp32 -> fp16 conversion
                q = _unpack_words(p, BKW, BLOCK_N, False)                                  # (BN, BK)
                h = (q | 0x6400).to(tl.int16).to(tl.float16, bitcast=True)
                sch = tl.load(s_ptr + g * N + offs_n, mask=n_mask, other=0.0)              # (BN,) fp16
                mnh = tl.load(m_ptr + g * N + offs_n, mask=n_mask, other=0.0)
                w = (h - 1024.0) * sch[:, None] + mnh[:, None]
                acc = tl.dot(w, tl.trans(a), acc, input_precision=DOT_PRECISION)
            elif SWAP_AB:
                sc = tl.load(s_ptr + g * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)  # (BN,)
                mn = tl.load(m_ptr + g * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
                q = _unpack_words(p, BKW, BLOCK_N, False)                                  # (BN, BK)
                w = ((q | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0) * sc[:, None] + mn[:, None]
                if DOT_F32:
                    acc = tl.dot(w, tl.trans(a.to(tl.float32)), acc, input_precision=DOT_PRECISION)
                else:
                    acc = tl.dot(w.to(x_ptr.dtype.element_ty), tl.trans(a), acc, input_precision=DOT_PRECISION)
            elif DQ_F16:
                # fp16 activations: (q | 0x6400) is the fp16 1024 + q; subtract and fma in fp16 (LLVM packs
                # these into HADD2/HFMA2 pairs: ~8 instructions per element and tile in the SASS vs ~10 in fp32)
                q = _unpack_words(p, BKW, BLOCK_N, True)                                   # (BK, BN)
                h = (q | 0x6400).to(tl.int16).to(tl.float16, bitcast=True)
                sch = tl.load(s_ptr + g * N + offs_n, mask=n_mask, other=0.0)              # (BN,) fp16
                mnh = tl.load(m_ptr + g * N + offs_n, mask=n_mask, other=0.0)
                w = (h - 1024.0) * sch[None, :] + mnh[None, :]
                acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)
            else:
                sc = tl.load(s_ptr + g * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)  # (BN,)
                mn = tl.load(m_ptr + g * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
                q = _unpack_words(p, BKW, BLOCK_N, True)                                   # (BK, BN)
                w = ((q | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0) * sc[None, :] + mn[None, :]
                if DOT_F32:
                    acc = tl.dot(a.to(tl.float32), w, acc, input_precision=DOT_PRECISION)
                else:
                    acc = tl.dot(a, w.to(x_ptr.dtype.element_ty), acc, input_precision=DOT_PRECISION)

        if SWAP_AB:
            if HAS_BIAS:
                b = tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
                acc += tl.where(pid_k == 0, b, 0.0)[:, None]
            y_ptrs = y_ptr + offs_m.to(tl.int64)[None, :] * stride_ym + offs_n[:, None]  # (BN, BM)
            mask = n_mask[:, None] & m_mask[None, :]
        else:
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
    def _w4_dequant2_kernel(
        qw_ptr, s_ptr, m_ptr, w_ptr, N, K, n0, n_count,
        G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        # As _w4_dequant_kernel (w[k, j] = dequant(k, n0 + j), (K, n_count) row-major), each word loaded once.
        # BLOCK_K divides G, so a tile has one scale and one min per column.
        pid_k = tl.program_id(0)
        pid_n = tl.program_id(1)
        BKW: tl.constexpr = BLOCK_K // 8
        offs_r = pid_k * BKW + tl.arange(0, BKW)
        offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        offs_j = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_n = n0 + offs_j
        j_mask = offs_j < n_count
        col = (offs_n // 8).to(tl.int64) * K + offs_n % 8
        p = tl.load(qw_ptr + (offs_r * 8)[:, None] + col[None, :], mask=j_mask[None, :], other=0)  # (BKW, BN)
        q = _unpack_words(p, BKW, BLOCK_N, True)                                                  # (BK, BN)
        g = (pid_k * BLOCK_K) // G
        sc = tl.load(s_ptr + g * N + offs_n, mask=j_mask, other=0.0).to(tl.float32)
        mn = tl.load(m_ptr + g * N + offs_n, mask=j_mask, other=0.0).to(tl.float32)
        w = ((q | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0) * sc[None, :] + mn[None, :]
        tl.store(w_ptr + offs_k.to(tl.int64)[:, None] * n_count + offs_j[None, :], w.to(w_ptr.dtype.element_ty),
                 mask=j_mask[None, :])


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


#: GEMV epilogue modes (the kernels' EPILOGUE): plain store, + residual, SwiGLU over a fused [gate | up] weight.
EPI_NONE, EPI_ADD, EPI_SWIGLU = 0, 1, 2


def _launch_gemv(x2: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, group_size: int,
                 bias: torch.Tensor | None, cfg: GemvConfig, residual: torch.Tensor | None = None,
                 swiglu: bool = False) -> torch.Tensor:
    """x2 (M, K) -> (M, N), or (M, N) + residual (M, N), or SwiGLU (M, N / 2) when swiglu (W = [gate | up];
    cfg.block_n gate channels per program, with their up channels). Output in x2.dtype."""
    m, k = x2.shape
    n = qweight.shape[0] * INT4_TILE_N
    if cfg.block_k % group_size or cfg.block_n % INT4_TILE_N:
        raise ValueError(f"GEMV block_k={cfg.block_k} must be a multiple of group_size={group_size} and "
                         f"block_n={cfg.block_n} a multiple of {INT4_TILE_N}")
    if cfg.version not in (1, 2):
        raise ValueError(f"GEMV version must be 1 or 2, got {cfg.version}")
    epilogue, r, stride_rm = EPI_NONE, scales, 0  # r: a placeholder pointer unless there is a residual
    if residual is not None and swiglu:
        raise ValueError("a GEMV epilogue is either a residual add or SwiGLU, not both")
    if residual is not None:
        if tuple(residual.shape) != (m, n) or residual.dtype != x2.dtype or residual.device != x2.device:
            raise ValueError(f"residual must be {x2.dtype} ({m}, {n}) on {x2.device} like the output, got "
                             f"{residual.dtype} {tuple(residual.shape)} on {residual.device}")
        r = residual if residual.stride(-1) == 1 else residual.contiguous()
        epilogue, stride_rm = EPI_ADD, r.stride(0)
    cols, block_cols = n, cfg.block_n  # output channels, and weight columns per program
    if swiglu:
        if n % (2 * INT4_TILE_N):
            raise ValueError(f"SwiGLU needs out_features = 2 * I with I a multiple of {INT4_TILE_N} (whole slabs "
                             f"of gate and up), got {n}")
        epilogue, cols, block_cols = EPI_SWIGLU, n // 2, 2 * cfg.block_n
    y = torch.empty(m, cols, device=x2.device, dtype=x2.dtype)
    grid = (m, triton.cdiv(cols, cfg.block_n))
    on_gpu = x2.is_cuda and not interpreting()
    b = bias if bias is not None else scales
    if cfg.version == 2:
        if x2.dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"GEMV version 2 needs float16 or bfloat16 activations, got {x2.dtype}")
        use_asm = on_gpu if cfg.use_asm is None else (cfg.use_asm and on_gpu)
        try:
            xw = x2.view(torch.int32)           # (M, K/2): pair words (x[2j], x[2j+1])
        except RuntimeError:                    # odd row stride or offset: not viewable as 32-bit words
            xw = x2.contiguous().view(torch.int32)
        _w4_gemv2_kernel[grid](
            xw, qweight, scales, mins, b, r, y,
            n, k, xw.stride(0), stride_rm, y.stride(0),
            G=group_size, BLOCK_N=block_cols, BLOCK_K=cfg.block_k, HAS_BIAS=bias is not None, USE_ASM=use_asm,
            X_BF16=x2.dtype == torch.bfloat16, EVEN_N=cols % cfg.block_n == 0, EPILOGUE=epilogue,
            PREFETCH_ALL=cfg.prefetch_all and GEMV_PREFETCH_ALL, num_warps=cfg.num_warps, num_stages=1, **pdl_launch_args(x2.device),
        )
        return y
    asm_ok = x2.dtype == torch.float16 and on_gpu
    use_asm = asm_ok if cfg.use_asm is None else (cfg.use_asm and asm_ok)
    _w4_gemv_kernel[grid](
        x2, qweight, scales, mins, b, r, y,
        n, k, x2.stride(0), stride_rm, y.stride(0),
        G=group_size, BLOCK_N=block_cols, BLOCK_K=cfg.block_k, HAS_BIAS=bias is not None, USE_ASM=use_asm,
        EPILOGUE=epilogue, num_warps=cfg.num_warps, num_stages=1, **pdl_launch_args(x2.device),
    )
    return y


def _launch_gemm(x2: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, group_size: int,
                 bias: torch.Tensor | None, cfg: GemmConfig) -> torch.Tensor:
    m, k = x2.shape
    n = qweight.shape[0] * INT4_TILE_N
    if group_size % cfg.block_k:
        raise ValueError(f"GEMM block_k={cfg.block_k} must divide group_size={group_size}")
    if cfg.version not in (1, 2) or ((cfg.swap_ab or cfg.prefetch) and cfg.version != 2):
        raise ValueError(f"GEMM version must be 1 or 2 (swap_ab and prefetch need 2), got {cfg.version}, "
                         f"swap_ab={cfg.swap_ab}, prefetch={cfg.prefetch}")
    if cfg.version == 2 and cfg.block_k % 8:
        raise ValueError(f"GEMM version 2 needs block_k a multiple of 8, got {cfg.block_k}")
    dot_f32, precision = _dot_flags(x2)
    use_atomic = cfg.split_k > 1
    # split-K partial sums meet in an fp32 buffer (atomics), cast to x.dtype afterwards
    y = (torch.zeros if use_atomic else torch.empty)(m, n, device=x2.device,
                                                     dtype=torch.float32 if use_atomic else x2.dtype)
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n), cfg.split_k)
    common = dict(G=group_size, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
                  SPLIT_K=cfg.split_k, HAS_BIAS=bias is not None, USE_ATOMIC=use_atomic, DOT_F32=dot_f32,
                  DOT_PRECISION=precision, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                  **pdl_launch_args(x2.device))
    args = (x2, qweight, scales, mins, bias if bias is not None else scales, y, m, n, k, x2.stride(0), y.stride(0))
    if cfg.version == 2:
        # fp16 dequant math only for fp16 x (bf16 would round the fp16 scales to 8 bits first)
        _w4_gemm2_kernel[grid](*args, SWAP_AB=cfg.swap_ab, DQ_F16=x2.dtype == torch.float16, PREFETCH=cfg.prefetch,
                               **common)
    else:
        _w4_gemm_kernel[grid](*args, **common)
    return y.to(x2.dtype) if use_atomic else y


def w4a16_dequantize(qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, group_size: int,
                     dtype: torch.dtype, n0: int = 0, n_count: int | None = None, version: int = 1,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """Dequantize output channels [n0, n0 + n_count) into a (K, n_count) tensor of `dtype` with the Triton
    kernel (W transposed, the orientation torch.matmul(x, w) wants). version 2 loads each word once. `out`: a
    contiguous (K, n_count) tensor of `dtype` to write into (a caller's workspace), else a new one."""
    k = qweight.shape[1] * 8
    n = qweight.shape[0] * INT4_TILE_N
    n_count = n - n0 if n_count is None else n_count
    if out is not None and (tuple(out.shape) != (k, n_count) or out.dtype != dtype or not out.is_contiguous()):
        raise ValueError(f"out must be a contiguous ({k}, {n_count}) {dtype} tensor, got {tuple(out.shape)} {out.dtype}")
    w = out if out is not None else torch.empty(k, n_count, device=qweight.device, dtype=dtype)
    fixed = use_fixed_config(qweight.device)
    if version == 2:
        bk = min(group_size, 32 if fixed else 64)
        bn = 64 if fixed else 128
        grid = (k // bk, triton.cdiv(n_count, bn))
        _w4_dequant2_kernel[grid](qweight, scales, mins, w, n, k, n0, n_count, G=group_size, BLOCK_N=bn,
                                  BLOCK_K=bk, num_warps=4)
        return w
    if version != 1:
        raise ValueError(f"dequantize version must be 1 or 2, got {version}")
    bk, bn = (64, 64) if fixed else (64, 128)
    grid = (triton.cdiv(k, bk), triton.cdiv(n_count, bn))
    _w4_dequant_kernel[grid](qweight, scales, mins, w, n, k, n0, n_count, G=group_size, BLOCK_N=bn, BLOCK_K=bk,
                             num_warps=4)
    return w


def _dequant_matmul(x2: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor,
                    group_size: int, bias: torch.Tensor | None, version: int = 1) -> torch.Tensor:
    """Long prefill: dequantize W in column chunks (workspace <= DEQUANT_WORKSPACE_BYTES) and use cuBLAS."""
    m, k = x2.shape
    n = qweight.shape[0] * INT4_TILE_N
    chunk = dequant_chunk_columns(k, x2.element_size(), DEQUANT_WORKSPACE_BYTES, minimum=INT4_TILE_N)
    if chunk >= n:
        w = w4a16_dequantize(qweight, scales, mins, group_size, x2.dtype, version=version)  # (K, N)
        y = torch.matmul(x2, w)
    else:
        y = torch.empty(m, n, device=x2.device, dtype=x2.dtype)
        for n0 in range(0, n, chunk):
            nc = min(chunk, n - n0)
            w = w4a16_dequantize(qweight, scales, mins, group_size, x2.dtype, n0, nc, version=version)  # (K, nc)
            y[:, n0:n0 + nc] = torch.matmul(x2, w)
    if bias is not None:
        y += bias.to(y.dtype)
    return y


Config = GemvConfig | GemmConfig | DequantConfig


def _run_config(x2: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, group_size: int,
                bias: torch.Tensor | None, cfg: Config) -> torch.Tensor:
    if isinstance(cfg, GemvConfig):
        return _launch_gemv(x2, qweight, scales, mins, group_size, bias, cfg)
    if isinstance(cfg, GemmConfig):
        return _launch_gemm(x2, qweight, scales, mins, group_size, bias, cfg)
    if isinstance(cfg, DequantConfig):
        return _dequant_matmul(x2, qweight, scales, mins, group_size, bias, cfg.version)
    raise TypeError(f"config must be a GemvConfig, GemmConfig or DequantConfig, got {type(cfg).__name__}")


# ------------------------------------------------------------------------------------------------------------
# Choosing a kernel: fixed defaults (as measured before tuning existed) or candidates timed at first use
# ------------------------------------------------------------------------------------------------------------

#: Time candidate configs at first use per (M bucket, N, K, G, dtype, device) on CUDA. False: the fixed
#: defaults (v1 kernels, dequantize + cuBLAS for long prefills), i.e. the behaviour before tuning.
#: VRAMWISE_KERNEL_AUTOTUNE=0 in the environment turns it off.
AUTOTUNE = os.environ.get("VRAMWISE_KERNEL_AUTOTUNE", "1") != "0"
#: Whether decode sizes (M <= GEMV_MAX_M) are tuned too. Off: in a Llama-2-7B int4 batch-1 step on an H200 the
#: fixed GEMV default gave 2.49 ms per step and the first-use choices 3.22 ms in one run (2.78 in another):
#: the single-call timing with a flushed L2 does not rank the GEMV variants the way a model step does.
TUNE_DECODE = os.environ.get("VRAMWISE_KERNEL_AUTOTUNE") == "all"
#: GEMV v2 prefetches the next tile's scales, mins and x with its words (GemvConfig.prefetch_all);
#: VRAMWISE_GEMV_PREFETCH_ALL=0 turns it off everywhere (A/B measurements).
GEMV_PREFETCH_ALL = os.environ.get("VRAMWISE_GEMV_PREFETCH_ALL", "1") != "0"
#: Layers with fewer weights (N * K) keep the fixed default: they are launch-bound, and tuning each of a small
#: model's shapes would cost compile time (~2 s per candidate on first use) for nothing.
MIN_TUNE_WEIGHTS = 1 << 22

# Mid-size prefill config of the fixed defaults, timed once per key among _gemm_candidates (v1 kernel).
_TUNED: dict[tuple, GemmConfig] = {}
# AUTOTUNE choices: key -> config; _TUNE_LOG: key -> [(config, ms or None, note)] for the benchmark report.
_CHOICES: dict[tuple, Config] = {}
_TUNE_LOG: dict[tuple, list] = {}
_FLUSH: dict[int, torch.Tensor] = {}

# Largest relative difference from the first (default) candidate's output that a candidate may show and still
# be chosen: guards against a config that compiles but computes wrongly on some toolchain.
_TUNE_TOL = {torch.float16: 4e-3, torch.bfloat16: 1.5e-2, torch.float32: 1e-4}
#: Interleaved timing rounds per candidate at first use (see _pick_fastest).
TUNE_ROUNDS = 3


def _time_config(fn, reps: int = 5, flush: torch.Tensor | None = None) -> float:
    """Median ms of fn() over reps, CUDA events around each call; flush (a buffer > L2) is zeroed before
    each call so memory-bound kernels are timed reading weights from DRAM, as in a model's forward pass."""
    fn()  # compile + warm up
    torch.cuda.synchronize()
    pairs = []
    for _ in range(reps):
        if flush is not None:
            flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        pairs.append((start, end))
    torch.cuda.synchronize()
    times = sorted(s.elapsed_time(e) for s, e in pairs)
    return times[len(times) // 2]


#: Memory-bound sizes (M <= 64) are timed as a model step runs them: a CUDA graph of back-to-back calls, each on
#: its own copy of the weights, the copies together TUNE_GRAPH_L2_MULTIPLE x the L2 (so each call reads its
#: weights from DRAM, and launch ramp and tail overlap as between a step's kernels). Single calls after an L2
#: flush ranked candidates differently from a step: in one process a 7B gate+up at M=32 got a config taking
#: 87.6 us in a graph, in another 70.7 us. VRAMWISE_TUNE_GRAPH=0: the single-call timing.
TUNE_GRAPH = os.environ.get("VRAMWISE_TUNE_GRAPH", "1") != "0"
TUNE_GRAPH_L2_MULTIPLE = 2.5
TUNE_GRAPH_MAX_COPIES = 16


class _WeightCopies:
    """The weight and clones of it for graph timing; `current` picks the set the next call reads."""

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, copies: int) -> None:
        self.sets = [(qweight, scales, mins)] + [(qweight.clone(), scales.clone(), mins.clone())
                                                 for _ in range(copies - 1)]
        self.current = 0

    @property
    def weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.sets[self.current]


def _graph_copies(qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor) -> int:
    nbytes = sum(t.numel() * t.element_size() for t in (qweight, scales, mins))
    idx = qweight.device.index if qweight.device.index is not None else torch.cuda.current_device()
    l2 = getattr(torch.cuda.get_device_properties(idx), "L2_cache_size", 50 << 20) or (50 << 20)
    return max(2, min(TUNE_GRAPH_MAX_COPIES, math.ceil(TUNE_GRAPH_L2_MULTIPLE * l2 / nbytes)))


def _time_graph_config(fn, copies: _WeightCopies, reps: int = 5) -> float:
    """Median ms per call of a CUDA graph running fn() once per weight copy (fn reads copies.weights)."""
    def on_copy(i: int):
        def call() -> None:
            copies.current = i
            fn()
        return call
    try:
        return graph_time_per_call([on_copy(i) for i in range(len(copies.sets))], reps)
    finally:
        copies.current = 0


def _flush_buffer(device: torch.device) -> torch.Tensor:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    buf = _FLUSH.get(idx)
    if buf is None:
        l2 = getattr(torch.cuda.get_device_properties(idx), "L2_cache_size", 50 << 20) or (50 << 20)
        buf = _FLUSH[idx] = torch.empty(l2 + l2 // 4, dtype=torch.uint8, device=device)
    return buf


def _pick_fastest(cands: list, run, timer, tol: float) -> tuple[int, list]:
    """Index of the fastest candidate whose output matches the first working candidate's within tol
    (relative Frobenius norm) and is finite; candidates that raise (e.g. too much shared memory) are skipped.
    run(cfg) -> output tensor; timer(fn) -> time. Returns (index, [(cfg, time or None, note)])."""
    y0 = None
    ok: list[int] = []
    notes: dict[int, str] = {}
    for i, cfg in enumerate(cands):  # compile and check each candidate first
        try:
            y = run(cfg).float()
            if not bool(torch.isfinite(y).all()):
                notes[i] = "non-finite output"
                continue
            if y0 is None:
                y0 = y
            else:
                err = float((y - y0).norm() / y0.norm().clamp_min(1e-30))
                if not err <= tol:
                    notes[i] = f"rejected: differs from the default by {err:.1e}"
                    continue
        except Exception as e:  # noqa: BLE001 - a candidate that cannot run is simply not chosen
            notes[i] = f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
            continue
        ok.append(i)
    if not ok:
        raise RuntimeError("w4a16: no candidate kernel config could run: " + "; ".join(notes.values()))
    # Timed in interleaved rounds, each candidate's time the median of its rounds: a single pass in list order
    # let the GPU's clock ramp and other drift decide (the same shape got different choices in different
    # processes, e.g. a 7B 512-token prefill of 25 ms in one and 48 ms in another).
    rounds: dict[int, list[float]] = {i: [] for i in ok}
    for _ in range(TUNE_ROUNDS):
        for i in ok:
            rounds[i].append(timer(lambda c=cands[i]: run(c)))
    times = {i: sorted(ts)[len(ts) // 2] for i, ts in rounds.items()}
    best = min(ok, key=lambda i: times[i])
    log = [(cfg, times.get(i), notes.get(i, "")) for i, cfg in enumerate(cands)]
    return best, log


def _m_bucket(m: int) -> int:
    return min(triton.next_power_of_2(m), 4096)


def _candidates(m: int, n: int, k: int, group_size: int, dtype: torch.dtype, device: torch.device) -> list[Config]:
    """Configs timed at first use; the first is the fixed default (so the choice is never slower than it,
    and it is the correctness yardstick). Small lists: every entry is a compile on first use."""
    half = dtype in (torch.float16, torch.bfloat16)
    g = group_size
    if m <= GEMV_MAX_M:
        out: list[Config] = [_default_gemv_config(m, n, k, g, device, dtype)]
        if half:
            # SASS of the loop (ptxas for sm_90, 13B shapes' divisibility): v1 fp16 32.5 instructions per weight
            # word, bf16 45; v2 fp16 23.5 (32 x 1024) .. 26.6 (8 x 1024), bf16 25.5-27.7. More channels
            # per program share the x work but give fewer programs (N / BLOCK_N) for the SMs.
            for bn, bk, warps in ((8, 2048 if n < 8192 else 1024, 4), (16, 1024, 4), (32, 1024, 4), (16, 2048, 4),
                                  (32, 512, 4)):
                out.append(GemvConfig(bn, max(bk, g), warps, None, 2))
            if dtype == torch.bfloat16:  # pair-word loads with fp32 math (no bf16x2 rounding): 44 per word
                out.append(GemvConfig(16, max(1024, g), 4, False, 2))
        if m > 1:  # a few rows: the 16-row tl.dot tile (each weight read once, not once per row from L2)
            bk = min(64, g)
            out.append(GemmConfig(16, 32, bk, 1, _choose_split_k(triton.cdiv(n, 32), k // bk, device, per_sm=8),
                                  4, 3, 2, False))
        return list(dict.fromkeys(out))
    if m <= SKINNY_MAX_M:
        out = [_default_skinny_config(m, n, k, g, device)]
        for bn, bk, warps, stages, swap in ((32, 64, 4, 3, False), (64, 64, 4, 4, False)):
            bk = min(bk, g)
            split = _choose_split_k(triton.cdiv(n, bn), k // bk, device, per_sm=8)
            out.append(GemmConfig(16, bn, bk, 1, split, warps, stages, 2, swap))
        if half and m <= 8:
            out.append(GemvConfig(16, max(1024, g), 4, None, 2))
        out += _prefetch_candidates(m, n, k, g, device)
        return list(dict.fromkeys(out))
    if m < DEQUANT_MIN_M:
        out = list(_gemm_candidates(m, n, k, g, device)[:2])
        for bm, bn, bk, warps, stages, per_sm in ((64, 128, 64, 4, 4, 3), (128, 128, 64, 8, 3, 2)):
            bk = min(bk, g)
            programs = triton.cdiv(m, bm) * triton.cdiv(n, bn)
            for split in dict.fromkeys((_choose_split_k(programs, k // bk, device),
                                        _wave_split(programs, k // bk, device, per_sm=per_sm))):
                out.append(GemmConfig(bm, bn, bk, 8, split, warps, stages, 2, False))
        if m <= 32:
            # Decode batches of 17..32 rows: 64- and 128-row tiles leave most of each MMA idle and give few
            # programs; 32-row tiles with split-K fill the SMs (a 7B step at batch 32 spent 6.7 ms in this
            # GEMM on an H200 with the list above, ~0.55 TB/s of weights).
            for bn in (64, 128):
                bk = min(64, g)
                split = _choose_split_k(triton.cdiv(n, bn), k // bk, device)
                out.append(GemmConfig(32, bn, bk, 8, split, 4, 4, 2, False))
        if m <= 64:
            out += _prefetch_candidates(m, n, k, g, device)
        out.append(DequantConfig(2))
        return list(dict.fromkeys(out))
    out = [DequantConfig(2), DequantConfig(1)]
    # Each weight is dequantized once per BLOCK_M rows of x, and Triton waits for each K-step's wgmma before
    # dequantizing the next tile (the operand comes from registers: one shared buffer), so per CTA the
    # dequant and the MMA do not overlap. sm_90 SASS per K-step of 64 (fp16, join unpack, fp16 math):
    #   128 x 128, 8 warps: 238 instructions/thread (~480 issue cycles) next to ~510 of wgmma; 120 registers
    #       and 75 KB (3 stages) or 96 KB (4 stages) of shared memory: two CTAs per SM overlap each other;
    #   256 x 128, 8 warps: 258 (~520 cycles) next to ~1020 of wgmma, one CTA per SM (215 registers);
    #   128 x 256: 386 (~770) next to ~1020, one CTA per SM.
    # With M = 512 the 5120-wide layers give few tiles for 132 SMs, so each shape also comes with the
    # split-K that fills the last wave best (CTAs per SM counted).
    # (Every entry with a distinct tile or split 1 vs > 1 is a compile, ~2 s, at first use.)
    for bm, bn, bk, warps, stages, per_sm, try_split in ((128, 128, 64, 8, 3, 2, True), (256, 128, 64, 8, 3, 1, True),
                                                         (128, 256, 64, 8, 3, 1, False)):
        bk = min(bk, g)
        programs = triton.cdiv(m, bm) * triton.cdiv(n, bn)
        splits = (1, _wave_split(programs, k // bk, device, per_sm=per_sm)) if try_split else (1,)
        for split in dict.fromkeys(splits):
            out.append(GemmConfig(bm, bn, bk, 8, split, warps, stages, 2, False))
    return list(dict.fromkeys(out))


def _prefetch_candidates(m: int, n: int, k: int, group_size: int, device: torch.device) -> list[GemmConfig]:
    """Decode-batch GEMMs (5..64 rows) with the next tile's words prefetched into registers. Timed in CUDA graphs
    over weight copies on an H200 (benchmarks/bench_kernels.py shapes, 7B and 13B, fp16, g128): 64 x 64 x 128
    tiles with split-K were 1.14-1.33x faster than the best earlier candidate on the 4096/5120-wide outputs
    (o_proj, down_proj) at M = 32 and 1.05-1.18x at M = 16; on the wide QKV and gate+up at M = 32 equal."""
    bk = min(128, group_size)
    out = []
    for bm, bn in ((64, 64), (64, 128)):
        if m > bm:
            continue
        programs = triton.cdiv(m, bm) * triton.cdiv(n, bn)
        for split in dict.fromkeys((_choose_split_k(programs, k // bk, device),
                                    _wave_split(programs, k // bk, device, per_sm=2))):
            out.append(GemmConfig(bm, bn, bk, 8, split, 4, 3, 2, False, True))
    # swap_ab: y^T = W x^T, the dequantized (64, 128) weight tile is the wgmma's register operand (64 x BM x 16
    # instructions, BM = the rows rounded up to 16 or 32), x^T comes through shared memory with cp.async. Timed
    # the same way (H200, fp16, g128): the best config at M = 16 and 32 on every 7B/13B shape, 1.08-1.35x
    # faster than the choices above; at M = 64 equal. Its best split-K varied by shape among these four.
    bm = 16 if m <= 16 else (32 if m <= 32 else 64)
    programs = triton.cdiv(n, 64)
    k_tiles = k // bk
    for split in dict.fromkeys((_choose_split_k(programs, k_tiles, device), _choose_split_k(programs, k_tiles, device,
                                per_sm=8), _wave_split(programs, k_tiles, device), _wave_split(programs, k_tiles, device,
                                                                                               per_sm=2))):
        out.append(GemmConfig(bm, 64, bk, 8, split, 4, 3, 2, True, False))
    return out


def _wave_split(programs: int, k_tiles: int, device: torch.device, max_split: int = 4, per_sm: int = 1) -> int:
    """Split-K in 1..max_split that best fills whole waves of per_sm programs per SM (ties, within 5 %: the
    smaller split), keeping >= 8 K-tiles per split."""
    sms = sm_count(device) * per_sm
    best = (0.0, 1)
    for s in range(1, max_split + 1):
        if s > 1 and k_tiles // s < 8:
            break
        total = programs * s
        eff = total / (math.ceil(total / sms) * sms)
        if eff > best[0] + 0.05:
            best = (eff, s)
    return best[1]


def _tuned_gemm_config(x2: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor,
                       group_size: int) -> GemmConfig:
    """Fixed-default mid-size prefill config: the fastest of _gemm_candidates (v1 kernel), timed once."""
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


def _default_choice(x2: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor,
                    group_size: int) -> Config:
    """The fixed defaults (no first-use tuning beyond the mid-size v1 list)."""
    m, k = x2.shape
    n = qweight.shape[0] * INT4_TILE_N
    device = x2.device
    if m <= GEMV_MAX_M:
        return _default_gemv_config(m, n, k, group_size, device, x2.dtype)
    if m <= SKINNY_MAX_M:
        return _default_skinny_config(m, n, k, group_size, device)
    if use_fixed_config(device):
        return GemmConfig(block_m=32, block_n=32, block_k=min(group_size, 32), group_m=4, num_stages=1)
    if m >= DEQUANT_MIN_M:
        # v2 loads each packed word once: H100, M = 512, 13B shapes, dequantize + cuBLAS 166-180 us against v1's
        # 211-222 (benchmarks/bench_kernels.py, session 7); under a budget (no first-use tuning) a 13B prefill
        # spent 20 ms of its ~52 ms of kernels in v1's dequantize (benchmarks/profile_prefill.py).
        return DequantConfig(2)
    return _tuned_gemm_config(x2, qweight, scales, mins, group_size)


def _tune_key(x2: torch.Tensor, n: int, group_size: int) -> tuple:
    return (_m_bucket(x2.shape[0]), n, x2.shape[1], group_size, x2.dtype, x2.device)


def choose_config(x2: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor,
                  group_size: int) -> Config:
    """The config w4a16_matmul uses for this x (M, K): with AUTOTUNE on CUDA and at least MIN_TUNE_WEIGHTS
    weights, the fastest correct candidate, timed at first use per (M bucket, N, K, G, dtype, device) and
    cached; during CUDA-graph capture an untuned key gets the fixed default (uncached). Otherwise the fixed
    default."""
    n = qweight.shape[0] * INT4_TILE_N
    if not AUTOTUNE or use_fixed_config(x2.device) or n * x2.shape[1] < MIN_TUNE_WEIGHTS \
            or (x2.shape[0] <= GEMV_MAX_M and not TUNE_DECODE):
        return _default_choice(x2, qweight, scales, mins, group_size)
    key = _tune_key(x2, n, group_size)
    cfg = _CHOICES.get(key)
    if cfg is not None:
        return cfg
    if torch.cuda.is_current_stream_capturing():  # no timing inside a capture; the default times nothing there
        return _default_choice(x2, qweight, scales, mins, group_size)
    m, k = x2.shape
    cands = _candidates(m, n, k, group_size, x2.dtype, x2.device)
    if m <= 64 and TUNE_GRAPH:  # memory-bound sizes: back-to-back calls over weight copies, as in a step
        copies = _WeightCopies(qweight, scales, mins, _graph_copies(qweight, scales, mins))
        idx, log = _pick_fastest(cands, lambda c: _run_config(x2, *copies.weights, group_size, None, c),
                                 lambda fn: _time_graph_config(fn, copies), _TUNE_TOL[x2.dtype])
        del copies
    else:
        flush = _flush_buffer(x2.device) if m <= 64 else None  # memory-bound sizes: time with a cold L2
        reps = 10 if m <= 64 else 5
        idx, log = _pick_fastest(cands, lambda c: _run_config(x2, qweight, scales, mins, group_size, None, c),
                                 lambda fn: _time_config(fn, reps, flush), _TUNE_TOL[x2.dtype])
        _FLUSH.clear()  # the allocator may reuse it; the tensor is not kept alive between tunings
    _CHOICES[key] = cands[idx]
    _TUNE_LOG[key] = log
    return cands[idx]


def _auto_uses_triton(x: torch.Tensor) -> bool:
    """backend="auto": the kernels for CUDA tensors, the torch reference elsewhere. (The model-level interpreter
    tests replace this to run the kernels on CPU tensors.)"""
    return x.is_cuda and triton_supports(x.device)


def w4a16_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, group_size: int,
                 bias: torch.Tensor | None = None, *, backend: str = "auto",
                 config: Config | None = None) -> torch.Tensor:
    """y (..., N) = x (..., K) @ dequant(W).T (+ bias), in x.dtype.

    backend: "auto" -- Triton on CUDA tensors when Triton is installed, else the torch reference;
             "triton" -- force the kernels (CPU tensors need TRITON_INTERPRET=1); "torch" -- the reference.
    config:  override the choice: a GemvConfig selects a GEMV kernel, a GemmConfig a tl.dot kernel, a
             DequantConfig dequantize + torch.matmul. By default (choose_config) on CUDA the fastest of a short
             candidate list per shape, timed at first use (AUTOTUNE); else the fixed defaults: M <= GEMV_MAX_M
             -> GEMV; M <= SKINNY_MAX_M -> tl.dot with 16-row tiles and split-K; M < DEQUANT_MIN_M -> tl.dot;
             larger M -> dequantize + torch.matmul.
    """
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    n, k = _check_args(x, qweight, scales, mins, group_size, bias)
    if backend == "torch" or (backend == "auto" and not _auto_uses_triton(x)):
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
    cfg = config if config is not None else choose_config(x2, qweight, scales, mins, group_size)
    y = _run_config(x2, qweight, scales, mins, group_size, bias, cfg)
    return y.reshape(*x.shape[:-1], n)


# ------------------------------------------------------------------------------------------------------------
# GEMV epilogues: the decode step's residual add and SwiGLU in the projection's kernel
# ------------------------------------------------------------------------------------------------------------

#: Run the residual add (down_proj) and SwiGLU (fused gate_up_proj) in the decode GEMV's epilogue, saving a
#: launch (and a round trip of the activations) each per layer. False: w4a16_matmul_add / w4a16_matmul_silu_mul
#: compute the unfused way (tests and benchmarks compare both).
EPILOGUES = True
#: Whether QuantLinear.forward_silu_mul (the model's gate+up projection) takes the SwiGLU epilogue. Off: on an
#: H200 (benchmarks/bench_epilogue.py, M = 1, fp16, CUDA graph) the fused GEMV was slower than GEMV + the
#: separate silu_and_mul kernel in every tiling tried (7B gate_up 21.9-35.4 vs 20.9-22.7 us, 13B 31.5-41.6 vs
#: 28.8-31.6 us): a program holding gate and up slabs needs twice the registers, or half the K-tile. The
#: residual-add epilogue stays on (down_proj: 12.1 vs 13.4 us for 7B, 17.6 vs 19.0 for 13B).
SWIGLU_EPILOGUE = False


def _epilogue_config(x2: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor,
                     group_size: int, backend: str, config: Config | None) -> GemvConfig | None:
    """The GEMV config a fused epilogue runs with for x2 (M, K), or None when this call takes the unfused
    path: EPILOGUES off, the torch backend, more than GEMV_MAX_M rows, or a non-GEMV config chosen."""
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    if not EPILOGUES or backend == "torch" or (backend == "auto" and not _auto_uses_triton(x2)):
        return None
    m = x2.shape[0]
    if not 1 <= m <= GEMV_MAX_M or x2.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return None
    if not triton_supports(x2.device):
        raise RuntimeError(f"Triton kernels cannot run on {x2.device} here (install triton, or set TRITON_INTERPRET=1 "
                           "for CPU tensors)")
    cfg = config if config is not None else choose_config(x2, qweight, scales, mins, group_size)
    if not isinstance(cfg, GemvConfig) or (cfg.version == 2 and x2.dtype == torch.float32):
        return None
    return cfg


def _swiglu_tile(cfg: GemvConfig, group_size: int) -> GemvConfig:
    """The chosen GEMV config with half the K-tile: a SwiGLU program holds the gate and the up columns, twice
    a plain program's, and the half tile keeps its (BLOCK_K/8, 2 BLOCK_N) register tile the plain one's size.
    ptxas for sm_90 (Triton 3.6, fp16, 4 warps): v1 8 x 1024 plain 40 registers; SwiGLU 95 at 1024, 64 at
    512; v1 8 x 2048 (N < 8192) plain 66, SwiGLU 255. (benchmarks/bench_epilogue.py times both.)"""
    half = cfg.block_k // 2
    if half < group_size or half % group_size:
        return cfg
    return GemvConfig(cfg.block_n, half, cfg.num_warps, cfg.use_asm, cfg.version)


def _rows(x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])  # (M, K)
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def w4a16_matmul_add(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor,
                     group_size: int, bias: torch.Tensor | None, residual: torch.Tensor, *, backend: str = "auto",
                     config: Config | None = None) -> torch.Tensor:
    """w4a16_matmul(x, ...) + residual: x (..., K), residual (..., N) -> (..., N) in x.dtype.

    At decode sizes (M <= GEMV_MAX_M rows, Triton) one GEMV with the add in its epilogue: the product is rounded
    to x.dtype as the unfused kernel stores it, then added to the residual in fp32 and rounded once (torch's
    add), so the result has the unfused bits. Elsewhere (or with a residual of another dtype or shape, which
    torch would promote or broadcast) exactly w4a16_matmul(...) + residual. backend, config: as w4a16_matmul."""
    n, _ = _check_args(x, qweight, scales, mins, group_size, bias)
    x2 = _rows(x)
    cfg = None
    if residual.dtype == x.dtype and tuple(residual.shape) == (*x.shape[:-1], n) and residual.device == x.device:
        cfg = _epilogue_config(x2, qweight, scales, mins, group_size, backend, config)
    if cfg is None:
        return w4a16_matmul(x, qweight, scales, mins, group_size, bias, backend=backend, config=config) + residual
    y = _launch_gemv(x2, qweight, scales, mins, group_size, bias, cfg, residual=residual.reshape(-1, n))
    return y.reshape(*x.shape[:-1], n)


def w4a16_matmul_silu_mul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor,
                          group_size: int, bias: torch.Tensor | None = None, *, backend: str = "auto",
                          config: Config | None = None) -> torch.Tensor:
    """SwiGLU of a fused gate+up projection: y = w4a16_matmul(x, ...) (..., 2I) = [gate | up] ->
    silu(gate) * up (..., I), in x.dtype.

    At decode sizes (M <= GEMV_MAX_M, Triton, I a multiple of 8) one GEMV: each program reads config.block_n
    gate channels' slabs and the matching up channels' slabs (the packed layout as it is) and stores
    silu(gate) * up, with the unfused path's roundings (products to x.dtype, silu to x.dtype, then the
    multiply). Without a config, the chosen GEMV config runs with half its K-tile (_swiglu_tile), so the sums
    over K may round differently from the unfused GEMV's (fp32 accumulation; then the same roundings).
    Elsewhere exactly kernels.fused.silu_and_mul(w4a16_matmul(x, ...))."""
    from . import fused as _fused  # the unfused SwiGLU (imported here: fused.py is torch + Triton only)

    n, _ = _check_args(x, qweight, scales, mins, group_size, bias)
    x2 = _rows(x)
    cfg = None if n % (2 * INT4_TILE_N) else _epilogue_config(x2, qweight, scales, mins, group_size, backend, config)
    if cfg is not None and config is None:
        cfg = _swiglu_tile(cfg, group_size)
    if cfg is None:
        return _fused.silu_and_mul(w4a16_matmul(x, qweight, scales, mins, group_size, bias, backend=backend,
                                                config=config))
    y = _launch_gemv(x2, qweight, scales, mins, group_size, bias, cfg, swiglu=True)
    return y.reshape(*x.shape[:-1], n // 2)
