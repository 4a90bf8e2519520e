"""W8A16 matmul: y = x @ dequant(W).T with symmetric int8 weights (per-channel or group-wise scales).

Weight layout (vramwise.quant.formats, docs/quant-format.md), N = out_features, K = in_features:
    qweight int8 (K, N)        the transposed weight, output channels contiguous
    scales  fp16 (K // G, N)   w[n, k] = qweight[k, n] * scales[k // G, n]; G = K for per-channel

Kernels:
* ``_w8_gemv_kernel`` -- decode (M <= GEMV_MAX_M): a program owns BLOCK_N output channels and streams
  (BLOCK_K, BLOCK_N) int8 tiles of its column strip (16-byte loads along N), prefetching the next tile.
  Products accumulate elementwise in fp32 and are reduced over K once at the end. Per-channel scales are
  applied once at the end; group scales per tile row.
* ``_w8_gemm_kernel`` -- skinny and mid-size batches: tl.dot on (BLOCK_K, BLOCK_N) tiles converted to the
  activation dtype (int8 values are exact in fp16 and bf16). Group scales are applied to the tile before the
  dot (BLOCK_K divides G); per-channel scales to the accumulator after it. Optional split-K.
* long prefills (M >= DEQUANT_MIN_M): dequantize column chunks with one torch op and call torch.matmul.

``w8a16_reference`` is the torch path (CPU and fallback) and the test oracle.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..memory.budget import dequant_chunk_columns
from ..quant.formats import dequantize_int8
from ._triton import HAS_TRITON, pdl_launch_args, sm_count, triton_supports, use_fixed_config

if HAS_TRITON:
    import triton
    import triton.language as tl

    from ._triton import grouped_tile, pdl_wait

__all__ = ["w8a16_reference", "w8a16_matmul", "W8GemvConfig", "W8GemmConfig"]

GEMV_MAX_M = 2
SKINNY_MAX_M = 16
DEQUANT_MIN_M = 256
DEQUANT_WORKSPACE_BYTES = 64 << 20
_REF_CHUNK_ELEMS = 1 << 24


def _check_args(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, group_size: int,
                bias: torch.Tensor | None) -> tuple[int, int]:
    k = x.shape[-1]
    if qweight.dtype != torch.int8 or qweight.dim() != 2 or qweight.shape[0] != k:
        raise ValueError(f"qweight must be int8 (K, N) with K={k} from x, got {qweight.dtype} {tuple(qweight.shape)}")
    n = qweight.shape[1]
    if k % group_size:
        raise ValueError(f"group_size={group_size} does not divide in_features={k}")
    if tuple(scales.shape) != (k // group_size, n):
        raise ValueError(f"scales must have shape {(k // group_size, n)} (groups, out_features), got {tuple(scales.shape)}")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"bias must have shape ({n},), got {tuple(bias.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"activations must be floating point, got {x.dtype}")
    return n, k


def w8a16_reference(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, group_size: int,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., K) -> (..., N) in x.dtype: dequantize W to x.dtype (fp32 math) and matmul. No caching."""
    n, k = _check_args(x, qweight, scales, group_size, bias)
    x2 = x.reshape(-1, k)
    out = torch.empty(x2.shape[0], n, dtype=x.dtype, device=x.device)
    cols = max(1, _REF_CHUNK_ELEMS // k)
    for n0 in range(0, n, cols):
        n1 = min(n, n0 + cols)
        w = dequantize_int8(qweight[:, n0:n1], scales[:, n0:n1], group_size).to(x.dtype)  # (n1-n0, K)
        out[:, n0:n1] = x2 @ w.t()
    if bias is not None:
        out += bias.to(out.dtype)
    return out.reshape(*x.shape[:-1], n)


@dataclass(frozen=True)
class W8GemvConfig:
    block_n: int = 32
    block_k: int = 256
    num_warps: int = 4


@dataclass(frozen=True)
class W8GemmConfig:
    """block_k must divide the group size (any block_k for per-channel)."""
    block_m: int = 64
    block_n: int = 64
    block_k: int = 32
    group_m: int = 8
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 2


def _choose_split_k(programs: int, k_tiles: int, device: torch.device, min_tiles_per_split: int = 4) -> int:
    target = 4 * sm_count(device)
    if programs >= target:
        return 1
    return max(1, min(math.ceil(target / programs), k_tiles // min_tiles_per_split))


if HAS_TRITON:

    @triton.jit
    def _w8_gemv_kernel(
        x_ptr, qw_ptr, s_ptr, b_ptr, y_ptr,
        N, K, stride_xm, stride_ym,
        G: tl.constexpr, PER_CHANNEL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        PDL: tl.constexpr = False,  # programmatic dependent launch: see _triton.pdl_wait
    ):
        pdl_wait(PDL)  # reads what the kernel before wrote: after this
        # grid = (M, cdiv(N, BLOCK_N))
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        offs_k = tl.arange(0, BLOCK_K)
        x_row = x_ptr + pid_m.to(tl.int64) * stride_xm
        num_tiles = tl.cdiv(K, BLOCK_K)
        acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
        q_next = tl.load(qw_ptr + offs_k.to(tl.int64)[:, None] * N + offs_n[None, :],
                         mask=(offs_k < K)[:, None] & n_mask[None, :], other=0)
        for t in range(0, num_tiles):
            ks = t * BLOCK_K + offs_k                                        # (BK,)
            k_mask = ks < K
            q = q_next                                                       # (BK, BN) int8
            kn = ks + BLOCK_K
            q_next = tl.load(qw_ptr + kn.to(tl.int64)[:, None] * N + offs_n[None, :],
                             mask=(kn < K)[:, None] & n_mask[None, :], other=0)
            xk = tl.load(x_row + ks, mask=k_mask, other=0.0).to(tl.float32)  # (BK,)
            if PER_CHANNEL:
                acc += q.to(tl.float32) * xk[:, None]
            else:
                sc = tl.load(s_ptr + (ks // G)[:, None] * N + offs_n[None, :],
                             mask=k_mask[:, None] & n_mask[None, :], other=0.0).to(tl.float32)
                acc += (q.to(tl.float32) * sc) * xk[:, None]
        y = tl.sum(acc, axis=0)
        if PER_CHANNEL:
            y *= tl.load(s_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            y += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        tl.store(y_ptr + pid_m.to(tl.int64) * stride_ym + offs_n, y.to(y_ptr.dtype.element_ty), mask=n_mask)

    @triton.jit
    def _w8_gemm_kernel(
        x_ptr, qw_ptr, s_ptr, b_ptr, y_ptr,
        M, N, K, stride_xm, stride_ym,
        G: tl.constexpr, PER_CHANNEL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, SPLIT_K: tl.constexpr,
        HAS_BIAS: tl.constexpr, USE_ATOMIC: tl.constexpr, DOT_F32: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ):
        pid = tl.program_id(0)
        pid_k = tl.program_id(1)
        pid_m, pid_n = grouped_tile(pid, M, N, BLOCK_M, BLOCK_N, GROUP_M)  # L2-friendly order

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_mask = offs_m < M
        n_mask = offs_n < N
        offs_k = tl.arange(0, BLOCK_K)
        x_ptrs = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + offs_k[None, :]   # (BM, BK)
        q_ptrs = qw_ptr + offs_k.to(tl.int64)[:, None] * N + offs_n[None, :]           # (BK, BN)
        num_tiles = tl.cdiv(K, BLOCK_K)
        tiles_per_split = tl.cdiv(num_tiles, SPLIT_K)
        t_start = pid_k * tiles_per_split
        t_end = tl.minimum(t_start + tiles_per_split, num_tiles)

        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for t in range(t_start, t_end):
            k_mask = (t * BLOCK_K + offs_k) < K
            a = tl.load(x_ptrs + t * BLOCK_K, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            q = tl.load(q_ptrs + t * BLOCK_K * N, mask=k_mask[:, None] & n_mask[None, :], other=0)
            if PER_CHANNEL:
                w = q.to(tl.float32)                     # exact; the scale is applied to acc after the loop
            else:
                g = (t * BLOCK_K) // G
                sc = tl.load(s_ptr + g * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
                w = q.to(tl.float32) * sc[None, :]
            if DOT_F32:
                acc = tl.dot(a.to(tl.float32), w, acc, input_precision=DOT_PRECISION)
            else:
                acc = tl.dot(a, w.to(x_ptr.dtype.element_ty), acc, input_precision=DOT_PRECISION)

        if PER_CHANNEL:
            acc *= tl.load(s_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        if HAS_BIAS:
            b = tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
            acc += tl.where(pid_k == 0, b, 0.0)[None, :]
        y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
        mask = m_mask[:, None] & n_mask[None, :]
        if USE_ATOMIC:
            tl.atomic_add(y_ptrs, acc, mask=mask)
        else:
            tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)


def _dot_flags(x: torch.Tensor) -> tuple[bool, str]:
    # Same rule as w4a16: IEEE fp32 dots for fp32 activations; bf16 upcast under the CPU interpreter.
    if x.dtype == torch.float32 or (x.dtype == torch.bfloat16 and x.device.type != "cuda"):
        return True, "ieee"
    return False, "tf32"


def _launch_gemv(x2, qweight, scales, group_size, bias, cfg: W8GemvConfig) -> torch.Tensor:
    m, k = x2.shape
    n = qweight.shape[1]
    per_channel = group_size == k
    y = torch.empty(m, n, device=x2.device, dtype=x2.dtype)
    grid = (m, triton.cdiv(n, cfg.block_n))
    _w8_gemv_kernel[grid](x2, qweight, scales, bias if bias is not None else scales, y, n, k, x2.stride(0), y.stride(0),
                          G=group_size, PER_CHANNEL=per_channel, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                          HAS_BIAS=bias is not None, num_warps=cfg.num_warps, num_stages=1,
                          **pdl_launch_args(x2.device))
    return y


def _launch_gemm(x2, qweight, scales, group_size, bias, cfg: W8GemmConfig) -> torch.Tensor:
    m, k = x2.shape
    n = qweight.shape[1]
    per_channel = group_size == k
    if not per_channel and group_size % cfg.block_k:
        raise ValueError(f"W8 GEMM block_k={cfg.block_k} must divide group_size={group_size}")
    dot_f32, precision = _dot_flags(x2)
    use_atomic = cfg.split_k > 1
    y = (torch.zeros if use_atomic else torch.empty)(m, n, device=x2.device,
                                                     dtype=torch.float32 if use_atomic else x2.dtype)
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n), cfg.split_k)
    _w8_gemm_kernel[grid](x2, qweight, scales, bias if bias is not None else scales, y, m, n, k, x2.stride(0),
                          y.stride(0), G=group_size, PER_CHANNEL=per_channel, BLOCK_M=cfg.block_m,
                          BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m, SPLIT_K=cfg.split_k,
                          HAS_BIAS=bias is not None, USE_ATOMIC=use_atomic, DOT_F32=dot_f32,
                          DOT_PRECISION=precision, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return y.to(x2.dtype) if use_atomic else y


def _dequant_matmul(x2, qweight, scales, group_size, bias) -> torch.Tensor:
    """Long prefill: dequantize column chunks with one broadcast multiply (int8 * fp16 -> x.dtype, exact
    product rounded once, as the reference does) and use torch.matmul."""
    m, k = x2.shape
    n = qweight.shape[1]
    chunk = dequant_chunk_columns(k, x2.element_size(), DEQUANT_WORKSPACE_BYTES)
    y = torch.empty(m, n, device=x2.device, dtype=x2.dtype)
    ng = k // group_size
    for n0 in range(0, n, chunk):
        n1 = min(n, n0 + chunk)
        q = qweight[:, n0:n1].view(ng, group_size, n1 - n0)
        w = (q.to(torch.float32) * scales[:, n0:n1].float().unsqueeze(1)).to(x2.dtype).view(k, n1 - n0)
        if n1 - n0 == n:
            y = torch.matmul(x2, w)
        else:
            y[:, n0:n1] = torch.matmul(x2, w)
    if bias is not None:
        y += bias.to(y.dtype)
    return y


def w8a16_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, group_size: int,
                 bias: torch.Tensor | None = None, *, backend: str = "auto",
                 config: W8GemvConfig | W8GemmConfig | None = None) -> torch.Tensor:
    """y (..., N) = x (..., K) @ dequant(W).T (+ bias), in x.dtype. group_size = K for per-channel scales.

    backend/config as in w4a16_matmul: "auto" uses Triton on CUDA tensors, the torch reference elsewhere.
    """
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    n, k = _check_args(x, qweight, scales, group_size, bias)
    if backend == "torch" or (backend == "auto" and not (x.is_cuda and triton_supports(x.device))):
        return w8a16_reference(x, qweight, scales, group_size, bias)
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
    fixed = use_fixed_config(x.device)
    per_channel = group_size == k
    gk = k if per_channel else group_size  # block_k must divide this for the dot kernel
    if isinstance(config, W8GemvConfig) or (config is None and m <= GEMV_MAX_M):
        if config is None:
            bk = 64 if fixed else 256
            if not per_channel:
                bk = max(bk, group_size)
            config = W8GemvConfig(block_n=32 if fixed else 16, block_k=bk, num_warps=1 if fixed else 4)
        y = _launch_gemv(x2, qweight, scales, group_size, bias, config)
    elif isinstance(config, W8GemmConfig):
        y = _launch_gemm(x2, qweight, scales, group_size, bias, config)
    elif fixed:
        bk = 32 if per_channel else math.gcd(32, gk)
        y = _launch_gemm(x2, qweight, scales, group_size, bias,
                         W8GemmConfig(block_m=16 if m <= SKINNY_MAX_M else 32, block_n=32, block_k=bk, num_stages=1))
    elif m >= DEQUANT_MIN_M:
        y = _dequant_matmul(x2, qweight, scales, group_size, bias)
    else:
        bm, bn = (16, 64) if m <= SKINNY_MAX_M else (64, 128)
        bk = 128 if per_channel else math.gcd(128, gk)
        programs = triton.cdiv(m, bm) * triton.cdiv(n, bn)
        split = _choose_split_k(programs, triton.cdiv(k, bk), x.device)
        y = _launch_gemm(x2, qweight, scales, group_size, bias,
                         W8GemmConfig(bm, bn, bk, 8, split, 4, 3))
    return y.reshape(*x.shape[:-1], n)
