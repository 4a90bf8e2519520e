"""What the engine hands back to callers (offline API, server) after each step."""

from __future__ import annotations

from dataclasses import dataclass, field

Logprob = tuple[float, list[tuple[int, float]]]  # (chosen token's logprob, [(token, logprob)] top-N)


@dataclass
class CompletionOutput:
    index: int
    text: str  # everything produced so far (minus text held back while it may still become a stop string)
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    logprobs: list[Logprob] | None = None
    # Since this request's previous output: what the server streams.
    text_delta: str = ""
    token_ids_delta: list[int] = field(default_factory=list)
    logprobs_delta: list[Logprob] = field(default_factory=list)
    stop_reason: str | int | None = None  # the stop string or token id that ended it


@dataclass
class RequestMetrics:
    arrival_time: float
    first_token_time: float | None = None
    finished_time: float | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics
    prompt_logprobs: list[Logprob | None] | None = None  # first prompt token has none

    @property
    def num_generated_tokens(self) -> int:
        return sum(len(o.token_ids) for o in self.outputs)
