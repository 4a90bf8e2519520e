"""Block manager and scheduler: torch-free bookkeeping, exact block ids and preemption order."""

import subprocess
import sys

import pytest

from vramwise.config import SchedulerConfig
from vramwise.engine.block_manager import BlockManager
from vramwise.engine.scheduler import Scheduler
from vramwise.engine.sequence import Sequence, SequenceStatus
from vramwise.sampling_params import SamplingParams


def make(n_prompt: int, max_tokens: int = 8, rid: str = "r") -> Sequence:
    return Sequence(rid, list(range(1, n_prompt + 1)), SamplingParams(max_tokens=max_tokens, temperature=0))


def sched(num_blocks: int, block_size: int = 4, **kw) -> Scheduler:
    cfg = SchedulerConfig(max_num_seqs=kw.get("max_num_seqs", 8), max_num_batched_tokens=kw.get("budget", 64),
                          max_model_len=kw.get("max_model_len", 64))
    return Scheduler(cfg, BlockManager(num_blocks, block_size), eos_token_ids=frozenset({0}))


def test_bookkeeping_imports_no_torch():
    # DESIGN principle 2: sequence, block manager and scheduler are plain Python.
    code = "import sys, vramwise.engine.scheduler; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_block_manager_exact_ids_and_free_order():
    bm = BlockManager(num_blocks=6, block_size=4)
    a, b = make(5), make(3)
    bm.allocate(a, 5)  # 2 blocks
    bm.allocate(b, 3)  # 1 block
    assert a.block_table == [0, 1] and b.block_table == [2]
    bm.allocate(a, 9)  # grows by one
    assert a.block_table == [0, 1, 3]
    bm.free(a)
    assert bm.num_free_blocks == 5 and a.block_table == []
    c = make(16)
    bm.allocate(c, 16)  # FIFO: 4, 5 first, then the freed 0, 1
    assert c.block_table == [4, 5, 0, 1]
    assert not bm.can_allocate(make(8), 8)


def test_prefill_then_decode_and_finish_frees_blocks():
    s = sched(num_blocks=8)
    seq = make(6, max_tokens=3)
    s.add(seq)
    out = s.schedule()
    assert [x.num_new_tokens for x in out.scheduled] == [6] and out.scheduled[0].sample
    assert seq.block_table == [0, 1]
    s.postprocess(out, {seq.seq_id: 7})
    out = s.schedule()
    assert out.scheduled[0].token_ids == [7] and out.scheduled[0].start_pos == 6
    s.postprocess(out, {seq.seq_id: 8})
    out = s.schedule()
    assert seq.block_table == [0, 1]  # 8 tokens fit in two blocks of 4
    res = s.postprocess(out, {seq.seq_id: 9})
    assert seq.status is SequenceStatus.FINISHED_LENGTH and res.finished == [seq]
    assert s.block_manager.num_free_blocks == 8


def test_eos_and_stop_token_finish():
    s = sched(num_blocks=8)
    a = make(3)
    b = Sequence("b", [1, 2], SamplingParams(max_tokens=8, stop_token_ids=[42]))
    s.add(a)
    s.add(b)
    out = s.schedule()
    s.postprocess(out, {a.seq_id: 0, b.seq_id: 42})
    assert a.status is SequenceStatus.FINISHED_STOPPED and b.status is SequenceStatus.FINISHED_STOPPED


def test_chunked_prefill_under_token_budget():
    s = sched(num_blocks=16, budget=5)
    a, b = make(12, rid="a"), make(3, rid="b")
    s.add(a)
    s.add(b)
    out = s.schedule()
    assert [(x.seq is a, x.num_new_tokens, x.sample) for x in out.scheduled] == [(True, 5, False)]
    s.postprocess(out, {})
    out = s.schedule()
    assert [(x.seq is a, x.start_pos, x.num_new_tokens) for x in out.scheduled] == [(True, 5, 5)]
    s.postprocess(out, {})
    out = s.schedule()  # a's last 2 tokens and b's 3 share the step
    assert [(x.seq.request_id, x.num_new_tokens, x.sample) for x in out.scheduled] == [("a", 2, True), ("b", 3, True)]


def test_preemption_takes_newest_and_requeues_it_first():
    # 4 blocks of 4 slots. Three sequences of 4 prompt tokens each take one block each (3 used).
    s = sched(num_blocks=4, block_size=4)
    seqs = [make(4, max_tokens=8, rid=r) for r in "abc"]
    for q in seqs:
        s.add(q)
    out = s.schedule()
    assert [q.block_table for q in seqs] == [[0], [1], [2]]
    s.postprocess(out, {q.seq_id: 5 for q in seqs})
    # Each now needs a second block for token 5; only one free: a gets it, b needs one -> c preempted.
    out = s.schedule()
    assert [x.seq.request_id for x in out.scheduled] == ["a", "b"]
    assert out.preempted == [seqs[2]]
    assert seqs[2].status is SequenceStatus.WAITING and seqs[2].num_computed_tokens == 0
    assert s.waiting[0] is seqs[2]
    assert seqs[0].block_table == [0, 3] and seqs[1].block_table == [1, 2]  # c's freed block 2 went to b
    s.postprocess(out, {seqs[0].seq_id: 6, seqs[1].seq_id: 6})
    # c comes back later and recomputes prompt + its output token
    for q in seqs[:2]:
        s.finish(q, SequenceStatus.FINISHED_ABORTED)
    out = s.schedule()
    assert out.scheduled[0].seq is seqs[2] and out.scheduled[0].token_ids == [1, 2, 3, 4, 5]


def test_request_too_long_for_context_is_refused():
    s = sched(num_blocks=64, max_model_len=16)
    with pytest.raises(ValueError, match="maximum context length is 16.*20 .*12 in the prompt"):
        s.add(make(12, max_tokens=8))
    s2 = sched(num_blocks=2, block_size=4, max_model_len=64)
    with pytest.raises(ValueError, match="KV pool has only 2 blocks"):
        s2.add(make(8, max_tokens=8))


def test_max_num_seqs_caps_admission():
    s = sched(num_blocks=64, max_num_seqs=2)
    for r in "abc":
        s.add(make(2, rid=r))
    out = s.schedule()
    assert len(out.scheduled) == 2 and len(s.waiting) == 1


def test_abort_frees_blocks_immediately():
    s = sched(num_blocks=8)
    a = make(9)
    s.add(a)
    s.schedule()
    assert s.block_manager.num_used_blocks == 3
    s.abort(a)
    assert s.block_manager.num_used_blocks == 0 and a.status is SequenceStatus.FINISHED_ABORTED


def test_token_slice_equals_token_ids_slices():
    from vramwise.engine.sequence import Sequence
    from vramwise.sampling_params import SamplingParams

    seq = Sequence("r", [1, 2, 3, 4], SamplingParams())
    for t in (10, 11, 12):
        seq.append_token(t)
    for start in range(8):
        for stop in range(start, 9):
            assert seq.token_slice(start, stop) == seq.token_ids[start:stop], (start, stop)
