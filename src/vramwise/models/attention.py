"""Attention layer over the paged KV cache, and the metadata the runner builds for it each step."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from vramwise.kernels.attention_backend import torch_attention
from vramwise.kernels.fused import rope_and_write_kv
from vramwise.kernels.kv_quant import QUANTIZED_KV_DTYPES, write_kv_quantized
from vramwise.kernels.paged_attention import write_kv
from vramwise.models.layers import RotaryEmbedding


@dataclass
class AttentionMetadata:
    """Per-step batch description shared by every attention layer.

    T = tokens in the flattened batch, B = sequences.
    """

    slot_mapping: torch.Tensor  # (T,) int64: cache slot each new token's K/V is written to
    block_tables: torch.Tensor  # (B, max_blocks) int32/int64, padded with 0
    query_start_loc: list[int]  # B + 1 offsets into the flat token axis
    context_lens: list[int]  # (B,) tokens cached after this step, per sequence
    context_lens_t: torch.Tensor | None = None  # same on device, for kernels
    max_context_len: int = 0  # bound on context_lens for the decode kernel's grid (0: max(context_lens))
    all_decode: bool = False  # every sequence has exactly one new token
    # Backend scratch shared by all layers of one step (index tensors built once, not per layer).
    prepared: dict = field(default_factory=dict)


class Attention(nn.Module):
    """Writes this step's K/V into the layer's cache pages, then attends over the pages.

    The cache is bound from outside (`kv_cache`), so the model never allocates or sizes it.
    """

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = head_dim**-0.5
        self.kv_cache: tuple[torch.Tensor, torch.Tensor] | None = None  # (num_blocks, block_size, Hkv, D) x2
        self.kv_scales: tuple[torch.Tensor, torch.Tensor] | None = None  # int8 pages: (num_blocks, block_size, Hkv) x2
        self.backend = torch_attention  # the runner picks the device's backend (select_attention_backend)

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        meta: AttentionMetadata,
        positions: torch.Tensor | None = None,
        rotary: RotaryEmbedding | None = None,
    ) -> torch.Tensor:
        """q (T, Hq, D), k/v (T, Hkv, D) -> (T, Hq, D). q, k, v may be views of a fused QKV output (head_dim
        contiguous). With `rotary` (and positions (T,)), q and k are rotated in place and k, v written to the
        pages in one fused kernel (kernels/fused.py rope_and_write_kv); without it they are written as given."""
        if self.kv_cache is None:
            raise RuntimeError("attention layer has no KV cache bound; the runner binds one before running")
        k_cache, v_cache = self.kv_cache
        if k_cache.dtype in QUANTIZED_KV_DTYPES:  # quantize on write, the backend dequantizes on read
            if self.kv_scales is None:
                raise RuntimeError(f"a {k_cache.dtype} KV cache is bound without its scales (kv_scales)")
            if rotary is not None:  # the fused rope + KV write handles float pages only: rotate, then quantize
                if positions is None:
                    raise ValueError("rotary attention needs the token positions")
                q, k = rotary(positions, q, k)
            k_scale, v_scale = self.kv_scales
            write_kv_quantized(k, v, k_cache, v_cache, k_scale, v_scale, meta.slot_mapping)
            return self.backend(
                q, k_cache, v_cache, meta.query_start_loc, meta.context_lens, meta.block_tables, self.scale,
                context_lens_t=meta.context_lens_t, prepared=meta.prepared, max_context_len=meta.max_context_len or None,
                k_scale=k_scale, v_scale=v_scale,
            )
        if rotary is not None:
            if positions is None:
                raise ValueError("rotary attention needs the token positions")
            rope_and_write_kv(q, k, v, positions, rotary.table(q.device), k_cache, v_cache, meta.slot_mapping)
        else:
            write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        return self.backend(
            q, k_cache, v_cache, meta.query_start_loc, meta.context_lens, meta.block_tables, self.scale,
            context_lens_t=meta.context_lens_t, prepared=meta.prepared, max_context_len=meta.max_context_len or None,
        )
