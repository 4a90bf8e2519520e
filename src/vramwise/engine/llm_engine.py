"""LLMEngine: requests in, RequestOutputs out, one scheduler step at a time.

    out = scheduler.schedule(); result = runner.run(out); scheduler.postprocess(out, result.sampled)

then detokenize, apply stop strings, and report what changed. The server wraps it in an async loop
(engine/async_engine.py).

Asynchronous scheduling (EngineConfig.async_scheduling, on by default): a step whose sequences all sample with
history-free parameters is launched rather than run, and before its sampled ids are read back the scheduler
plans the next step (Scheduler.schedule_lookahead) and the runner launches it, feeding the ids on the device.
So step() returns step N's outputs while step N+1 already runs, and the host's bookkeeping (postprocess,
detokenizing, stop strings, the next step's inputs) overlaps the GPU instead of leaving it idle between two
steps. Greedy and seeded outputs are the same as with it off; a sequence that stops at step N has computed
one more token, which is dropped.

One exception: with CPU-computed layers (a mixed placement on a GPU) launching a decode step holds the host
until its last CPU layer is done, so a lookahead launched behind a step that samples first tokens would keep
those tokens from the caller for a whole decode step (~30 ms for 13B under 6 GiB): such a step is collected
before the next one is planned, and the lookahead resumes from the step after it.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from vramwise.config import EngineConfig, ModelConfig, SchedulerConfig
from vramwise.engine.block_manager import BlockManager
from vramwise.engine.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from vramwise.engine.runner import KVCache, ModelRunner, PendingStep, RunnerOutput
from vramwise.engine.scheduler import Scheduler, SchedulerOutput
from vramwise.engine.sequence import Sequence, SequenceStatus
from vramwise.kernels.kv_quant import resolve_kv_cache_dtype
from vramwise.memory.offload import CPU
from vramwise.model_loader import load_model, resolve_device, resolve_dtype
from vramwise.sampling_params import SamplingParams
from vramwise.tokenizer import IncrementalDetokenizer, Tokenizer
from vramwise.weights import open_weights
from vramwise.weights.random_weights import RandomWeightSource

log = logging.getLogger(__name__)

DEFAULT_CPU_KV_BYTES = 1 << 30  # KV pool on CPU when nothing else is said


@dataclass
class _SeqState:
    seq: Sequence
    detok: IncrementalDetokenizer | None  # None when the model has no tokenizer: token ids only
    text: str = ""
    emitted_text: int = 0  # chars of text already reported
    emitted_tokens: int = 0
    logprobs: list[Logprob] = field(default_factory=list)
    stop_reason: str | int | None = None


@dataclass
class _RequestState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[_SeqState]
    metrics: RequestMetrics
    prompt_logprobs: list[Logprob | None] | None = None


@contextlib.contextmanager
def frozen_gc() -> Iterator[None]:
    """Move every object alive now (the model, its modules and tensors, the engine) out of the cyclic garbage
    collector's reach while the block runs: a full collection otherwise walks all of them, a pause of
    milliseconds landing on some decode step. Objects created inside the block are collected as usual.
    VRAMWISE_GC_FREEZE=0 turns it off (for comparison)."""
    if os.environ.get("VRAMWISE_GC_FREEZE", "1") == "0":
        yield
        return
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


class LLMEngine:
    def __init__(self, config: EngineConfig | None = None) -> None:
        config = config or EngineConfig()
        self.config = config
        self.device = resolve_device(config.device)
        source = open_weights(config.model, show_progress=config.show_progress)
        self.source = source
        self.model_config: ModelConfig = source.config
        self.tokenizer: Tokenizer | None = source.load_tokenizer()  # None for random-weight models
        self.dtype = resolve_dtype(config.dtype, self.device, self.model_config)
        self.kv_dtype = resolve_kv_cache_dtype(config.cache.cache_dtype, self.dtype)  # before loading: fail fast
        from dataclasses import replace as _replace

        from vramwise.memory.offload import cpu_weight_options, prefill_offload_threshold, resolve_driver_options

        cpu_weights, prefill_offload = resolve_driver_options(
            config.cpu_weights, config.prefill_offload, config.memory.enabled and self.device.type == "cuda")
        config = self.config = _replace(config, cpu_weights=cpu_weights, prefill_offload=prefill_offload)
        cpu_weight_options(config.cpu_weights)  # a bad --cpu-weights fails before loading too
        prefill_min = prefill_offload_threshold(config)  # a bad threshold fails before loading too
        if isinstance(source, RandomWeightSource):  # draw the weights where they will live
            source.device, source.dtype = self.device, self.dtype
        max_len = min(config.scheduler.max_model_len, self.model_config.max_position_embeddings)
        if self.model_config.sliding_window:
            max_len = min(max_len, int(self.model_config.sliding_window))

        # GPU-memory budget (--gpu-memory): planned before loading, None without one (memory/enforce.py).
        from vramwise.memory import enforce

        self.budget_setup = enforce.prepare_budget(config, source, self.model_config, self.device, self.dtype, max_len)
        self.planner_prediction = self.budget_setup.plan.prediction.to_dict() if self.budget_setup else None
        load_device = self.budget_setup.load_device if self.budget_setup else None
        self.model = load_model(source, self.device, self.dtype, config.quantization, load_device=load_device,
                                lm_head_bits=config.lm_head_bits)
        if config.fuse_projections:  # after loading/quantizing: checkpoints load into the unfused modules
            from vramwise.models.fuse import fuse_projections

            self.fuse_report = fuse_projections(self.model)
        self.offload = None  # OffloadDriver when layers are streamed or computed on the CPU
        if self.budget_setup is not None:
            self.offload = enforce.apply_budget_placement(self.budget_setup, self.model, self.device,
                                                          config.num_stream_buffers,
                                                          prefill_offload_min_tokens=config.prefill_offload_min_tokens)
        elif config.offload:
            from vramwise.memory.offload import OffloadConfig, cpu_weight_options, setup_offload

            cpu_dtype, cpu_weights = cpu_weight_options(config.cpu_weights)
            self.offload = setup_offload(
                self.model, OffloadConfig(placements=config.offload, num_stream_buffers=config.num_stream_buffers,
                                          cpu_dtype=cpu_dtype, cpu_weights=cpu_weights,
                                          prefill_offload_min_tokens=prefill_min),
                self.device,
            )
        self.placement_name = self.offload.summary() if self.offload else "all-resident"
        self.dequant_pipeline = None  # kernels/dequant_pipeline.py: resident int4 weights, no budget, CUDA
        if config.dequant_pipeline and self.device.type == "cuda" and self.offload is None and self.budget_setup is None:
            from vramwise.kernels.dequant_pipeline import install_dequant_pipeline
            from vramwise.quant.linear import QuantLinear

            self.dequant_pipeline = install_dequant_pipeline(
                [m for m in self.model.modules() if isinstance(m, QuantLinear)], self.device)

        max_batched = max(config.scheduler.max_num_batched_tokens, 1)
        if self.budget_setup is not None:  # activations and workspace were planned for this chunk
            max_batched = min(max_batched, self.budget_setup.plan.max_num_batched_tokens)
        self.scheduler_config = SchedulerConfig(
            max_num_seqs=config.scheduler.max_num_seqs,
            max_num_batched_tokens=max_batched,
            max_model_len=max_len,
        )
        block_size = config.cache.block_size
        if self.budget_setup is not None:
            num_blocks = enforce.kv_num_blocks(self.budget_setup, config.cache.num_gpu_blocks)
        else:
            num_blocks = config.cache.num_gpu_blocks or self._default_num_blocks(block_size)
        self.block_manager = BlockManager(num_blocks, block_size)
        eos = frozenset(self.tokenizer.eos_token_ids if self.tokenizer else ()) | frozenset(self.model_config.eos_token_ids)
        self.scheduler = Scheduler(self.scheduler_config, self.block_manager, eos)
        kv_layers = self.offload.kv_layers(self.kv_dtype) if self.offload else None  # CPU layers keep KV on the host
        self.graph_mode, self.graph_bypass_reason = self._graph_mode()
        if self.graph_bypass_reason:
            log.info("decode steps run eagerly: %s", self.graph_bypass_reason)
        self.runner = ModelRunner(
            self.model, self.model_config, self.device, self.kv_dtype, num_blocks, block_size, config.seed, kv_layers,
            graphs=self.graph_mode, max_model_len=max_len, max_num_seqs=self.scheduler_config.max_num_seqs,
        )
        self.swap_block_manager: BlockManager | None = None
        if config.cache.swap_space:  # host blocks for preempted sequences' KV; the scheduler numbers them
            self.swap_block_manager = BlockManager(self.runner.enable_swap(config.cache.swap_space), block_size)
            self.scheduler.swap_manager = self.swap_block_manager
        self._requests: dict[str, _RequestState] = {}
        self._seq_to_req: dict[int, _RequestState] = {}
        self.async_scheduling = config.async_scheduling
        self._pending: PendingStep | None = None  # the step launched ahead (asynchronous scheduling)
        self.num_lookahead_steps = 0  # steps launched before the previous step's ids were read back
        # A decode step with CPU-computed layers holds the host while it launches: the host computes those
        # layers between the device pieces (memory/offload.py "Segmented steps"). A lookahead launched behind a
        # step that samples first tokens would hold those tokens back by a whole decode step (module doc).
        self._launch_holds_host = self.device.type == "cuda" and bool(self.offload and self.offload.layers_with(CPU))
        if self.budget_setup is not None:  # warm-up of the largest steps, then NVML against the budget
            enforce.check_budget(self.budget_setup, self)

    def memory_report(self) -> dict:
        """GPU-memory accounting by term (bytes): see memory/enforce.py memory_report."""
        from vramwise.memory.enforce import memory_report

        return memory_report(self)

    def _graph_mode(self) -> tuple[str, str | None]:
        """("cuda" | "emulate" | "off", why graphs are off when they could have been on)."""
        cfg = self.config
        if cfg.decode_graphs not in ("auto", "emulate", "off"):
            raise ValueError(f"decode_graphs must be 'auto', 'emulate' or 'off', not {cfg.decode_graphs!r}")
        if cfg.enforce_eager or cfg.decode_graphs == "off":
            return "off", None
        # Streamed layers and embeddings on the host are captured with the step (the ring's copies are graph
        # nodes; memory/offload.py "Captured decode steps"); the int8 KV write and read are capturable too
        # (fixed-shape torch ops and the decode kernel with its scale pools; no host sync).
        if cfg.decode_graphs == "emulate":
            return "emulate", None
        if self.device.type != "cuda":
            return "off", None
        blocker = self.offload.capture_blocker() if self.offload is not None else None
        if blocker is not None:
            return "off", blocker
        from vramwise.kernels.attention_backend import HAS_TRITON

        if not HAS_TRITON:
            return "off", "CUDA graphs need the Triton attention backend (triton is not installed)"
        return "cuda", None

    def _default_num_blocks(self, block_size: int) -> int:
        per_block = KVCache.bytes_per_block(self.model_config, block_size, self.kv_dtype)
        want_tokens = self.scheduler_config.max_num_seqs * self.scheduler_config.max_model_len
        want = -(-want_tokens // block_size)
        budget = self.config.cache.kv_cache_memory or DEFAULT_CPU_KV_BYTES
        return max(1, min(want, budget // per_block))

    @property
    def max_model_len(self) -> int:
        return self.scheduler_config.max_model_len

    # -- requests ---------------------------------------------------------------------------------
    def encode_prompt(self, prompt: str | list[int]) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt is empty")
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer (random weights): pass the prompt as token ids")
            return prompt, self.tokenizer.encode(prompt)
        ids = list(prompt)
        if not ids:
            raise ValueError("prompt is empty")
        vocab = self.model_config.vocab_size
        bad = [t for t in ids if not isinstance(t, int) or t < 0 or t >= vocab]
        if bad:
            raise ValueError(f"prompt token id {bad[0]!r} is outside the vocabulary [0, {vocab})")
        return None, ids

    def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        arrival_time: float | None = None,
    ) -> None:
        """Validate and queue. Raises ValueError (naming the problem) before anything is queued."""
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        params.validate()
        text, ids = self.encode_prompt(prompt)
        total = len(ids) + params.max_tokens
        if total > self.max_model_len:
            raise ValueError(
                f"this model's maximum context length is {self.max_model_len} tokens, but the request asks for "
                f"{total} ({len(ids)} in the prompt + {params.max_tokens} max_tokens)"
            )
        now = arrival_time or time.monotonic()
        seqs = [Sequence(request_id, list(ids), params, index=i, arrival_time=now) for i in range(params.n)]
        states = [
            _SeqState(s, IncrementalDetokenizer(self.tokenizer, list(ids), skip_special_tokens=True) if self.tokenizer else None)
            for s in seqs
        ]
        req = _RequestState(request_id, text, list(ids), params, states, RequestMetrics(arrival_time=now))
        added: list[Sequence] = []
        try:
            for s in seqs:
                self.scheduler.add(s)
                added.append(s)
        except ValueError:
            for s in added:
                self.scheduler.finish(s, SequenceStatus.FINISHED_ABORTED)
            raise
        self._requests[request_id] = req
        for st in states:
            self._seq_to_req[st.seq.seq_id] = req

    def abort_request(self, request_id: str) -> bool:
        """Cancel a request; its KV blocks go back to the pool at once. False if unknown or finished."""
        req = self._requests.pop(request_id, None)
        if req is None:
            return False
        for st in req.seqs:
            if not st.seq.is_finished:
                self.scheduler.abort(st.seq)
            self._forget(st.seq)
        self._drop_stale_pending()
        return True

    def _forget(self, seq: Sequence) -> None:
        self._seq_to_req.pop(seq.seq_id, None)
        self.runner.release(seq.seq_id)

    def check_health(self) -> str | None:
        """None when the engine can serve new requests, else what is wrong: called after a failed step (whose
        requests were aborted) to decide whether the engine goes on. Checks that no sequence is left in the
        scheduler, that every KV block is back in the pool, and that the GPU still completes work (a sticky CUDA
        error makes every later call fail)."""
        if self._requests or self.scheduler.num_unfinished:
            return f"{max(len(self._requests), self.scheduler.num_unfinished)} request(s) still in the engine"
        bm = self.block_manager
        if bm.num_free_blocks != bm.num_blocks:
            return f"{bm.num_blocks - bm.num_free_blocks} KV block(s) not returned to the pool"
        if self.device.type == "cuda":
            try:
                torch.cuda.synchronize(self.device)
            except Exception as e:  # noqa: BLE001 - any CUDA failure here means the context is unusable
                return f"the GPU does not answer: {type(e).__name__}: {e}"
        return None

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests)

    @property
    def num_unfinished_requests(self) -> int:
        return len(self._requests)

    # -- the step ---------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        try:
            return self._step()
        except BaseException:
            self._pending = None  # a step launched ahead of a failed one is dropped with it
            raise

    def _step(self) -> list[RequestOutput]:
        pending = self._pending
        if pending is None:
            out = self.scheduler.schedule()
            if out.is_empty and not out.has_swaps:
                return []
            if not (self.async_scheduling and self.runner.can_launch(out)):
                return self._process(out, self.runner.run(out))
            pending = self.runner.launch(out)
        # Step N (pending) is queued on the device. Launch N+1 behind it before reading N's ids back.
        self._pending = None
        nxt = None
        if not (self._launch_holds_host and _samples_first_tokens(pending.out)):
            nxt = self.scheduler.schedule_lookahead(pending.out)
        if nxt is not None:
            self._pending = self.runner.launch(nxt, pending)
            self.num_lookahead_steps += 1
        outputs = self._process(pending.out, self.runner.collect(pending))
        self._drop_stale_pending()
        return outputs

    def _drop_stale_pending(self) -> None:
        """Forget a launched step none of whose sequences still runs (all stopped or were aborted): its ids
        would be dropped anyway, and the next step should be planned afresh."""
        p = self._pending
        if p is not None and not any(s.seq.status is SequenceStatus.RUNNING for s in p.out.scheduled):
            self._pending = None

    def _process(self, out: SchedulerOutput, result: RunnerOutput) -> list[RequestOutput]:
        """Apply one step's results: prompt logprobs, tokens, stop conditions, outputs of touched requests."""
        for seq_id, plps in result.prompt_logprobs.items():
            req = self._seq_to_req.get(seq_id)
            if req is None or req.seqs[0].seq.seq_id != seq_id:
                continue  # one choice's copy is enough
            if req.prompt_logprobs is None:
                req.prompt_logprobs = [None]
            if len(req.prompt_logprobs) < len(req.prompt_token_ids):  # not again after a recompute
                req.prompt_logprobs.extend(plps)
        step = self.scheduler.postprocess(out, result.sampled)
        finished_by_scheduler = {s.seq_id for s in step.finished}

        touched: dict[str, _RequestState] = {}
        for seq in step.updated:
            req = self._seq_to_req.get(seq.seq_id)
            if req is None:
                continue
            st = next(x for x in req.seqs if x.seq is seq)
            token = seq.output_token_ids[-1]
            if seq.seq_id in result.logprobs:
                st.logprobs.append(result.logprobs[seq.seq_id])
            stopped_by_token = seq.status is SequenceStatus.FINISHED_STOPPED and seq.seq_id in finished_by_scheduler
            if stopped_by_token:
                st.stop_reason = token if token in seq.sampling_params.stop_token_ids else None
            elif st.detok is not None:
                self._append_text(st, st.detok.add(token))
            if req.metrics.first_token_time is None:
                req.metrics.first_token_time = time.monotonic()
            touched[req.request_id] = req
        for seq in step.finished:
            req = self._seq_to_req.get(seq.seq_id)
            if req is None:
                continue
            # text the detokenizer still held (an incomplete character at the very end)
            st = next(x for x in req.seqs if x.seq is seq)
            if st.detok is not None:
                self._append_text(st, st.detok.finish())
            touched[req.request_id] = req  # also those that finished without a token (max_tokens=0)

        outputs = [self._make_output(req) for req in touched.values()]
        for o in outputs:
            if o.finished:
                req = self._requests.pop(o.request_id)
                for st in req.seqs:
                    self._forget(st.seq)
        return outputs

    def _append_text(self, st: _SeqState, piece: str) -> None:
        if not piece:
            return
        p = st.seq.sampling_params
        old_len = len(st.text)
        st.text += piece
        if not p.stop:
            return
        longest = max(len(s) for s in p.stop)
        search_from = max(0, old_len - longest + 1)
        hit: tuple[int, str] | None = None
        for s in p.stop:
            i = st.text.find(s, search_from)
            if i != -1 and (hit is None or i < hit[0]):
                hit = (i, s)
        if hit is not None:
            i, s = hit
            st.text = st.text[: i + len(s)] if p.include_stop_str_in_output else st.text[:i]
            st.stop_reason = s
            self.scheduler.finish(st.seq, SequenceStatus.FINISHED_STOPPED)

    @staticmethod
    def _held_back(text: str, stops: list[str]) -> int:
        """Chars at the end of text that could still grow into a stop string: not shown yet."""
        best = 0
        for s in stops:
            for k in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:k]):
                    best = k
                    break
        return best

    def _make_output(self, req: _RequestState) -> RequestOutput:
        outs: list[CompletionOutput] = []
        for st in req.seqs:
            seq = st.seq
            finished = seq.is_finished
            visible = len(st.text) if finished else len(st.text) - self._held_back(st.text, seq.sampling_params.stop)
            text_delta = st.text[st.emitted_text : visible]
            st.emitted_text = max(st.emitted_text, visible)
            toks = seq.output_token_ids
            tok_delta = toks[st.emitted_tokens :]
            lp_delta = st.logprobs[st.emitted_tokens :] if seq.sampling_params.logprobs is not None else []
            st.emitted_tokens = len(toks)
            outs.append(
                CompletionOutput(
                    index=seq.index,
                    text=st.text[:visible],
                    token_ids=list(toks),
                    finish_reason=seq.status.finish_reason,
                    logprobs=list(st.logprobs) if seq.sampling_params.logprobs is not None else None,
                    text_delta=text_delta,
                    token_ids_delta=list(tok_delta),
                    logprobs_delta=list(lp_delta),
                    stop_reason=st.stop_reason,
                )
            )
        finished = all(st.seq.is_finished for st in req.seqs)
        if finished and req.metrics.finished_time is None:
            req.metrics.finished_time = time.monotonic()
        return RequestOutput(
            request_id=req.request_id,
            prompt=req.prompt,
            prompt_token_ids=req.prompt_token_ids,
            outputs=outs,
            finished=finished,
            metrics=req.metrics,
            prompt_logprobs=req.prompt_logprobs,
        )

    # -- scoring ----------------------------------------------------------------------------------
    @torch.inference_mode()
    def score(self, token_ids: list[int]) -> torch.Tensor:
        """Logits (T, vocab) fp32 at every position of token_ids: the model's prediction of the next token.

        Runs outside the request queue (call it while no requests are in flight), in prefill chunks of
        max_num_batched_tokens, borrowing KV blocks for the duration. Used by perplexity evaluation and tests.
        """
        if self.has_unfinished_requests():
            raise RuntimeError("score() needs an idle engine")
        if not token_ids or len(token_ids) > self.max_model_len:
            raise ValueError(f"score() takes 1 to {self.max_model_len} tokens, got {len(token_ids)}")
        from vramwise.engine.scheduler import ScheduledSequence

        seq = Sequence("score", list(token_ids), SamplingParams(max_tokens=1))
        if not self.block_manager.can_allocate(seq, len(token_ids)):
            raise ValueError(f"the KV pool ({self.block_manager.num_blocks} blocks) cannot hold {len(token_ids)} tokens")
        self.block_manager.allocate(seq, len(token_ids))
        chunks = []
        try:
            step = self.scheduler_config.max_num_batched_tokens
            for start in range(0, len(token_ids), step):
                piece = token_ids[start : start + step]
                out = SchedulerOutput([ScheduledSequence(seq, piece, start, list(seq.block_table), False)])
                ids, pos, meta = self.runner.prepare(out)
                hidden = self.model(ids, pos, meta)
                chunks.append(self.model.compute_logits(hidden))
        finally:
            self.block_manager.free(seq)
        return torch.cat(chunks)

    # -- introspection for metrics ----------------------------------------------------------------
    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting) + len(self.scheduler.swapped)  # swapped out: waiting to come back

    @property
    def num_swapped(self) -> int:
        return len(self.scheduler.swapped)

    @property
    def kv_blocks_used(self) -> int:
        return self.block_manager.num_used_blocks

    @property
    def kv_blocks_total(self) -> int:
        return self.block_manager.num_blocks


def default_dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _samples_first_tokens(out: SchedulerOutput) -> bool:
    """True when the step samples some sequence's first output token (it ends that sequence's prefill)."""
    return any(s.sample and not s.seq.output_token_ids for s in out.scheduled)
