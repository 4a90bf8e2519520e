"""Attention over a paged KV cache: pure-torch path (CPU, and the reference for GPU kernels).

Cache layout, per layer: k_cache, v_cache of shape (num_blocks, block_size, num_kv_heads, head_dim).
A sequence's tokens live in the blocks its block_table lists, in order; slot s = block * block_size + offset.
An int8 cache comes with scales (num_blocks, block_size, num_kv_heads) beside it (kernels/kv_quant.py);
K/V are dequantized as they are gathered.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vramwise.kernels.kv_quant import check_kv_scales, dequantize_kv


def write_kv(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Scatter new K/V (T, Hkv, D) into the cache at slot_mapping (T,)."""
    nb, bs, h, d = k_cache.shape
    k_cache.view(nb * bs, h, d).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(nb * bs, h, d).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


def gather_kv(
    cache: torch.Tensor, block_table: torch.Tensor, context_len: int, scale: torch.Tensor | None = None
) -> torch.Tensor:
    """The first context_len tokens of one sequence: (context_len, Hkv, D); dequantized to fp32 when the
    cache is int8 and its scale (num_blocks, block_size, Hkv) is given."""
    nb, bs, h, d = cache.shape
    nblk = -(-context_len // bs)
    pages = block_table[:nblk]
    x = cache.index_select(0, pages).reshape(nblk * bs, h, d)[:context_len]
    if scale is None:
        return x
    return dequantize_kv(x, scale.index_select(0, pages).reshape(nblk * bs, h)[:context_len])


def paged_attention_torch(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    query_start_loc: list[int],
    context_lens: list[int],
    block_tables: torch.Tensor,
    scale: float,
    prepared: dict | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of flattened queries q (T, Hq, D) over each sequence's cached K/V.

    Sequence i owns queries q[query_start_loc[i]:query_start_loc[i+1]] (its newest tokens) and attends
    to its first context_lens[i] cached tokens; query j of n sits at position context_len - n + j.
    Decodes (one query each) run as one padded batch; prefill chunks run one sequence at a time so no
    padding is spent on them. `prepared` is a per-step dict where index tensors are kept across layers.
    k_scale / v_scale: the scales of an int8 cache (num_blocks, block_size, Hkv). Returns (T, Hq, D).
    """
    if not check_kv_scales(k_cache, k_scale, v_scale):
        k_scale = v_scale = None
    out = torch.empty_like(q)
    hq = q.shape[1]
    hkv = k_cache.shape[2]
    rep = hq // hkv
    num_seqs = len(context_lens)
    decode_idx = [i for i in range(num_seqs) if query_start_loc[i + 1] - query_start_loc[i] == 1]
    prefill_idx = [i for i in range(num_seqs) if query_start_loc[i + 1] - query_start_loc[i] > 1]

    if decode_idx:
        _decode_batch(q, k_cache, v_cache, query_start_loc, context_lens, block_tables, scale, decode_idx, out, rep,
                      prepared, k_scale, v_scale)  # fmt: skip

    for i in prefill_idx:
        s, e = query_start_loc[i], query_start_loc[i + 1]
        n, ctx = e - s, context_lens[i]
        k = gather_kv(k_cache, block_tables[i], ctx, k_scale).to(q.dtype)  # (ctx, Hkv, D)
        v = gather_kv(v_cache, block_tables[i], ctx, v_scale).to(q.dtype)
        qi = q[s:e].transpose(0, 1)  # (Hq, n, D)
        ki = k.transpose(0, 1).repeat_interleave(rep, dim=0)  # (Hq, ctx, D)
        vi = v.transpose(0, 1).repeat_interleave(rep, dim=0)
        if n == ctx:
            o = F.scaled_dot_product_attention(qi, ki, vi, is_causal=True, scale=scale)
        else:  # a later prefill chunk: queries sit at the end of the context
            qpos = torch.arange(ctx - n, ctx, device=q.device)[:, None]
            kpos = torch.arange(ctx, device=q.device)[None, :]
            o = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=kpos <= qpos, scale=scale)
        out[s:e] = o.transpose(0, 1)
    return out


def _decode_batch(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    query_start_loc: list[int],
    context_lens: list[int],
    block_tables: torch.Tensor,
    scale: float,
    idx: list[int],
    out: torch.Tensor,
    rep: int,
    prepared: dict | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> None:
    nb, bs, hkv, d = k_cache.shape
    # Index tensors depend only on the batch, not the layer: build once per step when a cache is given.
    key = ("decode", bs)
    if prepared is not None and key in prepared:
        rows, bt, mask, length, first, run = prepared[key]
    else:
        row_list = [query_start_loc[i] for i in idx]
        ctx_list = [context_lens[i] for i in idx]
        rows = torch.tensor(row_list, device=q.device)
        max_blocks = -(-max(ctx_list) // bs)
        bt = block_tables[idx][:, :max_blocks]  # (B, max_blocks)
        if min(ctx_list) == max(ctx_list):
            # One context length (always at batch 1): slice the gathered pages to it and attend without a
            # mask, which keeps CPU SDPA on its unmasked fast path.
            length, mask = ctx_list[0], None
        else:
            length = max_blocks * bs
            ctx = torch.tensor(ctx_list, device=q.device)
            mask = (torch.arange(length, device=q.device)[None, :] < ctx[:, None])[:, None, None, :]  # (B,1,1,L)
        # rows 0..B-1 in order (an all-decode step): q and out are used as they are, no gather or scatter
        first = row_list[0] if row_list == list(range(row_list[0], row_list[0] + len(row_list))) else None
        # One sequence whose pages are consecutive blocks (the block manager hands out a FIFO of free blocks,
        # so a fresh sequence's table usually is one run): read the pages as a view of the pool instead of
        # gathering them. Checked on host tensors only (a device table would need a sync to read).
        run = None
        if len(idx) == 1 and bt.device.type == "cpu":
            pages = bt[0].tolist()
            if pages == list(range(pages[0], pages[0] + len(pages))):
                run = pages[0]
        if prepared is not None:
            prepared[key] = (rows, bt, mask, length, first, run)
    B, max_blocks = bt.shape
    if run is not None:  # (1, L, Hkv, D) views of blocks run .. run + max_blocks - 1
        k = k_cache[run : run + max_blocks].reshape(1, max_blocks * bs, hkv, d)[:, :length]
        v = v_cache[run : run + max_blocks].reshape(1, max_blocks * bs, hkv, d)[:, :length]
    else:
        k = k_cache[bt].reshape(B, max_blocks * bs, hkv, d)[:, :length]  # (B, L, Hkv, D)
        v = v_cache[bt].reshape(B, max_blocks * bs, hkv, d)[:, :length]
    if k_scale is not None and v_scale is not None:  # int8 pages: dequantize with their (token, head) scales
        k = dequantize_kv(k, k_scale[bt].reshape(B, max_blocks * bs, hkv)[:, :length], q.dtype)
        v = dequantize_kv(v, v_scale[bt].reshape(B, max_blocks * bs, hkv)[:, :length], q.dtype)
    k, v = k.transpose(1, 2), v.transpose(1, 2)  # (B, Hkv, L, D)
    qd = (q[first : first + B] if first is not None else q.index_select(0, rows)).unsqueeze(2)  # (B, Hq, 1, D)
    if rep > 1:
        # GQA: repeat K/V heads to (B, Hq, L, D). A broadcast 5-D SDPA avoids the copy but takes CPU SDPA off
        # its fast 4-D path (measured ~25x slower per call for SmolLM2's 9/3 heads).
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
    o = F.scaled_dot_product_attention(qd, k.to(q.dtype), v.to(q.dtype), attn_mask=mask, scale=scale).squeeze(2)
    if first is not None:
        out[first : first + B] = o
    else:
        out.index_copy_(0, rows, o)
