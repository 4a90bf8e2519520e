"""Prometheus metrics for /metrics, named `vramwise:*` (vLLM's `vllm:*` convention, so dashboards port).

Each app owns its registry (several apps in one process, as in tests, must not collide). Engine gauges
are read at scrape time from the snapshot the engine thread publishes after every iteration, so a scrape
never touches the engine.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from vramwise.engine.async_engine import AsyncEngine
from vramwise.engine.outputs import RequestOutput

# Seconds. CPU decode steps take tens to hundreds of ms; GPU ones a few ms: span both.
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class _EngineCollector(Collector):
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[GaugeMetricFamily]:
        s = self.engine.stats
        yield GaugeMetricFamily("vramwise:num_requests_running", "Sequences in the running batch", value=s.num_running)
        yield GaugeMetricFamily("vramwise:num_requests_waiting", "Sequences waiting to be scheduled", value=s.num_waiting)
        yield GaugeMetricFamily("vramwise:kv_blocks_used", "KV-cache blocks in use", value=s.kv_blocks_used)
        yield GaugeMetricFamily("vramwise:kv_blocks_total", "KV-cache blocks in the pool", value=s.kv_blocks_total)
        usage = s.kv_blocks_used / s.kv_blocks_total if s.kv_blocks_total else 0.0
        yield GaugeMetricFamily("vramwise:kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0..1)", value=usage)
        up = 1.0 if self.engine.is_running else 0.0
        yield GaugeMetricFamily("vramwise:engine_up", "1 while the engine thread runs, 0 once it failed or stopped", value=up)


class ServerMetrics:
    def __init__(self, engine: AsyncEngine) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("vramwise:requests", "HTTP requests by route and status code", ["route", "status"], registry=r)
        self.prompt_tokens = Counter("vramwise:prompt_tokens", "Prompt tokens of accepted requests", registry=r)
        self.generation_tokens = Counter("vramwise:generation_tokens", "Tokens generated (all choices)", registry=r)
        self.finished = Counter("vramwise:request_finished", "Requests that ended, by reason", ["finish_reason"], registry=r)
        self.ttft = Histogram("vramwise:time_to_first_token_seconds", "Arrival to first generated token", buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("vramwise:inter_token_latency_seconds", "Time between a request's successive tokens", buckets=_ITL_BUCKETS, registry=r)
        self.e2e = Histogram("vramwise:e2e_request_latency_seconds", "Arrival to last token", buckets=_LATENCY_BUCKETS, registry=r)
        r.register(_EngineCollector(engine))

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def tracker(self, arrival_time: float) -> RequestTracker:
        return RequestTracker(self, arrival_time)


class RequestTracker:
    """Follows one engine request's outputs: TTFT once, inter-token gaps, tokens, the end."""

    def __init__(self, metrics: ServerMetrics, arrival_time: float) -> None:
        self.m = metrics
        self.arrival = arrival_time
        self.last_token_time: float | None = None
        self.done = False

    def accepted(self, num_prompt_tokens: int) -> None:
        self.m.prompt_tokens.inc(num_prompt_tokens)

    def on_output(self, out: RequestOutput) -> None:
        new = sum(len(c.token_ids_delta) for c in out.outputs)
        if new:
            now = time.monotonic()
            self.m.generation_tokens.inc(new)
            if self.last_token_time is None:
                first = out.metrics.first_token_time or now
                self.m.ttft.observe(max(0.0, first - self.arrival))
            else:
                # One step yields one token per choice; a gap spanning several (a slow reader) is shared.
                per_choice = max(len(c.token_ids_delta) for c in out.outputs)
                gap = (now - self.last_token_time) / per_choice
                for _ in range(per_choice):
                    self.m.itl.observe(gap)
            self.last_token_time = now
        if out.finished and not self.done:
            self.done = True
            self.m.e2e.observe(max(0.0, time.monotonic() - self.arrival))
            for c in out.outputs:
                self.m.finished.labels(c.finish_reason or "unknown").inc()

    def aborted(self) -> None:
        if not self.done:
            self.done = True
            self.m.finished.labels("abort").inc()


class StatusCounterMiddleware:
    """Counts responses by route template and status code (pure ASGI: streaming bodies pass untouched)."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500  # if the app raises before starting a response, the client sees a 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            # Label by route template, never by an arbitrary raw path: unknown paths must not grow the label
            # set. A route without path parameters matched its path exactly, so that path is the template
            # (and keeps its /v1 prefix, which routers included under a prefix do not carry).
            route = scope.get("route")
            if route is None:
                label = "unmatched"
            elif not getattr(route, "param_convertors", None):
                label = scope["path"]
            else:
                label = getattr(route, "path_format", None) or "other"
            self.metrics.requests.labels(label, str(status)).inc()
