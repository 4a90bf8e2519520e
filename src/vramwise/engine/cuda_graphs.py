"""Decode fast path: the all-decode step captured as CUDA graphs for a ladder of batch sizes.

When weights are resident, a decode step is bound by reading them once; at batch 1 the hundreds of kernel
launches of an eager step (several per layer) cost as much host time as the GPU spends. A captured graph
replays all of them with one launch.

What is captured: the model's forward (embedding .. final norm) for B_pad sequences of one token each, for
every B_pad in the ladder 1, 2, 4, 8, ... up to max_num_seqs (max_num_seqs itself is the last rung). The
logits projection and sampling stay eager (they depend on which rows sample and on per-request sampling
parameters; one matmul and a few small kernels).

Static inputs (filled in place before every replay; the graphs read them by address):
    input_ids (B_max,) int64, positions (B_max,) int64, slot_mapping (B_max,) int64,
    block_tables (B_max, max_blocks) int64, context_lens (B_max,) int32.
A batch of B real sequences runs on the smallest rung B_pad >= B. The B_pad - B padding rows are token 0
at position 0 with context 1, their K/V written to, and read from, a scratch block that the runner
reserves past the block manager's range: real pages are never touched, and the padding rows' attention is
well defined (no empty softmax). The attention kernel's grid is sized from a fixed bound on the context
(max_blocks * block_size) instead of this step's longest context, so the launch shape is the same on
every replay.

Streamed models (memory/offload.py, "Captured decode steps"): the offload driver laid over the model
(offload.driver_of) takes part in capture and replay. Before each capture and each replay it brings the
streaming ring to its step-start state and orders the copy stream's earlier work before the graph
(ensure_step_start); around the captured forward, begin_step_capture()/end_step_capture() switch its hooks to
the in-step schedule (the copies of units N..S-1 are graph nodes on the forked copy stream, joined before the
capture ends; no wrap-around prefetch inside) and record a StepSchedule per rung; after each replay,
after_replay(schedule) sets the ring's host state to the schedule's end and issues the deferred wrap-around
copies eagerly. With embeddings on the host, stage_embeddings(ids) puts the step's rows into a static device
buffer the graph reads (ids from the pinned twin of input_ids that _fill wrote). int8 KV pages are captured
like float ones (quantize-on-write is fixed-shape torch ops, the decode kernel reads the scale pools).

CPU layers (a "cpu" or mixed placement): a graph cannot contain host compute, so each rung's step is captured
in pieces, one graph per run of device layers between two CPU layers (OffloadDriver.segment_plan; memory/
offload.py "Segmented steps"). The capture is one forward of the model on a side stream: the driver's hooks
end the current piece's capture at a CPU layer, run that layer once (on the capture's dummy batch, its K/V
written to the scratch block), copy its output into a static device buffer and begin the next piece's
capture, which reads that buffer. At replay the driver runs piece, CPU layer, piece, ...: the CPU layers
eagerly on this step's batch, whose host copy (HostStep) _host_step builds from the pinned twin _fill wrote
(no device-to-host copy besides the hidden state's). The streaming ring is driven eagerly between the pieces
(no copy inside a graph), so the copies of later streamed layers run while the CPU computes. A step of a
placement without CPU layers is captured whole, as above.

Steps that run eagerly: any step with a prefill chunk (more than one new token for some sequence), steps
that need prompt logprobs, more sequences than the largest rung, block tables longer than the bound.

mode "emulate" (CPU, tests): the same ladder, padding and static buffers, but the padded batch runs eagerly
through the model instead of a replay; so a CPU test shows that padding, the scratch block and the buffer
bookkeeping leave outputs unchanged, the parts a graph replay does not change. With a driver, the emulated
step runs the captured step's ring schedule for real (begin_step_capture(live=True)).
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import torch
from torch import nn

from vramwise.engine.scheduler import SchedulerOutput
from vramwise.memory.budget import cuda_graph_capture_sizes
from vramwise.memory.offload import SegmentedStep, StepSchedule, attach_host_step, driver_of
from vramwise.models.attention import AttentionMetadata

log = logging.getLogger(__name__)

GraphMode = Literal["cuda", "emulate"]


def graph_ladder(max_num_seqs: int) -> list[int]:
    """Batch sizes to capture: powers of two below max_num_seqs, then max_num_seqs itself (the planner's
    memory.budget.cuda_graph_capture_sizes: one ladder for the plan and the capture)."""
    return cuda_graph_capture_sizes(max_num_seqs)


class DecodeGraphs:
    """Captured decode steps (mode "cuda") or their CPU emulation (mode "emulate"); see the module doc."""

    def __init__(
        self,
        model: nn.Module,
        device: torch.device,
        block_size: int,
        max_model_len: int,
        max_num_seqs: int,
        scratch_block: int,
        mode: GraphMode,
    ) -> None:
        if mode not in ("cuda", "emulate"):
            raise ValueError(f"graph mode must be 'cuda' or 'emulate', not {mode!r}")
        if mode == "cuda" and device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, the model runs on {device}")
        self.model = model
        self.device = device
        self.mode = mode
        # Streamed layers / embeddings on the host: the offload driver's ring runs inside the captured step
        # (module doc, "Streamed models"); with layers computed on the CPU, the step is captured in pieces
        # around them (module doc, "CPU layers").
        self.offload = driver_of(model)
        blocker = self.offload.capture_blocker() if self.offload is not None else None
        if blocker is not None and mode == "cuda":
            raise ValueError(f"decode graphs cannot be used with this placement: {blocker}; run eagerly")
        # Layers computed on the CPU: each step is captured in pieces around them (module doc, "CPU layers").
        self.segmented = self.offload is not None and self.offload.segmented
        self.schedules: dict[int, StepSchedule] = {}  # B_pad -> what its graph does to the streaming ring
        self.pieces: dict[int, SegmentedStep] = {}  # B_pad -> its captured pieces (segmented steps)
        self._pos_views: dict[int, torch.Tensor] = {}  # B_pad -> the positions view its capture was called with
        self.block_size = block_size
        self.sizes = graph_ladder(max_num_seqs)
        self.max_batch = self.sizes[-1]
        self.max_blocks = -(-max_model_len // block_size)
        self.context_bound = self.max_blocks * block_size  # fixed grid bound for the attention kernel
        self.scratch_block = scratch_block
        bmax, dev, mb = self.max_batch, device, self.max_blocks
        # The static inputs are views of one int64 buffer, so that a step moves all of them with one copy from
        # a pinned host twin (five separate pageable copies cost tens of us of host time between two
        # replays, with the GPU idle):
        #   [input_ids B | positions B | slot_mapping B | context_lens B int32 (B/2 words) | prev_rows B |
        #    block_tables B x MB]
        # prev_rows: for a lookahead step (asynchronous scheduling), the row of the previous step's sampled ids
        # that becomes each row's input id, gathered on the device after the copy.
        half = -(-bmax // 2)
        self._rows_offset = 3 * bmax + half
        self._bt_offset = self._rows_offset + bmax
        size = self._bt_offset + bmax * mb
        self._io = torch.zeros(size, dtype=torch.long, device=dev)
        (self.input_ids, self.positions, self.slot_mapping, self.context_lens, self.prev_rows,
         self.block_tables) = self._views(self._io)
        self._reset_padding()
        # Two pinned twins, used in turn: with asynchronous scheduling step N+1's inputs are written while step
        # N's copy may not have run yet. A twin is written again only once its last copy completed (its event).
        pinned = dev.type == "cuda"
        self._io_host = [torch.zeros(size, dtype=torch.long, pin_memory=pinned) for _ in range(2)]
        for twin in self._io_host:
            twin.copy_(self._io)  # every twin starts as the device buffers: every row a padding row
        self._host_np = [[t.numpy() for t in self._views(twin)] for twin in self._io_host]  # list -> buffer writes
        self._twin_copied: list[torch.cuda.Event | None] = [None, None]
        self._next_twin = 0
        self._last_twin = 0  # the twin the last _fill wrote
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}  # B_pad -> the graph's output hidden states (B_pad, H)
        self.graph_pool_bytes = 0  # GPU memory the graphs' shared pool holds (measured around capture)
        self.num_replays = 0  # steps served by this path (replays, or emulated replays)

    # -- which steps ------------------------------------------------------------------------------------

    def padded_size(self, batch: int) -> int | None:
        """The rung a batch of `batch` sequences runs on, or None when it is past the ladder."""
        for b in self.sizes:
            if b >= batch:
                return b
        return None

    def eligible(self, out: SchedulerOutput) -> bool:
        """True when every scheduled sequence brings one token, none needs prompt logprobs, and the batch and
        its block tables fit the captured shapes."""
        if not out.scheduled or len(out.scheduled) > self.max_batch:
            return False
        for s in out.scheduled:
            if s.num_new_tokens != 1 or len(s.block_table) > self.max_blocks:
                return False
            if s.seq.sampling_params.prompt_logprobs is not None and s.start_pos < s.seq.num_prompt_tokens:
                return False
        return True

    # -- static buffers ---------------------------------------------------------------------------------

    def _fill(self, out: SchedulerOutput, pad: int, prev_tokens: torch.Tensor | None = None,
              prev_rows: list[int] | None = None) -> list[int]:
        """Write this step's batch into the static buffers (rows 0..B-1) and padding (B..pad-1); with
        prev_tokens (the previous step's sampled ids on the device, (B_prev,) int64), row i's input id is
        prev_tokens[prev_rows[i]]. Returns the context lengths of the pad rows."""
        bs, scratch = self.block_size, self.scratch_block
        n = len(out.scheduled)
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        ctx: list[int] = []
        width = max(len(s.block_table) for s in out.scheduled)
        rows: list[list[int]] = []
        lookahead = prev_tokens is not None
        if lookahead and (prev_rows is None or len(prev_rows) != n):
            raise ValueError("a lookahead step needs one previous row per scheduled sequence")
        for s in out.scheduled:
            p = s.start_pos
            ids.append(0 if lookahead else s.token_ids[0])
            pos.append(p)
            slots.append(s.block_table[p // bs] * bs + p % bs)
            ctx.append(s.context_len)
            rows.append(s.block_table + [0] * (width - len(s.block_table)))
        for _ in range(pad - n):  # padding rows: token 0 at position 0, K/V in the scratch block's slot 0
            ids.append(0)
            pos.append(0)
            slots.append(scratch * bs)
            ctx.append(1)
            rows.append([scratch] + [0] * (width - 1))
        # Entries of block_tables past `width` keep stale values from earlier steps: the kernels never read
        # past a row's context length.
        k = self._last_twin = self._next_twin
        self._next_twin = 1 - k
        ev = self._twin_copied[k]
        if ev is not None:
            ev.synchronize()  # the twin's previous copy has run (long ago: two steps back)
        h_ids, h_pos, h_slots, h_ctx, h_rows, h_bt = self._host_np[k]
        h_ids[:pad] = ids
        h_pos[:pad] = pos
        h_slots[:pad] = slots
        h_ctx[:pad] = ctx
        if lookahead:
            h_rows[:n] = prev_rows
        h_bt[:pad, :width] = rows
        # One copy of the prefix that holds rows 0..pad-1 of everything.
        end = self._bt_offset + pad * self.max_blocks
        self._io[:end].copy_(self._io_host[k][:end], non_blocking=True)
        if self.device.type == "cuda":
            if ev is None:
                ev = self._twin_copied[k] = torch.cuda.Event()
            ev.record()
        if lookahead:  # input ids from the previous step's sampled ids, on the device: (n,) int64
            torch.index_select(prev_tokens, 0, self.prev_rows[:n], out=self.input_ids[:n])
        return ctx

    def _views(self, buf: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(input_ids, positions, slot_mapping, context_lens int32, prev_rows, block_tables (B, MB)) views of
        buf."""
        b = self.max_batch
        return (buf[:b], buf[b:2 * b], buf[2 * b:3 * b], buf[3 * b:self._rows_offset].view(torch.int32)[:b],
                buf[self._rows_offset:self._bt_offset], buf[self._bt_offset:].view(b, self.max_blocks))

    def _meta(self, pad: int, context_lens: list[int]) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:pad],
            block_tables=self.block_tables[:pad],
            query_start_loc=list(range(pad + 1)),
            context_lens=context_lens,
            context_lens_t=self.context_lens[:pad],
            max_context_len=self.context_bound,
            all_decode=True,
        )

    # -- capture and replay -----------------------------------------------------------------------------

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture one graph per rung, largest first, all in one memory pool. Call after the KV pool exists
        (the graphs bake in its addresses) and before serving."""
        if self.mode != "cuda":
            if self.offload is not None:
                self.offload.prepare_step_capture(self.max_batch)
            return
        # Captured with every context length at the bound: the host-side list only tells the attention
        # backend how many sequences there are and (through its max) the grid bound; the kernels read the
        # real lengths from context_lens_t at replay.
        metas = {b: self._meta(b, [self.context_bound] * b) for b in self.sizes}
        self._reset_padding()
        # Warm up every shape first (Triton compiles per shape, the rotary table is built on first use), so
        # that capture records kernels only and the pool measurement below sees the graphs alone. Each warm-up
        # is a whole step, logits included: a streamed lm_head is the ring's last unit and its post-hook issues
        # the copy of its slot's next user (the next step's unit). A forward without the head would leave the
        # head in that slot, so the next forward (or ensure_step_start before the first capture) would reload
        # the slot as a miss: 3 misses with the ladder 1, 2, 4, none of them a serving step's.
        for b in reversed(self.sizes):
            self.model.compute_logits(self.model(self.input_ids[:b], self.positions[:b], metas[b]))
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        before = torch.cuda.memory_reserved(self.device)
        drv = self.offload
        if drv is not None:  # the embedding rows a step reads when the table is on the host: counted as pool
            drv.prepare_step_capture(self.max_batch)
        pool = torch.cuda.graph_pool_handle()
        if self.segmented:
            self._capture_segmented(metas, pool)
            return
        try:
            for b in reversed(self.sizes):  # largest first: smaller graphs reuse its pool blocks
                g = torch.cuda.CUDAGraph()
                if drv is not None:
                    drv.ensure_step_start()  # eager: the ring in its step-start state, copies joined
                with torch.cuda.graph(g, pool=pool):
                    if drv is not None:
                        drv.begin_step_capture()
                    try:
                        self.outputs[b] = self.model(self.input_ids[:b], self.positions[:b], metas[b])
                    except BaseException:
                        if drv is not None:
                            drv.abort_step_capture()
                        raise
                    if drv is not None:
                        self.schedules[b] = drv.end_step_capture()  # joins the copy stream, inside the capture
                self.graphs[b] = g
        except RuntimeError as e:
            raise RuntimeError(f"CUDA-graph capture of the decode step failed ({e}); run with --enforce-eager") from e
        torch.cuda.synchronize(self.device)
        self.graph_pool_bytes = max(0, torch.cuda.memory_reserved(self.device) - before)
        log.info(
            "captured decode graphs for batch sizes %s (pool %.1f MiB)", self.sizes, self.graph_pool_bytes / 2**20
        )

    def _capture_segmented(self, metas: dict[int, AttentionMetadata], pool: Any) -> None:
        """Capture each rung's step in pieces around its CPU layers (module doc, "CPU layers"), on a side stream
        (a capture cannot run on the legacy default stream; between two pieces the CPU layer's copies run
        eagerly on it)."""
        drv = self.offload
        before = torch.cuda.memory_reserved(self.device)
        side = torch.cuda.Stream(device=self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        try:
            with torch.cuda.stream(side):
                for b in reversed(self.sizes):
                    pos = self._pos_views[b] = self.positions[:b]
                    self.outputs[b], self.pieces[b] = drv.segmented_forward(  # type: ignore[union-attr]
                        lambda: self.model(self.input_ids[:b], pos, metas[b]), pool)
        except RuntimeError as e:
            raise RuntimeError(f"CUDA-graph capture of the decode step failed ({e}); run with --enforce-eager") from e
        torch.cuda.current_stream(self.device).wait_stream(side)
        torch.cuda.synchronize(self.device)
        self.graph_pool_bytes = max(0, torch.cuda.memory_reserved(self.device) - before)
        log.info("captured decode graphs for batch sizes %s in %d pieces each around the CPU layers (pool %.1f MiB)",
                 self.sizes, self.pieces[self.sizes[0]].num_graphs, self.graph_pool_bytes / 2**20)

    def _host_step(self, meta: AttentionMetadata, pad: int) -> None:
        """Give `meta` this step's batch on the host for the CPU layers (HostStep), from the pinned twin _fill
        wrote: no device-to-host copy."""
        h_ids, h_pos, h_slots, h_ctx, h_rows, h_bt = self._host_np[self._last_twin]
        pos = self._pos_views.get(pad)
        attach_host_step(meta, torch.from_numpy(h_slots[:pad]), torch.from_numpy(h_bt[:pad]),
                         torch.from_numpy(h_ctx[:pad]), None if pos is None else (pos, torch.from_numpy(h_pos[:pad])))

    def _reset_padding(self) -> None:
        """Every row a padding row (what warm-up and capture run on)."""
        self.input_ids.zero_()
        self.positions.zero_()
        self.slot_mapping.fill_(self.scratch_block * self.block_size)
        self.block_tables.zero_()
        self.block_tables[:, 0] = self.scratch_block
        self.context_lens.fill_(1)

    def run(self, out: SchedulerOutput, prev_tokens: torch.Tensor | None = None,
            prev_rows: list[int] | None = None) -> torch.Tensor:
        """Hidden states (B, hidden) of an eligible step's B sequences, in scheduled order. For a lookahead
        step, prev_tokens/prev_rows give the input ids on the device (see _fill)."""
        n = len(out.scheduled)
        pad = self.padded_size(n)
        if pad is None:
            raise ValueError(f"a batch of {n} sequences is past the captured ladder {self.sizes}")
        ctx = self._fill(out, pad, prev_tokens, prev_rows)
        self.num_replays += 1
        drv = self.offload
        if drv is not None:
            if prev_tokens is None:
                ids = torch.from_numpy(self._host_np[self._last_twin][0][:pad])  # host ids: the twin _fill wrote
            else:
                # A lookahead step's ids exist only on the device: reading them waits for the step before, so
                # with embeddings on the host the lookahead gains nothing (but stays correct).
                ids = self.input_ids[:pad].to("cpu")
            drv.stage_embeddings(ids)
            if not self.segmented:  # a segmented step waits for each piece's own copies instead
                drv.ensure_step_start()
        if self.segmented:
            meta = self._meta(pad, ctx)
            self._host_step(meta, pad)
            if self.mode == "cuda":
                drv.replay_segmented(self.pieces[pad], meta)  # type: ignore[union-attr]
                return self.outputs[pad][:n]
            hidden, _ = drv.segmented_forward(  # type: ignore[union-attr]
                lambda: self.model(self.input_ids[:pad], self.positions[:pad], meta), live=True)
            return hidden[:n]
        if self.mode == "cuda":
            self.graphs[pad].replay()
            if drv is not None:
                drv.after_replay(self.schedules[pad])
            return self.outputs[pad][:n]
        if drv is None:
            return self.model(self.input_ids[:pad], self.positions[:pad], self._meta(pad, ctx))[:n]
        # Emulated with a driver: the same in-step schedule as the capture, run for real.
        drv.begin_step_capture(live=True)
        try:
            hidden = self.model(self.input_ids[:pad], self.positions[:pad], self._meta(pad, ctx))
        finally:
            sched = drv.end_step_capture()
        drv.after_replay(sched)
        return hidden[:n]
