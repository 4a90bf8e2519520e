"""Choice of the attention implementation behind `models.attention.Attention`.

Every backend has the signature of `paged_attention_torch`, plus an optional keyword:

    backend(q (T, Hq, D), k_cache, v_cache, query_start_loc: list[int], context_lens: list[int],
            block_tables (B, max_blocks), scale, *, context_lens_t=None) -> (T, Hq, D)

context_lens_t is context_lens already on q's device as an int32 tensor (AttentionMetadata builds it
once per step), so no layer pays a host-to-device copy for it; max_context_len, when given, bounds the
context of an all-decode batch in place of max(context_lens) (a fixed bound keeps the decode kernel's grid
the same on every CUDA-graph replay); `prepared` is a per-step scratch dict
shared by all layers (the torch path keeps its index tensors there). k_scale / v_scale are the scale pools
(num_blocks, block_size, Hkv) of an int8 cache (kernels/kv_quant.py), None for a float cache; every
backend dequantizes on read.

- CUDA with Triton (`triton_attention`): an all-decode batch goes through the Triton paged-attention
  decode kernel (split-K over long contexts); any batch with a prefill chunk goes through the Triton varlen
  prefill kernel, all sequences (decodes included) in one launch, K/V read straight from the pages.
- `sdpa_prefill_attention`, the alternative for prefill: decode rows through the Triton decode kernel,
  prefill sequences through torch SDPA one at a time on K/V gathered from the pages (flash attention
  for a fresh prompt, lower-right causal for a later chunk).
- Elsewhere: the pure-torch reference.
"""

from __future__ import annotations

from typing import Literal, Protocol

import torch
import torch.nn.functional as F

from vramwise.kernels.paged_attention import gather_kv, paged_attention_torch

try:
    from vramwise.kernels.paged_attention_triton import paged_attention_decode, paged_attention_prefill

    HAS_TRITON = True
except ImportError:  # triton is optional: CPU-only installs run the torch reference
    HAS_TRITON = False

try:  # lower-right causal bias (torch >= 2.3): causal attention for queries at the end of a longer context
    from torch.nn.attention.bias import causal_lower_right
except ImportError:  # pragma: no cover - older torch builds a boolean mask instead
    causal_lower_right = None

_TORCH_VERSION = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
_SDPA_HAS_GQA = _TORCH_VERSION >= (2, 5)  # scaled_dot_product_attention(enable_gqa=...)


class AttentionBackend(Protocol):
    def __call__(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        query_start_loc: list[int],
        context_lens: list[int],
        block_tables: torch.Tensor,
        scale: float,
        *,
        context_lens_t: torch.Tensor | None = None,
        prepared: dict | None = None,
        max_context_len: int | None = None,
        k_scale: torch.Tensor | None = None,
        v_scale: torch.Tensor | None = None,
    ) -> torch.Tensor: ...


def torch_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    query_start_loc: list[int],
    context_lens: list[int],
    block_tables: torch.Tensor,
    scale: float,
    *,
    context_lens_t: torch.Tensor | None = None,
    prepared: dict | None = None,
    max_context_len: int | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """The pure-torch reference, with the backend signature (context_lens_t is not needed there)."""
    return paged_attention_torch(
        q, k_cache, v_cache, query_start_loc, context_lens, block_tables, scale, prepared, k_scale, v_scale
    )


def prefill_attention_sdpa(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    query_start_loc: list[int],
    context_lens: list[int],
    block_tables: torch.Tensor,
    scale: float,
    seq_indices: list[int],
    out: torch.Tensor,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> None:
    """Causal attention for the prefill sequences seq_indices, written into out (T, Hq, D).

    One SDPA call per sequence on its K/V gathered from the pages: no padding between sequences of
    different lengths. A fresh prompt (queries == context) is plain causal attention, which SDPA runs
    with flash attention on CUDA; a later chunk's queries sit at the end of the context, so the causal
    mask is aligned to the lower right.
    """
    hq = q.shape[1]
    hkv = k_cache.shape[2]
    rep = hq // hkv
    for i in seq_indices:
        s, e = query_start_loc[i], query_start_loc[i + 1]
        n, ctx = e - s, context_lens[i]
        k = gather_kv(k_cache, block_tables[i], ctx, k_scale).transpose(0, 1)  # (Hkv, ctx, D)
        v = gather_kv(v_cache, block_tables[i], ctx, v_scale).transpose(0, 1)
        if k.dtype != q.dtype:
            k, v = k.to(q.dtype), v.to(q.dtype)
        qi = q[s:e].transpose(0, 1)  # (Hq, n, D)
        if n == ctx:
            if rep > 1 and _SDPA_HAS_GQA:
                o = F.scaled_dot_product_attention(qi, k, v, is_causal=True, scale=scale, enable_gqa=True)
            else:
                k, v = _repeat_kv(k, v, rep)
                o = F.scaled_dot_product_attention(qi, k, v, is_causal=True, scale=scale)
        else:
            k, v = _repeat_kv(k, v, rep)
            if causal_lower_right is not None:
                mask = causal_lower_right(n, ctx)
            else:
                qpos = torch.arange(ctx - n, ctx, device=q.device)[:, None]
                mask = torch.arange(ctx, device=q.device)[None, :] <= qpos  # (n, ctx)
            o = F.scaled_dot_product_attention(qi, k, v, attn_mask=mask, scale=scale)
        out[s:e] = o.transpose(0, 1)


def _repeat_kv(k: torch.Tensor, v: torch.Tensor, rep: int) -> tuple[torch.Tensor, torch.Tensor]:
    # (Hkv, L, D) -> (Hkv * rep, L, D): each kv head serves `rep` consecutive query heads
    if rep == 1:
        return k, v
    return k.repeat_interleave(rep, dim=0), v.repeat_interleave(rep, dim=0)


def triton_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    query_start_loc: list[int],
    context_lens: list[int],
    block_tables: torch.Tensor,
    scale: float,
    *,
    context_lens_t: torch.Tensor | None = None,
    prepared: dict | None = None,
    max_context_len: int | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton decode kernel for all-decode batches, Triton varlen prefill kernel otherwise."""
    num_seqs = len(context_lens)
    if num_seqs == 0:
        return torch.empty_like(q)
    if q.shape[0] == num_seqs:  # one token per sequence (each has at least one): all decode
        ctx_t = _context_lens_tensor(context_lens, context_lens_t, q.device)
        return paged_attention_decode(
            q, k_cache, v_cache, block_tables[:num_seqs], ctx_t[:num_seqs], scale,
            max_context_len=max_context_len or max(context_lens), k_scale=k_scale, v_scale=v_scale,
        )
    # A step with prefill work is dominated by it; decode rows ride along as one-token tiles, one launch.
    return paged_attention_prefill(
        q, k_cache, v_cache, block_tables, query_start_loc, context_lens, scale, k_scale=k_scale, v_scale=v_scale
    )


def sdpa_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    query_start_loc: list[int],
    context_lens: list[int],
    block_tables: torch.Tensor,
    scale: float,
    *,
    context_lens_t: torch.Tensor | None = None,
    prepared: dict | None = None,
    max_context_len: int | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton decode kernel for one-token sequences, torch SDPA per prefill sequence. See the module doc."""
    num_seqs = len(context_lens)
    num_tokens = q.shape[0]
    if num_seqs == 0:
        return torch.empty_like(q)
    if num_tokens == num_seqs:
        # Every sequence brings one token (each brings at least one): the whole batch is decode, and q,
        # the block tables and the context lengths line up row for row with no gather.
        ctx_t = _context_lens_tensor(context_lens, context_lens_t, q.device)
        return paged_attention_decode(
            q, k_cache, v_cache, block_tables[:num_seqs], ctx_t[:num_seqs], scale,
            max_context_len=max_context_len or max(context_lens), k_scale=k_scale, v_scale=v_scale,
        )

    out = torch.empty_like(q)
    decode_idx = [i for i in range(num_seqs) if query_start_loc[i + 1] - query_start_loc[i] == 1]
    prefill_idx = [i for i in range(num_seqs) if query_start_loc[i + 1] - query_start_loc[i] > 1]
    if decode_idx:
        max_ctx = max(context_lens[i] for i in decode_idx)
        nd = len(decode_idx)
        if decode_idx[-1] == nd - 1:
            # Decodes first (the scheduler's usual order): rows 0..nd-1 of q are theirs; slices, no gather.
            ctx_t = _context_lens_tensor(context_lens, context_lens_t, q.device)[:nd]
            paged_attention_decode(
                q[:nd], k_cache, v_cache, block_tables[:nd], ctx_t, scale, max_context_len=max_ctx, out=out[:nd],
                k_scale=k_scale, v_scale=v_scale,
            )
        else:
            rows = torch.tensor([query_start_loc[i] for i in decode_idx], device=q.device)
            idx = torch.tensor(decode_idx, device=q.device)
            if context_lens_t is not None:
                ctx_t = context_lens_t.index_select(0, idx)
            else:
                ctx_t = torch.tensor([context_lens[i] for i in decode_idx], dtype=torch.int32, device=q.device)
            o = paged_attention_decode(
                q.index_select(0, rows),
                k_cache,
                v_cache,
                block_tables.index_select(0, idx),
                ctx_t,
                scale,
                max_context_len=max_ctx,
                k_scale=k_scale,
                v_scale=v_scale,
            )
            out.index_copy_(0, rows, o)
    if prefill_idx:
        prefill_attention_sdpa(
            q, k_cache, v_cache, query_start_loc, context_lens, block_tables, scale, prefill_idx, out, k_scale, v_scale
        )
    return out


def _context_lens_tensor(
    context_lens: list[int], context_lens_t: torch.Tensor | None, device: torch.device
) -> torch.Tensor:
    if context_lens_t is not None:
        return context_lens_t
    return torch.tensor(context_lens, dtype=torch.int32, device=device)


def select_attention_backend(
    device: torch.device | str, prefill: Literal["triton", "sdpa"] = "triton"
) -> AttentionBackend:
    """The Triton backend on CUDA when Triton is installed; the torch reference elsewhere.

    prefill: "triton" (varlen kernel over the pages, one launch) or "sdpa" (torch SDPA per sequence).
    """
    if prefill not in ("triton", "sdpa"):
        raise ValueError(f"prefill must be 'triton' or 'sdpa', not {prefill!r}")
    device = torch.device(device)
    if device.type == "cuda" and HAS_TRITON:
        return triton_attention if prefill == "triton" else sdpa_prefill_attention
    return torch_attention


__all__: list[str] = [
    "AttentionBackend",
    "HAS_TRITON",
    "prefill_attention_sdpa",
    "sdpa_prefill_attention",
    "select_attention_backend",
    "torch_attention",
    "triton_attention",
]
