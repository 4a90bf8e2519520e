"""BlockManager: hands out fixed-size KV-cache blocks to sequences. Torch-free.

The KV pool is `num_blocks` blocks of `block_size` token slots. A sequence's block_table lists its blocks in
order; token at position p lives in slot block_table[p // block_size] * block_size + p % block_size.
Free blocks are a FIFO queue, so block ids are handed out in a predictable order (tests rely on it).
"""

from __future__ import annotations

from collections import deque

from vramwise.engine.sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int = 16) -> None:
        if num_blocks < 1:
            raise ValueError(f"the KV pool needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_for_tokens(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def num_blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        """Extra blocks `seq` needs so that its table covers `num_tokens` token slots."""
        return max(0, self.blocks_for_tokens(num_tokens) - len(seq.block_table))

    def can_allocate(self, seq: Sequence, num_tokens: int) -> bool:
        return self.num_blocks_needed(seq, num_tokens) <= len(self._free)

    def allocate(self, seq: Sequence, num_tokens: int) -> None:
        """Grow seq.block_table to cover `num_tokens` slots. Caller checks can_allocate first."""
        need = self.num_blocks_needed(seq, num_tokens)
        if need > len(self._free):
            raise RuntimeError(f"out of KV blocks: need {need}, {len(self._free)} free")
        for _ in range(need):
            seq.block_table.append(self._free.popleft())

    def free(self, seq: Sequence) -> None:
        for b in seq.block_table:
            self._free.append(b)
        seq.block_table = []
        if len(self._free) == self.num_blocks:
            # Idle pool: restart from block 0, so that the next sequences get runs of consecutive blocks again
            # (the FIFO would otherwise hand them out rotated, wrapping past the pool's end). CPU layers read a
            # sequence whose pages are one run as a view of the pool instead of gathering them.
            self._free = deque(range(self.num_blocks))

    def take(self, n: int) -> list[int]:
        """Take n free blocks (used when swapped KV comes back in)."""
        if n > len(self._free):
            raise RuntimeError(f"out of KV blocks: need {n}, {len(self._free)} free")
        return [self._free.popleft() for _ in range(n)]
