"""Host swap space for the paged KV pool: where preempted sequences' KV waits instead of being recomputed.

HostSwapSpace mirrors every tensor of a KVCache that is indexed by block id (page pools and the scale
pools of an int8 cache; dim 2 in all of them: (layers, 2, num_blocks, ...)) with `num_blocks` host blocks.
Block ids on the host side come from a second BlockManager that the scheduler owns (torch-free); the
runner only executes the (src, dst) pairs the scheduler emits, swap-outs before swap-ins, before the step.

Copies between a GPU pool and the host go through one pinned staging buffer of _MAX_CHUNK_BYTES: a
sequence's blocks are scattered over both pools and strided within them (all layers of block b are not
adjacent), so no single DMA can move them; a gather on the source side into a contiguous chunk, one DMA at
pinned speed, and a scatter on the destination side can. The host pool itself stays in pageable memory: a
swap space of several GiB locked in RAM would compete with the pinned weights of streamed layers, and the
host-side gather/scatter is a memcpy at RAM speed, several times the PCIe rate.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from vramwise.engine.runner import KVCache

# Most bytes one copy moves through the staging buffer (and through the gather temporary on the GPU, which
# bounds the extra GPU memory a swap needs under a tight budget). One block of Llama-2-13B in fp16 is
# 13 MiB over its 40 layers, so this is about one block at a time there.
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
            # empty: only blocks copied out are ever read back, so the pages need not be touched now.
            self.host_pools.append(torch.empty(shape, dtype=pool.dtype, device="cpu"))
        # Copies of GPU pools go through a pinned staging buffer, made on first use (CPU pools copy directly).
        self.staged = [p.device.type == "cuda" for p in self.device_pools]
        self.staging: torch.Tensor | None = None

    @property
    def nbytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.host_pools)

    def swap_out(self, pairs: Sequence[tuple[int, int]]) -> None:
        """Copy device blocks to host blocks: pairs of (device_block, host_block)."""
        for dev, host, staged in zip(self.device_pools, self.host_pools, self.staged):
            self._copy_blocks(dev, host, pairs, staged, out=True)

    def swap_in(self, pairs: Sequence[tuple[int, int]]) -> None:
        """Copy host blocks to device blocks: pairs of (host_block, device_block)."""
        for dev, host, staged in zip(self.device_pools, self.host_pools, self.staged):
            self._copy_blocks(host, dev, pairs, staged, out=False)

    def _stage(self, like: torch.Tensor) -> torch.Tensor:
        """A pinned host tensor shaped and typed like `like` (at most _MAX_CHUNK_BYTES), reused across copies."""
        nbytes = like.numel() * like.element_size()
        if self.staging is None or self.staging.numel() < nbytes:
            pin = torch.cuda.is_available()  # (False only when tests force the staged path on a CPU-only host)
            self.staging = torch.empty(max(nbytes, _MAX_CHUNK_BYTES), dtype=torch.uint8, pin_memory=pin)
        return self.staging[:nbytes].view(like.dtype).view(like.shape)

    def _copy_blocks(
        self, src: torch.Tensor, dst: torch.Tensor, pairs: Sequence[tuple[int, int]], staged: bool, out: bool
    ) -> None:
        """dst[:, :, d] = src[:, :, s] for each (s, d), in chunks of at most _MAX_CHUNK_BYTES.

        The copies are synchronous with respect to the host: when this returns, a swapped-out block's
        device pages may be overwritten (by this step's kernels) and the staging buffer reused."""
        block_bytes = src[:, :, 0].numel() * src.element_size()
        chunk = max(1, _MAX_CHUNK_BYTES // max(block_bytes, 1))
        for i in range(0, len(pairs), chunk):
            part = pairs[i : i + chunk]
            s = torch.tensor([p[0] for p in part], dtype=torch.long, device=src.device)
            d = torch.tensor([p[1] for p in part], dtype=torch.long, device=dst.device)
            if not staged:  # host to host (the CPU as both sides, or the KV of CPU-computed layers)
                dst.index_copy_(2, d, src.index_select(2, s))
            elif out:  # gather on the GPU, one DMA into pinned memory, scatter
                gathered = src.index_select(2, s)
                stage = self._stage(gathered)
                stage.copy_(gathered)
                dst.index_copy_(2, d, stage)
            else:  # gather into pinned memory, one DMA, scatter on the GPU
                shape = (src.shape[0], src.shape[1], len(part), *src.shape[3:])
                stage = self._stage(torch.empty(shape, dtype=src.dtype, device="meta"))
                torch.index_select(src, 2, s, out=stage)
                dst.index_copy_(2, d, stage.to(dst.device))  # a blocking copy: the stage is free afterwards
