"""Small fused kernels for the decode step, each in Triton beside its pure-torch reference.

At decode batch sizes these ops move a few KB to a few MB each; unfused, each is several launches and
round trips of the activations through memory, which adds up to a visible share of a step once the weight
reads are fast. Each kernel reads its inputs once and writes its outputs once.

- rms_norm:          (residual add +) RMSNorm, numerics of models.layers.RMSNorm
- rope_and_write_kv: neox rotary on q and k (in place) + scatter of k, v into the paged KV cache
- silu_and_mul:      SwiGLU activation silu(gate) * up, from a fused gate_up projection or two tensors
- greedy_sample, sample_top_k_top_p: token choice on the device, no host sync (pure torch)

The public functions dispatch: Triton on CUDA when Triton is installed, the torch reference elsewhere.
The *_triton functions also run on CPU tensors under TRITON_INTERPRET=1 (how the tests check them).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl

    from vramwise.kernels._triton import pdl_launch_args, pdl_wait

    HAS_TRITON = True
except ImportError:  # triton is an optional dependency; the torch references serve CPU-only installs
    HAS_TRITON = False


def _use_triton(x: torch.Tensor) -> bool:
    return HAS_TRITON and x.is_cuda


# --------------------------------------------------------------------------------------------------------
# RMSNorm (+ residual add)
# --------------------------------------------------------------------------------------------------------


def rms_norm_torch(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference. x, residual (T, H); weight (H,). Returns (out, new_residual).

    new_residual = x + residual (x itself when residual is None); out = RMSNorm(new_residual) with the
    module's numerics: normalise in fp32, cast back to the input dtype, then multiply by the weight.
    """
    h = x if residual is None else x + residual
    if h.dtype == torch.float32 and weight.dtype == torch.float32:
        # fp32 end to end (the CPU engine): torch's fused rms_norm, one op instead of six
        return torch.nn.functional.rms_norm(h, (h.shape[-1],), weight, eps), h
    hf = h.float()
    normed = (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)).to(h.dtype)
    return weight * normed, h


if HAS_TRITON:

    @triton.jit
    def _rms_norm_kernel(
        out_ptr,  # (T, H) in promote(weight, residual dtype)
        res_out_ptr,  # (T, H): x + residual; written when HAS_RESIDUAL
        x_ptr,  # (T, H)
        res_ptr,  # (T, H) or a placeholder
        w_ptr,  # (H,)
        eps,
        # Sizes and row strides are fixed per model: compile-time constants keep the launch cheap (Triton's
        # per-launch host cost grows with the number of runtime arguments).
        hidden: tl.constexpr,
        stride_x: tl.constexpr,
        stride_r: tl.constexpr,
        stride_o: tl.constexpr,
        stride_ro: tl.constexpr,
        HAS_RESIDUAL: tl.constexpr,
        BLOCK: tl.constexpr,  # hidden rounded up to a power of two: one program holds a whole row
        PDL: tl.constexpr = False,  # programmatic dependent launch: see _triton.pdl_wait
    ):
        pdl_wait(PDL)  # reads what the kernel before wrote: after this
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < hidden
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
        if HAS_RESIDUAL:
            r = tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0)
            # Round the sum to the residual stream's dtype before normalising, as the unfused add does.
            h = (x.to(tl.float32) + r.to(tl.float32)).to(res_out_ptr.dtype.element_ty)
            tl.store(res_out_ptr + row * stride_ro + cols, h, mask=mask)
        else:
            h = x
        hf = h.to(tl.float32)
        rstd = tl.rsqrt(tl.sum(hf * hf, axis=0) / hidden + eps)
        normed = (hf * rstd).to(h.dtype)  # the module casts back before the weight multiply
        w = tl.load(w_ptr + cols, mask=mask, other=0.0)
        out = normed.to(tl.float32) * w.to(tl.float32)
        tl.store(out_ptr + row * stride_o + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm_triton(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of rms_norm_torch; one program per row. x may be (..., H)."""
    shape = x.shape
    hidden = shape[-1]
    x2 = x.reshape(-1, hidden)  # (T, H)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if residual is not None:
        r2 = residual.reshape(-1, hidden)
        if r2.stride(-1) != 1:
            r2 = r2.contiguous()
        res_dtype = torch.promote_types(x.dtype, residual.dtype)
        res_out = torch.empty(x2.shape, dtype=res_dtype, device=x.device)
    else:
        r2 = res_out = x2  # placeholders, not touched
        res_dtype = x.dtype
    out = torch.empty(x2.shape, dtype=torch.promote_types(weight.dtype, res_dtype), device=x.device)
    rows = x2.shape[0]
    if rows:
        block = triton.next_power_of_2(hidden)
        _rms_norm_kernel[(rows,)](
            out,
            res_out,
            x2,
            r2,
            weight,
            eps,
            hidden=hidden,
            stride_x=x2.stride(0),
            stride_r=r2.stride(0),
            stride_o=out.stride(0),
            stride_ro=res_out.stride(0),
            HAS_RESIDUAL=residual is not None,
            BLOCK=block,
            num_warps=4 if block <= 1024 else (8 if block <= 4096 else 16),
            **pdl_launch_args(x.device),
        )
    new_residual = x if residual is None else res_out.view(shape)
    return out.view(shape), new_residual


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused (residual add +) RMSNorm: returns (RMSNorm(x + residual) * weight, x + residual)."""
    if _use_triton(x):
        return rms_norm_triton(x, weight, eps, residual)
    return rms_norm_torch(x, weight, eps, residual)


# --------------------------------------------------------------------------------------------------------
# RoPE + KV-cache write
# --------------------------------------------------------------------------------------------------------


def _rotate_neox(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x (T, H, D); cos, sin (T, 1, D/2) fp32. Rotate halves in fp32, round once to x's dtype.
    half = x.shape[-1] // 2
    xf = x.float()
    x1, x2 = xf[..., :half], xf[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


def rope_and_write_kv_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    cos_sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference. q (T, Hq, D), k/v (T, Hkv, D), positions (T,), cos_sin (max_pos, D) = [cos | sin] (fp32),
    caches (num_blocks, block_size, Hkv, D), slot_mapping (T,) (slot = block * block_size + offset; a
    negative slot marks a padding token whose K/V is not written).

    Rotates q and k in place (neox rotate-halves, models.layers.RotaryEmbedding's numerics), writes the
    rotated k and v into the cache slots, and returns (q, k).
    """
    half = q.shape[-1] // 2
    cs = cos_sin.index_select(0, positions)  # (T, D)
    cos, sin = cs[:, None, :half], cs[:, None, half:]
    q.copy_(_rotate_neox(q, cos, sin))
    k.copy_(_rotate_neox(k, cos, sin))
    nb, bs, h, d = k_cache.shape
    if (slot_mapping.device.type == "cpu" and k_cache.is_contiguous() and v_cache.is_contiguous()
            and (slot_mapping.numel() == 0 or int(slot_mapping.min()) >= 0)):
        # The CPU engine's hot path (no padding slots): one index_copy_ per cache, no boolean-mask gathers.
        k_cache.view(nb * bs, h, d).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
        v_cache.view(nb * bs, h, d).index_copy_(0, slot_mapping, v.to(v_cache.dtype))
        return q, k
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    pages, rows = slots // bs, slots % bs
    k_cache[pages, rows] = k[keep].to(k_cache.dtype)  # index-put: the cache may be a strided view
    v_cache[pages, rows] = v[keep].to(v_cache.dtype)
    return q, k


if HAS_TRITON:

    @triton.jit
    def _rope_write_kv_kernel(
        q_ptr,  # (T, Hq, D), rotated in place
        k_ptr,  # (T, Hkv, D), rotated in place
        v_ptr,  # (T, Hkv, D)
        positions_ptr,  # (T,)
        cos_sin_ptr,  # (max_pos, D) fp32: [cos | sin]
        k_cache_ptr,  # (num_blocks, block_size, Hkv, D)
        v_cache_ptr,
        slot_mapping_ptr,  # (T,)
        # Strides are fixed per model (and per fused-QKV layout): compile-time constants, cheap launches.
        stride_qt: tl.constexpr,
        stride_qh: tl.constexpr,
        stride_kt: tl.constexpr,
        stride_kh: tl.constexpr,
        stride_vt: tl.constexpr,
        stride_vh: tl.constexpr,
        stride_cs: tl.constexpr,
        stride_kcb: tl.constexpr,
        stride_kct: tl.constexpr,
        stride_kch: tl.constexpr,
        stride_vcb: tl.constexpr,
        stride_vct: tl.constexpr,
        stride_vch: tl.constexpr,
        NUM_Q_HEADS: tl.constexpr,
        NUM_KV_HEADS: tl.constexpr,
        HALF: tl.constexpr,  # head_dim // 2
        BLOCK_HQ: tl.constexpr,
        BLOCK_HKV: tl.constexpr,
        BLOCK_HALF: tl.constexpr,
        PAGE_SIZE: tl.constexpr,
        PDL: tl.constexpr = False,  # programmatic dependent launch: see _triton.pdl_wait
    ):
        pdl_wait(PDL)  # reads what the kernel before wrote: after this
        # One program per token: all its heads at once, so cos/sin are loaded once per token.
        tok = tl.program_id(0).to(tl.int64)
        pos = tl.load(positions_ptr + tok).to(tl.int64)
        offs = tl.arange(0, BLOCK_HALF)
        d_mask = offs < HALF
        cos = tl.load(cos_sin_ptr + pos * stride_cs + offs, mask=d_mask, other=0.0).to(tl.float32)[None, :]
        sin = tl.load(cos_sin_ptr + pos * stride_cs + HALF + offs, mask=d_mask, other=0.0).to(tl.float32)[None, :]

        hq = tl.arange(0, BLOCK_HQ)
        q_mask = (hq < NUM_Q_HEADS)[:, None] & d_mask[None, :]
        q_lo = q_ptr + tok * stride_qt + hq[:, None] * stride_qh + offs[None, :]  # (BLOCK_HQ, BLOCK_HALF)
        q1 = tl.load(q_lo, mask=q_mask, other=0.0)
        q2 = tl.load(q_lo + HALF, mask=q_mask, other=0.0)
        q1f, q2f = q1.to(tl.float32), q2.to(tl.float32)
        tl.store(q_lo, (q1f * cos - q2f * sin).to(q1.dtype), mask=q_mask)
        tl.store(q_lo + HALF, (q2f * cos + q1f * sin).to(q1.dtype), mask=q_mask)

        hk = tl.arange(0, BLOCK_HKV)
        k_mask = (hk < NUM_KV_HEADS)[:, None] & d_mask[None, :]
        k_lo = k_ptr + tok * stride_kt + hk[:, None] * stride_kh + offs[None, :]
        k1 = tl.load(k_lo, mask=k_mask, other=0.0)
        k2 = tl.load(k_lo + HALF, mask=k_mask, other=0.0)
        k1f, k2f = k1.to(tl.float32), k2.to(tl.float32)
        k1r = (k1f * cos - k2f * sin).to(k1.dtype)  # rounded to k's dtype first, as the unfused path does
        k2r = (k2f * cos + k1f * sin).to(k1.dtype)
        tl.store(k_lo, k1r, mask=k_mask)
        tl.store(k_lo + HALF, k2r, mask=k_mask)
        v_lo = v_ptr + tok * stride_vt + hk[:, None] * stride_vh + offs[None, :]
        v1 = tl.load(v_lo, mask=k_mask, other=0.0)
        v2 = tl.load(v_lo + HALF, mask=k_mask, other=0.0)

        slot = tl.load(slot_mapping_ptr + tok).to(tl.int64)
        page = slot // PAGE_SIZE
        row = slot % PAGE_SIZE
        # Negative slot: a padding token, nothing to cache. (Broadcast the scalar test over the heads
        # before the &: Triton's interpreter rejects a mask built from a scalar.)
        w_mask = k_mask & ((hk.to(tl.int64) * 0 + slot) >= 0)[:, None]
        kc = k_cache_ptr + page * stride_kcb + row * stride_kct + hk[:, None] * stride_kch + offs[None, :]
        vc = v_cache_ptr + page * stride_vcb + row * stride_vct + hk[:, None] * stride_vch + offs[None, :]
        kc_dtype = k_cache_ptr.dtype.element_ty
        vc_dtype = v_cache_ptr.dtype.element_ty
        tl.store(kc, k1r.to(kc_dtype), mask=w_mask)
        tl.store(kc + HALF, k2r.to(kc_dtype), mask=w_mask)
        tl.store(vc, v1.to(vc_dtype), mask=w_mask)
        tl.store(vc + HALF, v2.to(vc_dtype), mask=w_mask)


def rope_and_write_kv_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    cos_sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of rope_and_write_kv_torch. q, k, v may be strided views (e.g. slices of a fused
    QKV projection's output) as long as head_dim is contiguous."""
    tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    if head_dim % 2:
        raise ValueError(f"rotary embedding needs an even head_dim, got {head_dim}")
    for name, t in (("q", q), ("k", k), ("v", v), ("k_cache", k_cache), ("v_cache", v_cache), ("cos_sin", cos_sin)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} needs a contiguous last dimension")
    if tokens == 0:
        return q, k
    half = head_dim // 2
    _rope_write_kv_kernel[(tokens,)](
        q,
        k,
        v,
        positions,
        cos_sin,
        k_cache,
        v_cache,
        slot_mapping,
        stride_qt=q.stride(0),
        stride_qh=q.stride(1),
        stride_kt=k.stride(0),
        stride_kh=k.stride(1),
        stride_vt=v.stride(0),
        stride_vh=v.stride(1),
        stride_cs=cos_sin.stride(0),
        stride_kcb=k_cache.stride(0),
        stride_kct=k_cache.stride(1),
        stride_kch=k_cache.stride(2),
        stride_vcb=v_cache.stride(0),
        stride_vct=v_cache.stride(1),
        stride_vch=v_cache.stride(2),
        NUM_Q_HEADS=num_q_heads,
        NUM_KV_HEADS=num_kv_heads,
        HALF=half,
        BLOCK_HQ=triton.next_power_of_2(num_q_heads),
        BLOCK_HKV=triton.next_power_of_2(num_kv_heads),
        BLOCK_HALF=triton.next_power_of_2(half),
        PAGE_SIZE=k_cache.shape[1],
        num_warps=4,
        **pdl_launch_args(q.device),
    )
    return q, k


def rope_and_write_kv(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    cos_sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Neox rotary on q (T, Hq, D) and k (T, Hkv, D) in place, then k, v into the cache at slot_mapping.

    Returns (q, k). See rope_and_write_kv_torch for the layouts.
    """
    if _use_triton(q):
        return rope_and_write_kv_triton(q, k, v, positions, cos_sin, k_cache, v_cache, slot_mapping)
    return rope_and_write_kv_torch(q, k, v, positions, cos_sin, k_cache, v_cache, slot_mapping)


# --------------------------------------------------------------------------------------------------------
# SwiGLU
# --------------------------------------------------------------------------------------------------------


def silu_and_mul_torch(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Reference: silu(gate) * up, both (T, I)."""
    return F.silu(gate) * up


if HAS_TRITON:

    @triton.jit
    def _silu_and_mul_kernel(
        out_ptr,  # (T, I)
        gate_ptr,  # (T, I), row stride stride_g
        up_ptr,  # (T, I), row stride stride_u
        inter: tl.constexpr,  # I; sizes and strides are fixed per model, so compile-time constants
        stride_g: tl.constexpr,
        stride_u: tl.constexpr,
        stride_o: tl.constexpr,
        UP_OFFSET: tl.constexpr,  # I when gate_ptr and up_ptr are both the fused [gate | up] rows, else 0
        BLOCK: tl.constexpr,
        PDL: tl.constexpr = False,  # programmatic dependent launch: see _triton.pdl_wait
    ):
        pdl_wait(PDL)  # reads what the kernel before wrote: after this
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < inter
        g = tl.load(gate_ptr + row * stride_g + cols, mask=mask, other=0.0)
        u = tl.load(up_ptr + row * stride_u + UP_OFFSET + cols, mask=mask, other=0.0)
        gf = g.to(tl.float32)
        act = (gf / (1.0 + tl.exp(-gf))).to(g.dtype)  # F.silu rounds to the input dtype before the multiply
        out = act.to(tl.float32) * u.to(tl.float32)
        tl.store(out_ptr + row * stride_o + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def _launch_silu_and_mul(gate: torch.Tensor, up: torch.Tensor, inter: int, up_offset: int) -> torch.Tensor:
    tokens = gate.shape[0]
    out = torch.empty((tokens, inter), dtype=torch.promote_types(gate.dtype, up.dtype), device=gate.device)
    if tokens and inter:
        block = min(1024, triton.next_power_of_2(inter))
        _silu_and_mul_kernel[(tokens, triton.cdiv(inter, block))](
            out,
            gate,
            up,
            inter=inter,
            stride_g=gate.stride(0),
            stride_u=up.stride(0),
            stride_o=out.stride(0),
            UP_OFFSET=up_offset,
            BLOCK=block,
            num_warps=4,
            **pdl_launch_args(gate.device),
        )
    return out


def silu_and_mul_split_triton(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Triton silu(gate) * up for gate, up (T, I); row-strided views are fine (no copy)."""
    if gate.shape != up.shape or gate.dim() != 2:
        raise ValueError(f"gate and up must both be (T, I); got {tuple(gate.shape)} and {tuple(up.shape)}")
    if gate.stride(-1) != 1:
        gate = gate.contiguous()
    if up.stride(-1) != 1:
        up = up.contiguous()
    return _launch_silu_and_mul(gate, up, gate.shape[1], 0)


def silu_and_mul_triton(gate_up: torch.Tensor) -> torch.Tensor:
    """Triton SwiGLU on a fused projection's output gate_up (T, 2I) = [gate | up] -> (T, I).

    Reads both halves through one tensor (up at column offset I), so no views are made per call."""
    if gate_up.dim() != 2 or gate_up.shape[1] % 2:
        raise ValueError(f"gate_up must be (T, 2I); got {tuple(gate_up.shape)}")
    if gate_up.stride(-1) != 1:
        gate_up = gate_up.contiguous()
    inter = gate_up.shape[1] // 2
    return _launch_silu_and_mul(gate_up, gate_up, inter, inter)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SwiGLU on gate_up (..., 2I) = [gate | up] (the fused gate+up projection's output) -> (..., I)."""
    if _use_triton(gate_up):
        shape = gate_up.shape
        out = silu_and_mul_triton(gate_up.reshape(-1, shape[-1]) if gate_up.dim() != 2 else gate_up)
        return out if gate_up.dim() == 2 else out.view(*shape[:-1], shape[-1] // 2)
    inter = gate_up.shape[-1] // 2
    return silu_and_mul_torch(gate_up[..., :inter], gate_up[..., inter:])


def silu_and_mul_split(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SwiGLU on separate gate, up (..., I) -> (..., I)."""
    if _use_triton(gate):
        shape = gate.shape
        return silu_and_mul_split_triton(gate.reshape(-1, shape[-1]), up.reshape(-1, shape[-1])).view(shape)
    return silu_and_mul_torch(gate, up)


# --------------------------------------------------------------------------------------------------------
# Sampling without a host sync
# --------------------------------------------------------------------------------------------------------


def greedy_sample(logits: torch.Tensor) -> torch.Tensor:
    """(B, vocab) -> (B,) int64 argmax, left on the device (no .item(), no .tolist())."""
    return torch.argmax(logits, dim=-1)


def sample_top_k_top_p(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Batched temperature / top-k / top-p sampling, all on the device with per-row parameters.

    logits (B, V) float; temperature (B,) (0 means greedy); top_k (B,) int (0 or >= V means off);
    top_p (B,) float (1.0 means off). Returns (B,) int64 token ids, without syncing with the host (no
    data-dependent shapes), so it can sit inside a captured CUDA graph.

    Same truncation rules as vramwise.sampler: top-k keeps ties at the k-th value; top-p keeps the smallest
    set of most likely tokens whose mass reaches top_p, the crossing token included; the most likely token
    is always kept. The draw is an exponential race (argmax p / E, E ~ Exp(1)): exact, and needs no cumsum
    over the vocabulary.
    """
    logits = logits.float()
    vocab = logits.shape[-1]
    greedy = temperature <= 0
    t = torch.where(greedy, torch.ones_like(temperature), temperature).float()
    scaled = logits / t[:, None]  # (B, V)

    sorted_logits, order = torch.sort(scaled, dim=-1, descending=True)  # (B, V)
    k = torch.where((top_k <= 0) | (top_k >= vocab), torch.full_like(top_k, vocab), top_k).long()
    kth = sorted_logits.gather(1, (k - 1)[:, None])  # (B, 1) k-th largest value
    sorted_keep = sorted_logits >= kth
    sorted_probs = torch.softmax(sorted_logits.masked_fill(~sorted_keep, float("-inf")), dim=-1)
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # mass of strictly more likely tokens
    sorted_keep &= mass_before < top_p.float()[:, None]
    sorted_keep[:, 0] = True

    keep = torch.empty_like(sorted_keep).scatter_(1, order, sorted_keep)  # back to vocab order
    probs = torch.softmax(scaled.masked_fill(~keep, float("-inf")), dim=-1)
    noise = torch.empty_like(probs).exponential_(generator=generator)
    drawn = torch.argmax(probs / noise, dim=-1)
    return torch.where(greedy, torch.argmax(logits, dim=-1), drawn)


__all__ = [
    "HAS_TRITON",
    "greedy_sample",
    "rms_norm",
    "rms_norm_torch",
    "rms_norm_triton",
    "rope_and_write_kv",
    "rope_and_write_kv_torch",
    "rope_and_write_kv_triton",
    "sample_top_k_top_p",
    "silu_and_mul",
    "silu_and_mul_split",
    "silu_and_mul_split_triton",
    "silu_and_mul_torch",
    "silu_and_mul_triton",
]
