"""ModelRunner: turns a SchedulerOutput into batch tensors, runs the model over the paged KV pool, samples.

Batch tensors for T flattened tokens of B sequences:
  input_ids (T,), positions (T,), slot_mapping (T,), block_tables (B, max_blocks), query_start_loc (B+1).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from vramwise.config import ModelConfig
from vramwise.engine.scheduler import SchedulerOutput
from vramwise.models.attention import AttentionMetadata
from vramwise.sampler import Sampler, SampleRow, token_logprobs

Logprob = tuple[float, list[tuple[int, float]]]  # (chosen token's logprob, top-N pairs)


@dataclass
class RunnerOutput:
    sampled: dict[int, int] = field(default_factory=dict)  # seq_id -> next token
    logprobs: dict[int, Logprob] = field(default_factory=dict)  # seq_id -> logprob of the sampled token
    # seq_id -> logprobs of prompt tokens at positions start_pos+1 .. (those this chunk predicts)
    prompt_logprobs: dict[int, list[Logprob]] = field(default_factory=dict)


class KVCache:
    """The paged KV pool: per layer, K and V of shape (num_blocks, block_size, num_kv_heads, head_dim)."""

    def __init__(self, cfg: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device):
        self.num_blocks = num_blocks
        self.block_size = block_size
        shape = (cfg.num_hidden_layers, 2, num_blocks, block_size, cfg.num_key_value_heads, cfg.head_dim)
        self.tensor = torch.zeros(shape, dtype=dtype, device=device)

    @staticmethod
    def bytes_per_block(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        return cfg.num_hidden_layers * 2 * block_size * cfg.num_key_value_heads * cfg.head_dim * elem

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.tensor[i, 0], self.tensor[i, 1]


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
    ) -> None:
        self.model = model
        self.cfg = cfg
        self.device = device
        self.block_size = block_size
        self.kv_cache = KVCache(cfg, num_blocks, block_size, kv_dtype, device)
        for i, attn in enumerate(model.attention_layers()):
            attn.kv_cache = self.kv_cache.layer(i)
        self.sampler = Sampler(seed)
        self._generators: dict[int, torch.Generator] = {}

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
        dev = self.device
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev),
            block_tables=torch.tensor(bt, dtype=torch.long, device=dev),
            query_start_loc=qsl,
            context_lens=ctx_lens,
            context_lens_t=torch.tensor(ctx_lens, dtype=torch.int32, device=dev),
            max_context_len=max(ctx_lens),
            all_decode=all(s.num_new_tokens == 1 for s in out.scheduled),
        )
        ids = torch.tensor(input_ids, dtype=torch.long, device=dev)
        pos_t = torch.tensor(positions, dtype=torch.long, device=dev)
        return ids, pos_t, meta

    @torch.inference_mode()
    def run(self, out: SchedulerOutput) -> RunnerOutput:
        result = RunnerOutput()
        if out.is_empty:
            return result
        ids, positions, meta = self.prepare(out)
        hidden = self.model(ids, positions, meta)  # (T, hidden)

        # Rows whose logits we need: last row of each sampling sequence, all rows for prompt logprobs.
        rows: list[int] = []
        sample_rows: list[tuple[int, int]] = []  # (scheduled index, row into logits)
        plp_rows: list[tuple[int, int, int]] = []  # (scheduled index, first row into logits, count)
        for j, s in enumerate(out.scheduled):
            start, end = meta.query_start_loc[j], meta.query_start_loc[j + 1]
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
        logits = self.model.compute_logits(hidden[rows])  # (R, vocab) fp32

        if sample_rows:
            srows = [
                SampleRow(
                    params=out.scheduled[j].seq.sampling_params,
                    prompt_token_ids=out.scheduled[j].seq.prompt_token_ids,
                    output_token_ids=out.scheduled[j].seq.output_token_ids,
                    generator=self._generator(
                        out.scheduled[j].seq.seq_id,
                        out.scheduled[j].seq.sampling_params.seed,
                        out.scheduled[j].seq.index,
                    ),
                )
                for j, _ in sample_rows
            ]
            so = self.sampler(logits[[r for _, r in sample_rows]], srows)
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
