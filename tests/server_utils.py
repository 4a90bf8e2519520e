"""Helpers for the server tests: start `vramwise serve` in a subprocess or an app in a uvicorn thread,
read /metrics, and a scripted stand-in engine for tests of the plumbing (no model, milliseconds)."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from vramwise.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput
from vramwise.sampling_params import SamplingParams

_URL_RE = re.compile(r"at (http://[^\s]+)/v1")


# ---- a real server in a subprocess ------------------------------------------------------------------


@dataclass
class ServerProcess:
    proc: subprocess.Popen[str]
    base_url: str  # http://127.0.0.1:PORT (no /v1)
    api_key: str | None
    log: list[str] = field(default_factory=list)

    @property
    def v1(self) -> str:
        return self.base_url + "/v1"

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def start_server(*args: str, api_key: str | None = None, timeout: float = 180) -> ServerProcess:
    """`vramwise serve --port 0 ARGS` on loopback; returns once /health answers 200."""
    cmd = [sys.executable, "-m", "vramwise.cli", "serve", "--host", "127.0.0.1", "--port", "0", "--device", "cpu", *args]
    if api_key:
        cmd += ["--api-key", api_key]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    log: list[str] = []
    found: dict[str, str] = {}
    ready = threading.Event()

    def drain() -> None:  # keep reading, or a chatty server blocks on a full pipe
        assert proc.stderr is not None
        for line in proc.stderr:
            log.append(line)
            m = _URL_RE.search(line)
            if m and "url" not in found:
                found["url"] = m.group(1)
                ready.set()
        ready.set()

    threading.Thread(target=drain, daemon=True).start()
    deadline = time.monotonic() + timeout
    ready.wait(timeout)
    if "url" not in found:
        proc.kill()
        raise RuntimeError("server did not start:\n" + "".join(log))
    server = ServerProcess(proc, found["url"], api_key, log)
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("server exited:\n" + "".join(log))
        try:
            if httpx.get(server.base_url + "/health", timeout=2).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server never became healthy:\n" + "".join(log))


def metrics(base_url: str) -> dict[str, float]:
    """Every sample of /metrics as {'name{label="v",...}': value}."""
    text = httpx.get(base_url + "/metrics", timeout=10).text
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def wait_for_metric(base_url: str, name: str, want: float, timeout: float = 10) -> float:
    deadline = time.monotonic() + timeout
    value = float("nan")
    while time.monotonic() < deadline:
        value = metrics(base_url).get(name, float("nan"))
        if value == want:
            return value
        time.sleep(0.05)
    return value


# ---- an app in a uvicorn thread (for the stand-in engine) --------------------------------------------


class ThreadedServer:
    """Serve an ASGI app on a free loopback port from a background thread."""

    def __init__(self, app: Any) -> None:
        import uvicorn

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.base_url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> ThreadedServer:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("threaded server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)
        self.sock.close()


# ---- a scripted stand-in for LLMEngine ---------------------------------------------------------------


class FakeTokenizer:
    """One character per token: encode gives code points mod 256, decode takes any code point."""

    eos_token_ids = {0}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [ord(c) % 256 for c in text]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(i) for i in ids)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> list[int]:
        return self.encode("".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>")


@dataclass
class _FakeRequest:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    produced: list[list[int]]
    metrics: RequestMetrics


@dataclass
class _ModelConfig:
    vocab_size: int = 20000


class FakeEngine:
    """Writes "abcdefghij..." one token per step for each choice. A prompt containing "boom" makes the
    step after its first token raise (an engine crash). `step_delay` slows steps down, like a model."""

    REPLY = "abcdefghijklmnopqrstuvwxyz"

    def __init__(self, max_model_len: int = 256, step_delay: float = 0.0) -> None:
        self.tokenizer = FakeTokenizer()
        self.model_config = _ModelConfig()
        self.max_model_len = max_model_len
        self.kv_blocks_total = 64
        self.step_delay = step_delay
        self.requests: dict[str, _FakeRequest] = {}
        self.aborted: list[str] = []
        self.steps = 0

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams, arrival_time: float | None = None) -> None:
        params.validate()
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise ValueError("prompt is empty")
        if any(not 0 <= t < self.model_config.vocab_size for t in ids):
            raise ValueError("prompt token id outside the vocabulary")
        if len(ids) + params.max_tokens > self.max_model_len:
            raise ValueError(f"maximum context length is {self.max_model_len} tokens, asked for {len(ids) + params.max_tokens}")
        self.requests[request_id] = _FakeRequest(
            request_id, ids, params, [[] for _ in range(params.n)], RequestMetrics(arrival_time or time.monotonic())
        )

    def abort_request(self, request_id: str) -> bool:
        self.aborted.append(request_id)
        return self.requests.pop(request_id, None) is not None

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def step(self) -> list[RequestOutput]:
        if self.step_delay:
            time.sleep(self.step_delay)
        self.steps += 1
        outputs = []
        for req in list(self.requests.values()):
            if "boom" in self.tokenizer.decode(req.prompt_ids) and req.produced[0]:
                raise RuntimeError("simulated engine failure")
            outs = []
            for i, toks in enumerate(req.produced):
                tok = ord(self.REPLY[len(toks) % len(self.REPLY)])
                toks.append(tok)
                done = len(toks) >= req.params.max_tokens
                outs.append(
                    CompletionOutput(
                        index=i,
                        text=self.tokenizer.decode(toks),
                        token_ids=list(toks),
                        finish_reason="length" if done else None,
                        text_delta=chr(tok),
                        token_ids_delta=[tok],
                    )
                )
            if req.metrics.first_token_time is None:
                req.metrics.first_token_time = time.monotonic()
            finished = all(o.finish_reason for o in outs)
            if finished:
                del self.requests[req.request_id]
            outputs.append(RequestOutput(req.request_id, None, req.prompt_ids, outs, finished, req.metrics))
        return outputs

    @property
    def num_running(self) -> int:
        return len(self.requests)

    @property
    def num_waiting(self) -> int:
        return 0

    @property
    def kv_blocks_used(self) -> int:
        return len(self.requests)
