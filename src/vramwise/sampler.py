"""Sampler: logits (B, vocab) -> next token per row, with penalties, truncation and per-request seeds.

Order, as in vLLM: penalties -> temperature -> top-k -> top-p -> min-p -> draw. Greedy rows take argmax of
the penalised logits. Seeded rows draw with their own torch.Generator, so a seed gives the same text
whatever else shares the batch. Draws use the exponential-race form (argmax p / q, q ~ Exp(1)), which
samples from p exactly and needs no cumulative sum.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vramwise.sampling_params import SamplingParams


@dataclass
class SampleRow:
    """What the sampler needs to know of one sequence."""

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    generator: torch.Generator | None  # per-sequence generator for seeded requests


@dataclass
class SamplerOutput:
    token_ids: list[int]
    # Per row, when logprobs were asked for: (chosen token's logprob, [(token, logprob)] top-N)
    logprobs: list[tuple[float, list[tuple[int, float]]] | None]


def apply_penalties(logits: torch.Tensor, rows: list[SampleRow]) -> torch.Tensor:
    """Repetition (prompt + output), presence and frequency (output only) penalties, in place."""
    vocab = logits.shape[-1]
    for i, r in enumerate(rows):
        p = r.params
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(r.prompt_token_ids) | set(r.output_token_ids)), dtype=torch.long)
            seen = seen[seen < vocab].to(logits.device)
            if seen.numel():
                vals = logits[i, seen]
                logits[i, seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        if (p.presence_penalty or p.frequency_penalty) and r.output_token_ids:
            out = torch.tensor(r.output_token_ids, dtype=torch.long, device=logits.device)
            counts = torch.zeros(vocab, dtype=logits.dtype, device=logits.device)
            counts.scatter_add_(0, out, torch.ones_like(out, dtype=logits.dtype))
            logits[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)
    return logits


def top_k_top_p_min_p_mask(logits: torch.Tensor, top_k: int, top_p: float, min_p: float) -> torch.Tensor:
    """Boolean mask (vocab,) of the tokens one row keeps.

    top-k: the k largest (ties at the boundary kept); top-p: the smallest prefix of tokens by descending
    probability whose mass reaches top_p (the token that crosses it included); min-p: tokens whose
    probability is at least min_p times the largest. At least the most likely token is always kept.
    """
    keep = torch.ones_like(logits, dtype=torch.bool)
    if top_k and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        keep &= logits >= kth
    if top_p < 1.0 or min_p > 0.0:
        probs = torch.softmax(logits.masked_fill(~keep, float("-inf")), dim=-1)
        if top_p < 1.0:
            sorted_p, order = torch.sort(probs, descending=True)
            mass_before = torch.cumsum(sorted_p, dim=-1) - sorted_p  # mass of strictly more likely tokens
            keep_sorted = mass_before < top_p
            keep_sorted[0] = True
            kp = torch.zeros_like(keep)
            kp[order] = keep_sorted
            keep &= kp
        if min_p > 0.0:
            keep &= probs >= min_p * probs.max()
    keep[torch.argmax(logits)] = True
    return keep


class Sampler:
    def __init__(self, seed: int = 0) -> None:
        self._shared = None  # generator for unseeded rows, created on first use on the right device
        self._seed = seed

    def _shared_gen(self, device: torch.device) -> torch.Generator:
        if self._shared is None or self._shared.device != device:
            self._shared = torch.Generator(device=device)
            self._shared.manual_seed(self._seed)
        return self._shared

    def __call__(self, logits: torch.Tensor, rows: list[SampleRow]) -> SamplerOutput:
        # logits (B, vocab) fp32
        raw_logprobs = None
        if any(r.params.logprobs is not None for r in rows):
            raw_logprobs = torch.log_softmax(logits, dim=-1)
        logits = apply_penalties(logits.clone(), rows)
        tokens: list[int] = self.draw(logits, rows).tolist()  # the step's one host sync

        lps: list[tuple[float, list[tuple[int, float]]] | None] = [None] * len(rows)
        if raw_logprobs is not None:
            for i, r in enumerate(rows):
                if r.params.logprobs is None:
                    continue
                lps[i] = token_logprobs(raw_logprobs[i], tokens[i], r.params.logprobs)
        return SamplerOutput(tokens, lps)

    def draw(self, logits: torch.Tensor, rows: list[SampleRow]) -> torch.Tensor:
        """Next token per row, (B,) int64 on the logits' device, without a host sync: greedy rows take the
        argmax, the others an exponential-race draw from their truncated distribution. `logits` (B, vocab) are
        final (penalties already applied); rows that need no penalties can pass the raw logits."""
        tokens = torch.argmax(logits, dim=-1)  # (B,): every greedy row's answer; sampled rows overwritten below
        for i, r in enumerate(rows):
            if r.params.greedy:
                continue
            p = r.params
            row = logits[i] / p.temperature
            keep = top_k_top_p_min_p_mask(row, p.top_k, p.top_p, p.min_p)
            probs = torch.softmax(row.masked_fill(~keep, float("-inf")), dim=-1)
            gen = r.generator if r.generator is not None else self._shared_gen(logits.device)
            q = torch.empty_like(probs).exponential_(generator=gen)
            tokens[i] = torch.argmax(probs / q)  # a device-side write: no .item()
        return tokens


def token_logprobs(logprobs_row: torch.Tensor, token: int, top_n: int) -> tuple[float, list[tuple[int, float]]]:
    """The chosen token's logprob and the top_n (token, logprob) pairs of one row (vocab,)."""
    chosen = float(logprobs_row[token])
    top: list[tuple[int, float]] = []
    if top_n > 0:
        vals, idx = torch.topk(logprobs_row, top_n)
        top = list(zip(idx.tolist(), vals.tolist()))
    return chosen, top
