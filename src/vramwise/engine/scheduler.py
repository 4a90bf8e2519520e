"""Scheduler: decides which sequences run in the next step and how many tokens each computes. Torch-free.

One step runs a flat batch of tokens: decodes (1 token each) and prefill chunks, under a token budget
(continuous batching with chunked prefill). When KV blocks run out, the most recently arrived running
sequence is preempted. With swap space (a second BlockManager numbering the blocks of a host KV pool) and
room there, its blocks are swapped out: SchedulerOutput.blocks_to_swap_out lists (gpu_block, cpu_block)
pairs the runner copies before the step runs, and the sequence waits in `swapped` with its computed tokens
intact. Otherwise its blocks are freed and it goes back to the front of the waiting queue, to be prefilled
again from its prompt and the tokens it already produced (preemption by recompute). Swapped sequences come
back (blocks_to_swap_in: (cpu_block, gpu_block) pairs) before any new admission, oldest first, in a step
that preempted nothing.

The step loop:  out = scheduler.schedule(); tokens = runner.run(out); scheduler.postprocess(out, tokens)

Asynchronous scheduling (the engine's one-step lookahead): while step N runs on the device, `schedule_lookahead`
plans step N+1 before N's sampled tokens are known on the host: every sequence of step N that samples and is not
certain to finish by length continues with one token, whose id the runner takes on the device from step N's
output (`SchedulerOutput.prev_rows`). Sequences that then finish at step N (eos, stop token or string, abort)
have computed one token in vain: postprocess skips them, and the KV they wrote went into blocks that are freed
and reused later in stream order. It plans nothing (None) when anything else could happen in N+1: requests
waiting or swapped out, a running sequence left out of step N, a sampling parameter that reads the output history, or
too few free blocks (the regular schedule() then preempts as usual).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from vramwise.config import SchedulerConfig
from vramwise.engine.block_manager import BlockManager
from vramwise.engine.sequence import Sequence, SequenceStatus


LOOKAHEAD_TOKEN = -1  # placeholder in a lookahead step's token_ids: the real id is only on the device


@dataclass
class ScheduledSequence:
    """One sequence's share of a step: compute tokens [start_pos, start_pos + len(token_ids))."""

    seq: Sequence
    token_ids: list[int]  # the new tokens whose K/V this step computes
    start_pos: int  # position of token_ids[0] == seq.num_computed_tokens before the step
    block_table: list[int]
    sample: bool  # True when this step reaches the end of the sequence, so a next token is sampled

    @property
    def num_new_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def context_len(self) -> int:
        """Tokens in the KV cache after this step (what attention reads)."""
        return self.start_pos + len(self.token_ids)


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSequence] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)  # preempted by recompute
    swapped_out: list[Sequence] = field(default_factory=list)  # preempted by swapping their KV to the host
    swapped_in: list[Sequence] = field(default_factory=list)
    # (src, dst) block ids, copied by the runner (all layers, K, V and any scales) before the step runs:
    # swap-in pairs are (cpu_block, gpu_block), swap-out pairs (gpu_block, cpu_block); outs go first.
    blocks_to_swap_in: list[tuple[int, int]] = field(default_factory=list)
    blocks_to_swap_out: list[tuple[int, int]] = field(default_factory=list)
    # A lookahead step (schedule_lookahead): scheduled[i]'s input token is the token the previous step sampled
    # for its row prev_rows[i]; token_ids then hold LOOKAHEAD_TOKEN, not a real id. None for regular steps.
    prev_rows: list[int] | None = None

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled

    @property
    def has_swaps(self) -> bool:
        return bool(self.blocks_to_swap_in or self.blocks_to_swap_out)


@dataclass
class StepResult:
    """What postprocess reports: sequences that got a token, and those that finished."""

    updated: list[Sequence] = field(default_factory=list)
    finished: list[Sequence] = field(default_factory=list)


class Scheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        block_manager: BlockManager,
        eos_token_ids: frozenset[int] = frozenset(),
        swap_manager: BlockManager | None = None,
    ) -> None:
        """swap_manager: blocks of the host swap pool (same block_size); None = preemption by recompute only."""
        if swap_manager is not None and swap_manager.block_size != block_manager.block_size:
            raise ValueError(
                f"swap pool block_size {swap_manager.block_size} differs from the KV pool's {block_manager.block_size}"
            )
        self.config = config
        self.eos_token_ids = frozenset(eos_token_ids)
        self.block_manager = block_manager
        self.swap_manager = swap_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.swapped: deque[Sequence] = deque()  # oldest first; their block_tables number host blocks
        self.num_preemptions = 0  # all preemptions, by swap or recompute
        self.num_swap_outs = 0  # sequences swapped out / in
        self.num_swap_ins = 0
        self.num_blocks_swapped_out = 0
        self.num_blocks_swapped_in = 0

    # -- queue management -------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        total = seq.num_prompt_tokens + seq.sampling_params.max_tokens
        if total > self.config.max_model_len:
            raise ValueError(
                f"this model's maximum context length is {self.config.max_model_len} tokens, but the request "
                f"asks for {total} ({seq.num_prompt_tokens} in the prompt + {seq.sampling_params.max_tokens} "
                f"max_tokens)"
            )
        needed = self.block_manager.blocks_for_tokens(
            min(seq.num_prompt_tokens + seq.sampling_params.max_tokens, self.config.max_model_len)
        )
        if needed > self.block_manager.num_blocks:
            raise ValueError(
                f"request needs {needed} KV blocks ({seq.num_prompt_tokens} prompt tokens + "
                f"{seq.sampling_params.max_tokens} max_tokens), but the KV pool has only "
                f"{self.block_manager.num_blocks} blocks of {self.block_manager.block_size} tokens"
            )
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def abort(self, seq: Sequence) -> None:
        self.finish(seq, SequenceStatus.FINISHED_ABORTED)

    def finish(self, seq: Sequence, status: SequenceStatus) -> None:
        """Mark finished and return its blocks to the pool at once."""
        assert status.finished
        if seq.status is SequenceStatus.SWAPPED:
            self.swapped.remove(seq)
            assert self.swap_manager is not None
            self.swap_manager.free(seq)  # its table numbers host blocks
            seq.status = status
            return
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        seq.status = status

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running) + len(self.swapped)

    # -- scheduling -------------------------------------------------------------------------------
    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self.running.remove(seq)
        sm = self.swap_manager
        n = len(seq.block_table)
        if sm is not None and n > 0 and n <= sm.num_free_blocks:
            # Swap out: the victim was not scheduled in this step (victims come from the tail of `running`,
            # scheduling from its head), so its table covers exactly its computed tokens.
            gpu_blocks = seq.block_table
            cpu_blocks = sm.take(n)
            out.blocks_to_swap_out.extend(zip(gpu_blocks, cpu_blocks))
            # The GPU blocks may be handed out again in this very step: the runner copies them out first.
            self.block_manager.free(seq)
            seq.block_table = cpu_blocks
            seq.status = SequenceStatus.SWAPPED
            seq.num_preemptions += 1
            self.num_preemptions += 1
            self.num_swap_outs += 1
            self.num_blocks_swapped_out += n
            self.swapped.appendleft(seq)  # victims go newest first, so the oldest ends up in front
            out.swapped_out.append(seq)
            return
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)
        out.preempted.append(seq)

    def _schedule_one(self, seq: Sequence, budget: int) -> ScheduledSequence:
        n = min(seq.num_uncomputed_tokens, budget)
        start = seq.num_computed_tokens
        return ScheduledSequence(
            seq=seq,
            token_ids=seq.token_slice(start, start + n),
            start_pos=start,
            block_table=list(seq.block_table),
            sample=start + n == seq.num_tokens,
        )

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens

        # 1. Running sequences first (FCFS); make room by preempting the newest when blocks run out.
        scheduled_running: list[ScheduledSequence] = []
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_uncomputed_tokens, budget)
            target = seq.num_computed_tokens + n
            while not self.block_manager.can_allocate(seq, target):
                victim = self.running[-1]
                self._preempt(victim, out)
                if victim is seq:
                    break
            if seq.status is not SequenceStatus.RUNNING:
                break  # seq itself was the newest and got preempted: nothing later remains either
            self.block_manager.allocate(seq, target)
            sch = self._schedule_one(seq, n)
            scheduled_running.append(sch)
            budget -= n
            i += 1
        out.scheduled.extend(scheduled_running)

        preempted = bool(out.preempted or out.swapped_out)

        # 2. Swap sequences back in, oldest first, before any new admission; none after a preemption in this
        #    step (the blocks just freed are spoken for). A swapped sequence that does not fit yet holds up
        #    admissions too, so that it is not starved by newer requests.
        if not preempted:
            while self.swapped and budget > 0 and len(self.running) < self.config.max_num_seqs:
                seq = self.swapped[0]
                n = min(seq.num_uncomputed_tokens, budget)
                need = self.block_manager.blocks_for_tokens(seq.num_computed_tokens + n)
                if need > self.block_manager.num_free_blocks:
                    break
                self.swapped.popleft()
                self._swap_in(seq, out)
                self.block_manager.allocate(seq, seq.num_computed_tokens + n)
                out.scheduled.append(self._schedule_one(seq, n))
                budget -= n

        # 3. Admit waiting sequences while there are blocks, seats and budget; none after a preemption
        #    in this step (the pool is tight, admitting would thrash), nor while swapped ones wait.
        if not preempted and not self.swapped:
            while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
                seq = self.waiting[0]
                n = min(seq.num_uncomputed_tokens, budget)
                if not self.block_manager.can_allocate(seq, seq.num_computed_tokens + n):
                    break
                self.waiting.popleft()
                self.block_manager.allocate(seq, seq.num_computed_tokens + n)
                seq.status = SequenceStatus.RUNNING
                self.running.append(seq)
                out.scheduled.append(self._schedule_one(seq, n))
                budget -= n
        return out

    def schedule_lookahead(self, prev: SchedulerOutput) -> SchedulerOutput | None:
        """Step N+1 planned while step `prev` (N) is still running: see the module doc. Allocates the blocks
        the new tokens need; returns None (allocating nothing) when the regular schedule() must decide."""
        if self.waiting or self.swapped or not prev.scheduled:
            return None
        live = [sch.seq.status is SequenceStatus.RUNNING for sch in prev.scheduled]
        if sum(live) != len(self.running):
            return None  # some running sequence sat step N out (token budget): let schedule() pick
        rows: list[int] = []
        next_pos: list[int] = []
        need = 0
        for j, sch in enumerate(prev.scheduled):
            seq = sch.seq
            if not live[j]:
                continue  # stopped (or aborted) after step N was planned: its token there is dropped
            if not sch.sample or not seq.sampling_params.history_free:
                return None
            if sch.start_pos + sch.num_new_tokens != seq.num_tokens:
                return None  # not the sequence's last chunk (cannot happen when sample is set; kept as a guard)
            if self._at_length_limit(seq, pending=1):
                continue  # certain to stop at step N: not in N+1 (the regular schedule would not run it either)
            pos = seq.num_tokens  # the token step N samples sits at this position
            rows.append(j)
            next_pos.append(pos)
            need += self.block_manager.num_blocks_needed(seq, pos + 1)
        if not rows or len(rows) > self.config.max_num_batched_tokens or need > self.block_manager.num_free_blocks:
            return None
        out = SchedulerOutput(prev_rows=rows)
        for j, pos in zip(rows, next_pos):
            seq = prev.scheduled[j].seq
            self.block_manager.allocate(seq, pos + 1)
            out.scheduled.append(ScheduledSequence(seq, [LOOKAHEAD_TOKEN], pos, list(seq.block_table), True))
        return out

    def _at_length_limit(self, seq: Sequence, pending: int = 0) -> bool:
        """True when seq has reached max_tokens or max_model_len, counting `pending` tokens not yet appended
        (1: the token now being sampled for it would be its last)."""
        return (seq.num_output_tokens + pending >= seq.sampling_params.max_tokens
                or seq.num_tokens + pending >= self.config.max_model_len)

    def _swap_in(self, seq: Sequence, out: SchedulerOutput) -> None:
        assert self.swap_manager is not None
        cpu_blocks = seq.block_table
        gpu_blocks = self.block_manager.take(len(cpu_blocks))
        out.blocks_to_swap_in.extend(zip(cpu_blocks, gpu_blocks))
        self.swap_manager.free(seq)  # host blocks are free again once the runner has copied them in
        seq.block_table = gpu_blocks
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)
        self.num_swap_ins += 1
        self.num_blocks_swapped_in += len(gpu_blocks)
        out.swapped_in.append(seq)

    def postprocess(self, out: SchedulerOutput, sampled: dict[int, int]) -> StepResult:
        """Advance computed counts and append sampled tokens (seq_id -> token id).

        Stop conditions that need only token ids (eos, stop_token_ids, max_tokens, max_model_len) are
        applied here; stop strings need text and are applied by the engine through `finish`.
        """
        result = StepResult()
        for sch in out.scheduled:
            seq = sch.seq
            if seq.status is not SequenceStatus.RUNNING:
                continue  # aborted while the step ran
            seq.num_computed_tokens += sch.num_new_tokens
            if not sch.sample:
                continue
            if seq.sampling_params.max_tokens == 0:  # prompt scoring only (echo + logprobs)
                self.finish(seq, SequenceStatus.FINISHED_LENGTH)
                result.finished.append(seq)
                continue
            token = sampled[seq.seq_id]
            seq.append_token(token)
            result.updated.append(seq)
            status = self._check_stop(seq, token)
            if status is not None:
                self.finish(seq, status)
                result.finished.append(seq)
        return result

    def _check_stop(self, seq: Sequence, token: int) -> SequenceStatus | None:
        p = seq.sampling_params
        if token in p.stop_token_ids:
            return SequenceStatus.FINISHED_STOPPED
        if not p.ignore_eos and token in self.eos_token_ids:
            return SequenceStatus.FINISHED_STOPPED
        if self._at_length_limit(seq):
            return SequenceStatus.FINISHED_LENGTH
        return None
