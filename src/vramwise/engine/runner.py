"""ModelRunner: turns a SchedulerOutput into batch tensors, runs the model over the paged KV pool, samples.

Batch tensors for T flattened tokens of B sequences:
  input_ids (T,), positions (T,), slot_mapping (T,), block_tables (B, max_blocks), query_start_loc (B+1).

Two ways to run a step:
  run(out)             model, logits, sampling, then the sampled ids on the host: one call, one sync.
  launch(out[, prev])  the same work queued on the device, ending with a non-blocking copy of the sampled ids
  collect(pending)     into pinned memory; collect() waits for it. The engine launches step N+1 before it
                       collects step N (asynchronous scheduling): a lookahead step's input ids are step N's
                       sampled ids, taken on the device (out.prev_rows), so the GPU goes from one step to
                       the next while the host does N's bookkeeping. launch() serves steps whose every
                       sequence samples with history-free parameters (SamplingParams.history_free).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from vramwise.config import ModelConfig
from vramwise.engine.cuda_graphs import DecodeGraphs
from vramwise.engine.scheduler import ScheduledSequence, SchedulerOutput
from vramwise.kernels.attention_backend import select_attention_backend
from vramwise.kernels.kv_quant import KV_SCALE_DTYPE, QUANTIZED_KV_DTYPES
from vramwise.models.attention import AttentionMetadata
from vramwise.sampler import Sampler, SampleRow, token_logprobs

Logprob = tuple[float, list[tuple[int, float]]]  # (chosen token's logprob, top-N pairs)


@dataclass
class PendingStep:
    """A launched step: its sampled ids are on the device now and on the host once `ready` has completed."""

    out: SchedulerOutput
    tokens: torch.Tensor  # (B,) int64 on the device: next token of out.scheduled[i]
    host: torch.Tensor  # (B,) int64 on the host (pinned when the device is CUDA): filled by a non-blocking copy
    ready: torch.cuda.Event | None  # recorded after that copy; None on the CPU (the copy is synchronous)


@dataclass
class RunnerOutput:
    sampled: dict[int, int] = field(default_factory=dict)  # seq_id -> next token
    logprobs: dict[int, Logprob] = field(default_factory=dict)  # seq_id -> logprob of the sampled token
    # seq_id -> logprobs of prompt tokens at positions start_pos+1 .. (those this chunk predicts)
    prompt_logprobs: dict[int, list[Logprob]] = field(default_factory=dict)


class KVCache:
    """The paged KV pool: per layer, K and V of shape (num_blocks, block_size, num_kv_heads, head_dim).

    Every layer has the same block numbering (a sequence's block_table is valid in all of them), but each
    layer's pages may live on their own device in their own dtype (`layers`: one (device, dtype) per layer):
    the offload driver keeps the KV of CPU-computed layers in host memory. Layers sharing a (device, dtype)
    share one tensor (n_layers_there, 2, num_blocks, block_size, num_kv_heads, head_dim).

    Layers whose KV dtype is int8 also get a scale pool (n_layers_there, 2, num_blocks, block_size,
    num_kv_heads) fp16 beside their pages (kernels/kv_quant.py): one scale per token and kv head.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device,
        layers: Sequence[tuple[torch.device, torch.dtype]] | None = None,
    ):
        self.num_blocks = num_blocks
        self.block_size = block_size
        n = cfg.num_hidden_layers
        if layers is None:
            layers = [(device, dtype)] * n
        if len(layers) != n:
            raise ValueError(f"KV placement names {len(layers)} layers, the model has {n}")
        self.layer_placement = [(torch.device(d), t) for d, t in layers]
        groups: dict[tuple[str, torch.dtype], list[int]] = {}
        for i, (d, t) in enumerate(self.layer_placement):
            groups.setdefault((str(d), t), []).append(i)
        page = (num_blocks, block_size, cfg.num_key_value_heads, cfg.head_dim)
        self.pools: dict[tuple[str, torch.dtype], torch.Tensor] = {}
        self.scale_pools: dict[tuple[str, torch.dtype], torch.Tensor] = {}  # int8 groups only
        self._where: list[tuple[torch.Tensor, int]] = [None] * n  # type: ignore[list-item]  # (pool, row)
        for key, idx in groups.items():
            d, t = self.layer_placement[idx[0]]
            pool = torch.zeros((len(idx), 2, *page), dtype=t, device=d)
            self.pools[key] = pool
            if t in QUANTIZED_KV_DTYPES:
                self.scale_pools[key] = torch.zeros((len(idx), 2, *page[:3]), dtype=KV_SCALE_DTYPE, device=d)
            for row, i in enumerate(idx):
                self._where[i] = (pool, row)
        self._layer_key = [(str(d), t) for d, t in self.layer_placement]

    @property
    def tensor(self) -> torch.Tensor:
        """The whole pool, (layers, 2, num_blocks, block_size, kv_heads, head_dim), when one tensor holds it."""
        if len(self.pools) != 1:
            raise RuntimeError("the KV pool is split across devices/dtypes; use layer(i) or pools")
        return next(iter(self.pools.values()))

    @staticmethod
    def bytes_per_block(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
        """Bytes of one block over all layers, K and V, with the scales of an int8 cache (as memory/budget.py's
        kv_bytes_per_token_layer counts them)."""
        elem = torch.empty((), dtype=dtype).element_size()
        per_head = cfg.head_dim * elem
        if dtype in QUANTIZED_KV_DTYPES:
            per_head += torch.empty((), dtype=KV_SCALE_DTYPE).element_size()
        return cfg.num_hidden_layers * 2 * block_size * cfg.num_key_value_heads * per_head

    @property
    def block_nbytes(self) -> int:
        """Bytes one block takes in this pool, all layers and devices, scales included (swap sizing)."""
        return sum(p.numel() * p.element_size() for p in self.all_pools()) // self.num_blocks

    def all_pools(self) -> list[torch.Tensor]:
        """Every tensor indexed by block id on dim 2: page pools, then scale pools."""
        return [*self.pools.values(), *self.scale_pools.values()]

    def nbytes_by_device(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for (dev, _), pool in [*self.pools.items(), *self.scale_pools.items()]:
            out[dev] = out.get(dev, 0) + pool.numel() * pool.element_size()
        return out

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        pool, row = self._where[i]
        return pool[row, 0], pool[row, 1]

    def scales(self, i: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Layer i's K and V scales (num_blocks, block_size, Hkv) when its pages are int8, else None."""
        sp = self.scale_pools.get(self._layer_key[i])
        if sp is None:
            return None
        row = self._where[i][1]
        return sp[row, 0], sp[row, 1]


class ModelRunner:
    def __init__(
        self,
        model: nn.Module,
        cfg: ModelConfig,
        device: torch.device,
        kv_dtype: torch.dtype,
        num_blocks: int,
        block_size: int,
        seed: int = 0,
        kv_layers: Sequence[tuple[torch.device, torch.dtype]] | None = None,
        graphs: Literal["off", "cuda", "emulate"] = "off",
        max_model_len: int | None = None,
        max_num_seqs: int = 1,
    ) -> None:
        """kv_layers: (device, dtype) of each layer's KV pages (OffloadDriver.kv_layers); default: all on
        `device` in `kv_dtype`.

        graphs: "cuda" captures the all-decode step for batch sizes up to max_num_seqs (engine/cuda_graphs.py),
        "emulate" runs the same padded path eagerly (CPU tests), "off" runs every step eagerly. With graphs,
        the KV pool gets one extra block past num_blocks (the padding rows' scratch), which the block
        manager never hands out. max_model_len bounds the context (default: the model's maximum).
        """
        self.model = model
        self.cfg = cfg
        self.device = device
        self.block_size = block_size
        if graphs not in ("off", "cuda", "emulate"):
            raise ValueError(f"graphs must be 'off', 'cuda' or 'emulate', not {graphs!r}")
        pool_blocks = num_blocks + (1 if graphs != "off" else 0)
        self.kv_cache = KVCache(cfg, pool_blocks, block_size, kv_dtype, device, kv_layers)
        for i, attn in enumerate(model.attention_layers()):
            attn.kv_cache = self.kv_cache.layer(i)
            attn.kv_scales = self.kv_cache.scales(i)
            # The backend follows the layer's pages: a layer the offload driver computes on the CPU keeps
            # its KV in host memory and gets the torch path there, whatever the GPU layers use.
            attn.backend = select_attention_backend(self.kv_cache.layer_placement[i][0])
        # Layers computed on the host (their KV is there) get this step's batch tensors there too, built in
        # prepare() from the Python lists: no device-to-host copy, and once per step rather than per layer.
        self._host_layers = any(d.type == "cpu" for d, _ in self.kv_cache.layer_placement) and device.type != "cpu"
        self.sampler = Sampler(seed)
        self._generators: dict[int, torch.Generator] = {}
        self.swap_space = None  # HostSwapSpace once enable_swap() is called
        self.graphs: DecodeGraphs | None = None
        if graphs != "off":
            self.graphs = DecodeGraphs(
                model, device, block_size, max_model_len or cfg.max_position_embeddings, max_num_seqs,
                scratch_block=num_blocks, mode=graphs,
            )
            self.graphs.capture()  # after the KV pool: the graphs bake in its addresses
        # Pinned landing buffers for launched steps' sampled ids: two, so that step N+1 can be launched while
        # step N's copy is still to be read; each reused only after its last copy completed.
        pinned = device.type == "cuda"
        width = max(max_num_seqs, 1)
        self._token_host = [torch.zeros(width, dtype=torch.long, pin_memory=pinned) for _ in range(2)]
        self._token_ready: list[torch.cuda.Event | None] = [None, None]
        self._next_token_buf = 0

    @property
    def graph_pool_bytes(self) -> int:
        """GPU memory held by the captured graphs' shared pool (0 without graphs)."""
        return self.graphs.graph_pool_bytes if self.graphs is not None else 0

    def enable_swap(self, swap_bytes: int) -> int:
        """Allocate a host swap pool of at most swap_bytes (engine/kv_swap.py); returns its number of blocks."""
        from vramwise.engine.kv_swap import HostSwapSpace

        per_block = self.kv_cache.block_nbytes
        n = swap_bytes // per_block
        if n < 1:
            raise ValueError(
                f"swap space of {swap_bytes} bytes holds no KV block (one block of {self.block_size} tokens takes "
                f"{per_block} bytes over all layers); give at least that, or 0 to preempt by recompute"
            )
        self.swap_space = HostSwapSpace(self.kv_cache, n)
        return n

    def swap(self, out: SchedulerOutput) -> None:
        """Copy the step's swap-outs, then its swap-ins (all layers), before the step's model run."""
        if self.swap_space is None:
            raise RuntimeError("the scheduler asked for swaps but the runner has no swap space (enable_swap)")
        if out.blocks_to_swap_out:
            self.swap_space.swap_out(out.blocks_to_swap_out)
        if out.blocks_to_swap_in:
            self.swap_space.swap_in(out.blocks_to_swap_in)

    def release(self, seq_id: int) -> None:
        self._generators.pop(seq_id, None)

    def _generator(self, seq_id: int, seed: int | None, index: int) -> torch.Generator | None:
        if seed is None:
            return None
        g = self._generators.get(seq_id)
        if g is None:
            g = torch.Generator(device=self.device)
            g.manual_seed(seed + index)  # the n choices of one seeded request differ from each other
            self._generators[seq_id] = g
        return g

    def prepare(self, out: SchedulerOutput) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        qsl = [0]
        ctx_lens: list[int] = []
        for s in out.scheduled:
            n = s.num_new_tokens
            input_ids.extend(s.token_ids)
            pos = range(s.start_pos, s.start_pos + n)
            positions.extend(pos)
            slots.extend(s.block_table[p // bs] * bs + p % bs for p in pos)
            qsl.append(qsl[-1] + n)
            ctx_lens.append(s.context_len)
        max_blocks = max(len(s.block_table) for s in out.scheduled)
        bt = [s.block_table + [0] * (max_blocks - len(s.block_table)) for s in out.scheduled]
        up = self._upload
        meta = AttentionMetadata(
            slot_mapping=up(slots, torch.long),
            block_tables=up(bt, torch.long),
            query_start_loc=qsl,
            context_lens=ctx_lens,
            context_lens_t=up(ctx_lens, torch.int32),
            max_context_len=max(ctx_lens),
            all_decode=all(s.num_new_tokens == 1 for s in out.scheduled),
        )
        ids = up(input_ids, torch.long)
        pos_t = up(positions, torch.long)
        if self._host_layers:
            from vramwise.memory.offload import attach_host_step

            attach_host_step(meta, torch.tensor(slots, dtype=torch.long), torch.tensor(bt, dtype=torch.long),
                             torch.tensor(ctx_lens, dtype=torch.int32),
                             (pos_t, torch.tensor(positions, dtype=torch.long)))
        return ids, pos_t, meta

    def _upload(self, values: list, dtype: torch.dtype) -> torch.Tensor:
        """A host list as a tensor on the device. On CUDA through pinned memory with a non-blocking copy:
        torch.tensor(values, device="cuda") copies from pageable memory and then waits for the whole stream,
        which would stall the host behind the step still running (the pinned block is kept alive by torch's
        host allocator until the copy has run)."""
        if self.device.type != "cuda":
            return torch.tensor(values, dtype=dtype, device=self.device)
        return torch.tensor(values, dtype=dtype).pin_memory().to(self.device, non_blocking=True)

    def _forward(self, out: SchedulerOutput, prev_tokens: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, list[int]]:
        """The model over the step's tokens: (hidden (T, H), query_start_loc (B+1)). A decode step the graphs
        serve runs there (T = B); others eagerly. prev_tokens: a lookahead step's input ids come from the
        previous step's sampled ids (out.prev_rows picks the rows), on the device."""
        if self.graphs is not None and self.graphs.eligible(out):
            hidden = self.graphs.run(out, prev_tokens, out.prev_rows)  # (B, hidden): one token per sequence
            return hidden, list(range(len(out.scheduled) + 1))
        ids, positions, meta = self.prepare(out)
        if prev_tokens is not None:
            ids = prev_tokens.index_select(0, self._upload(out.prev_rows, torch.long))  # type: ignore[arg-type]
        return self.model(ids, positions, meta), meta.query_start_loc  # (T, hidden)

    def _sample_row(self, s: ScheduledSequence) -> SampleRow:
        """What the sampler needs of one scheduled sequence (its per-request generator created on first use)."""
        seq = s.seq
        return SampleRow(seq.sampling_params, seq.prompt_token_ids, seq.output_token_ids,
                         self._generator(seq.seq_id, seq.sampling_params.seed, seq.index))

    # -- asynchronous steps -----------------------------------------------------------------------------

    def can_launch(self, out: SchedulerOutput) -> bool:
        """True when launch() can run this step: every scheduled sequence samples with history-free params."""
        return bool(out.scheduled) and all(s.sample and s.seq.sampling_params.history_free for s in out.scheduled)

    @torch.inference_mode()
    def launch(self, out: SchedulerOutput, prev: PendingStep | None = None) -> PendingStep:
        """Queue the step's model run, logits and sampling on the device, then a non-blocking copy of the
        sampled ids to the host. A lookahead step (out.prev_rows set) takes its input ids from prev.tokens."""
        if not self.can_launch(out):
            raise ValueError("launch() needs a step whose every sequence samples with history-free parameters")
        if out.prev_rows is not None and prev is None:
            raise ValueError("a lookahead step needs the pending step whose sampled ids it continues")
        if out.has_swaps:
            self.swap(out)
        n = len(out.scheduled)
        hidden, qsl = self._forward(out, prev.tokens if out.prev_rows is not None else None)  # type: ignore[union-attr]
        logits = self.model.compute_logits(_take_rows(hidden, [qsl[j + 1] - 1 for j in range(n)]))  # (B, vocab) fp32
        tokens = self.sampler.draw(logits, [self._sample_row(s) for s in out.scheduled])  # (B,) int64, no host sync
        k = self._next_token_buf
        self._next_token_buf = 1 - k
        if self.device.type != "cuda":
            return PendingStep(out, tokens, tokens, None)
        ev = self._token_ready[k]
        if ev is not None:
            ev.synchronize()  # its previous copy has landed (and was read, or its step was dropped)
        else:
            ev = self._token_ready[k] = torch.cuda.Event()
        if self._token_host[k].numel() < n:  # a runner built for fewer sequences than this step has: grow
            self._token_host[k] = torch.zeros(n, dtype=torch.long, pin_memory=True)
        host = self._token_host[k][:n]
        host.copy_(tokens, non_blocking=True)
        ev.record()
        return PendingStep(out, tokens, host, ev)

    def collect(self, pending: PendingStep) -> RunnerOutput:
        """Wait for a launched step's sampled ids and return them as run() would."""
        if pending.ready is not None:
            pending.ready.synchronize()
        result = RunnerOutput()
        for s, tok in zip(pending.out.scheduled, pending.host.tolist()):
            result.sampled[s.seq.seq_id] = tok
        return result

    @torch.inference_mode()
    def run(self, out: SchedulerOutput) -> RunnerOutput:
        result = RunnerOutput()
        if out.has_swaps:
            self.swap(out)  # before the model writes into blocks a swap-out just gave up
        if out.is_empty:
            return result
        hidden, query_start_loc = self._forward(out)

        # Rows whose logits we need: last row of each sampling sequence, all rows for prompt logprobs.
        rows: list[int] = []
        sample_rows: list[tuple[int, int]] = []  # (scheduled index, row into logits)
        plp_rows: list[tuple[int, int, int]] = []  # (scheduled index, first row into logits, count)
        for j, s in enumerate(out.scheduled):
            start, end = query_start_loc[j], query_start_loc[j + 1]
            p = s.seq.sampling_params
            if p.prompt_logprobs is not None and s.start_pos < s.seq.num_prompt_tokens:
                # rows start..end-1 predict tokens at positions start_pos+1 .. start_pos+n
                count = min(end - start, s.seq.num_prompt_tokens - 1 - s.start_pos)
                if count > 0:
                    plp_rows.append((j, len(rows), count))
                    rows.extend(range(start, start + count))
            if s.sample:
                sample_rows.append((j, len(rows)))
                rows.append(end - 1)
        if not rows:
            return result
        logits = self.model.compute_logits(_take_rows(hidden, rows))  # (R, vocab) fp32

        if sample_rows:
            srows = [self._sample_row(out.scheduled[j]) for j, _ in sample_rows]
            so = self.sampler(_take_rows(logits, [r for _, r in sample_rows]), srows)
            for (j, _), tok, lp in zip(sample_rows, so.token_ids, so.logprobs):
                sid = out.scheduled[j].seq.seq_id
                result.sampled[sid] = tok
                if lp is not None:
                    result.logprobs[sid] = lp

        for j, first, count in plp_rows:
            s = out.scheduled[j]
            lp = torch.log_softmax(logits[first : first + count], dim=-1)
            targets = s.seq.prompt_token_ids[s.start_pos + 1 : s.start_pos + 1 + count]
            top_n = s.seq.sampling_params.prompt_logprobs or 0
            result.prompt_logprobs[s.seq.seq_id] = [token_logprobs(lp[k], targets[k], top_n) for k in range(count)]
        return result


def _take_rows(t: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """t[rows] for a list of row indices; a run of consecutive rows (every decode step: 0..B-1) is a slice,
    which costs no index tensor, no host-to-device copy and no gather kernel."""
    if rows and rows[-1] - rows[0] == len(rows) - 1 and all(b - a == 1 for a, b in zip(rows, rows[1:])):
        return t[rows[0] : rows[-1] + 1]
    return t[rows]
