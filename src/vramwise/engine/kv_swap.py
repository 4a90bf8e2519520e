"""Host swap space for the paged KV pool: where preempted sequences' KV waits instead of being recomputed.

HostSwapSpace mirrors every tensor of a KVCache that is indexed by block id (page pools and the scale
pools of an int8 cache; dim 2 in all of them) with `num_blocks` host blocks, pinned when the source is on
a GPU so copies run at full PCIe speed. Block ids on the host side come from a second BlockManager that
the scheduler owns (torch-free); the runner only executes the (src, dst) pairs the scheduler emits.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from vramwise.engine.runner import KVCache

# Most bytes a swap copies through one temporary on the source device (index_select gathers the blocks
# of one chunk there): bounds the extra GPU memory a swap-out needs under a tight budget.
# One block of Llama-2-13B in fp16 is 13 MiB over its 40 layers, so this is about one block at a time there.
_MAX_CHUNK_BYTES = 16 << 20


class HostSwapSpace:
    def __init__(self, kv_cache: KVCache, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"swap space needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.device_pools = kv_cache.all_pools()
        self.host_pools: list[torch.Tensor] = []
        for pool in self.device_pools:
            shape = (pool.shape[0], pool.shape[1], num_blocks, *pool.shape[3:])
            pin = pool.device.type == "cuda"
            # empty: only blocks copied out are ever read back, so the pages need not be touched now.
            self.host_pools.append(torch.empty(shape, dtype=pool.dtype, device="cpu", pin_memory=pin))

    @property
    def nbytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.host_pools)

    def swap_out(self, pairs: Sequence[tuple[int, int]]) -> None:
        """Copy device blocks to host blocks: pairs of (device_block, host_block)."""
        for dev, host in zip(self.device_pools, self.host_pools):
            _copy_blocks(dev, host, pairs)

    def swap_in(self, pairs: Sequence[tuple[int, int]]) -> None:
        """Copy host blocks to device blocks: pairs of (host_block, device_block)."""
        for dev, host in zip(self.device_pools, self.host_pools):
            _copy_blocks(host, dev, pairs)


def _copy_blocks(src: torch.Tensor, dst: torch.Tensor, pairs: Sequence[tuple[int, int]]) -> None:
    """dst[:, :, d] = src[:, :, s] for each (s, d), in chunks of at most _MAX_CHUNK_BYTES."""
    block_bytes = src[:, :, 0].numel() * src.element_size()
    chunk = max(1, _MAX_CHUNK_BYTES // max(block_bytes, 1))
    for i in range(0, len(pairs), chunk):
        part = pairs[i : i + chunk]
        s = torch.tensor([p[0] for p in part], dtype=torch.long, device=src.device)
        d = torch.tensor([p[1] for p in part], dtype=torch.long, device=dst.device)
        # Device to host: .to() into pageable memory returns once the data is on the host, so the blocks
        # may be overwritten by the step that follows. Host to device is ordered before the step's kernels
        # on the same stream.
        dst.index_copy_(2, d, src.index_select(2, s).to(dst.device))
