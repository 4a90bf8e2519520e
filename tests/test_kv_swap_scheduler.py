"""Swap-space preemption in the scheduler: torch-free, exact block ids of swap-out / swap-in and their order."""

from __future__ import annotations

import subprocess
import sys

import pytest

from vramwise.config import SchedulerConfig
from vramwise.engine.block_manager import BlockManager
from vramwise.engine.scheduler import Scheduler
from vramwise.engine.sequence import Sequence, SequenceStatus
from vramwise.sampling_params import SamplingParams


def make(n_prompt: int, rid: str, max_tokens: int = 8) -> Sequence:
    return Sequence(rid, list(range(1, n_prompt + 1)), SamplingParams(max_tokens=max_tokens, temperature=0))


def sched(gpu_blocks: int, cpu_blocks: int, block_size: int = 4) -> Scheduler:
    cfg = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64, max_model_len=64)
    return Scheduler(cfg, BlockManager(gpu_blocks, block_size), frozenset({0}), swap_manager=BlockManager(cpu_blocks, block_size))


def step(s: Scheduler, token: int):
    out = s.schedule()
    s.postprocess(out, {x.seq.seq_id: token for x in out.scheduled if x.sample})
    return out


def test_swap_module_stays_torch_free():
    code = "import sys, vramwise.engine.scheduler; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_swap_out_then_swap_in_exact_block_ids():
    # 4 GPU blocks of 4 slots, 4 host blocks. Three 4-token prompts take GPU blocks 0, 1, 2.
    s = sched(gpu_blocks=4, cpu_blocks=4)
    a, b, c = (make(4, r) for r in "abc")
    for q in (a, b, c):
        s.add(q)
    step(s, 5)
    assert [q.block_table for q in (a, b, c)] == [[0], [1], [2]]
    # Each needs a 2nd block for token 5; a takes the free block 3, b needs one -> newest (c) swaps out.
    out = step(s, 6)
    assert [x.seq for x in out.scheduled] == [a, b]
    assert out.blocks_to_swap_out == [(2, 0)] and out.swapped_out == [c] and out.preempted == []
    assert c.status is SequenceStatus.SWAPPED and c.block_table == [0] and c.num_computed_tokens == 4
    assert a.block_table == [0, 3] and b.block_table == [1, 2]  # c's GPU block 2 went to b in the same step
    assert s.swap_manager.num_free_blocks == 3 and s.num_swap_outs == 1 and s.num_preemptions == 1
    # No room for c (it needs 2 blocks for 5 tokens): it stays out, a and b decode.
    out = step(s, 7)
    assert [x.seq for x in out.scheduled] == [a, b] and not out.blocks_to_swap_in
    s.finish(a, SequenceStatus.FINISHED_ABORTED)  # frees 0, 3
    out = s.schedule()
    # c comes back into the first free block (0) and grows into 3; it resumes at token 5, no recompute.
    assert out.blocks_to_swap_in == [(0, 0)] and out.swapped_in == [c]
    assert c.block_table == [0, 3] and c.status is SequenceStatus.RUNNING
    sch_c = next(x for x in out.scheduled if x.seq is c)
    assert sch_c.start_pos == 4 and sch_c.token_ids == [5] and sch_c.sample
    assert s.swap_manager.num_free_blocks == 4 and s.num_swap_ins == 1 and not s.swapped


def test_recompute_fallback_when_swap_space_is_full_and_swapped_come_back_before_waiting():
    # 8 GPU blocks of 4, 2 host blocks. Four 8-token prompts: a [0,1], b [2,3], c [4,5], d [6,7].
    s = sched(gpu_blocks=8, cpu_blocks=2)
    a, b, c, d = (make(8, r) for r in "abcd")
    for q in (a, b, c, d):
        s.add(q)
    step(s, 9)
    assert [q.block_table for q in (a, b, c, d)] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    out = step(s, 10)
    # a needs a 3rd block: d (newest) swaps out to host 0, 1 and a takes 6, b takes 7; c then needs one and
    # is itself the newest running: the host pool is full, so c falls back to recompute.
    assert out.blocks_to_swap_out == [(6, 0), (7, 1)]
    assert out.swapped_out == [d] and out.preempted == [c]
    assert c.status is SequenceStatus.WAITING and c.num_computed_tokens == 0 and c.block_table == []
    assert d.status is SequenceStatus.SWAPPED and d.block_table == [0, 1] and d.num_computed_tokens == 8
    assert a.block_table == [0, 1, 6] and b.block_table == [2, 3, 7]
    assert s.num_preemptions == 2 and s.num_swap_outs == 1
    # d needs 3 blocks, 2 are free (c's 4, 5): it waits, and so does c behind it (swapped first).
    out = step(s, 11)
    assert [x.seq for x in out.scheduled] == [a, b] and not out.blocks_to_swap_in
    s.finish(a, SequenceStatus.FINISHED_ABORTED)  # free list now 4, 5, 0, 1, 6
    out = s.schedule()
    assert out.blocks_to_swap_in == [(0, 4), (1, 5)] and d.block_table == [4, 5, 0]
    assert [x.seq for x in out.scheduled] == [b, d]  # c (9 tokens, 3 blocks) does not fit in 1, 6
    assert s.waiting[0] is c and s.swap_manager.num_free_blocks == 2


def test_abort_of_swapped_sequence_frees_host_blocks():
    s = sched(gpu_blocks=3, cpu_blocks=4)
    a, b = make(8, "a", max_tokens=4), make(4, "b", max_tokens=4)
    s.add(a)
    s.add(b)
    step(s, 5)
    out = step(s, 6)  # a [0, 1] needs a 3rd block, b holds the last one: b swaps out
    assert out.swapped_out == [b] and s.swap_manager.num_free_blocks == 3
    assert s.num_unfinished == 2
    s.abort(b)
    assert b.status is SequenceStatus.FINISHED_ABORTED and b.block_table == []
    assert s.swap_manager.num_free_blocks == 4 and not s.swapped and s.num_unfinished == 1


def test_swap_pool_block_size_must_match():
    cfg = SchedulerConfig()
    with pytest.raises(ValueError, match="block_size 8 differs"):
        Scheduler(cfg, BlockManager(4, 16), swap_manager=BlockManager(4, 8))


def test_idle_pool_hands_out_consecutive_blocks_again():
    """Blocks come from a FIFO (freed ones go to the back), but once every block is free again the next
    sequence gets 0, 1, 2, ...: one run of consecutive pages, which CPU layers read as a view."""
    bm = BlockManager(6, 4)
    a, b = make(8, "a"), make(4, "b")
    bm.allocate(a, 8)
    bm.allocate(b, 4)
    bm.free(a)
    c = make(8, "c")
    bm.allocate(c, 8)
    assert c.block_table == [3, 4]  # FIFO while b still holds block 2
    bm.free(b)
    bm.free(c)
    d = make(12, "d")
    bm.allocate(d, 12)
    assert d.block_table == [0, 1, 2]
