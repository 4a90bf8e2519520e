"""Acceptance tests of `vramwise serve` (issue 3), black-box through the official `openai` client.

One server for the module: the real bundled SmolLM2-135M-Instruct on CPU, started in a subprocess on a
free loopback port, with an API key (so auth is exercised on the same process) and a small context (1024)
to keep the KV pool small. Generations are short (<= 16 tokens) to keep the module near a minute on
2 cores. The last test shuts the server down with SIGTERM.
"""

from __future__ import annotations

import asyncio
import json
import math
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from server_utils import ServerProcess, metrics, start_server, wait_for_metric

pytestmark = pytest.mark.slow

MODEL = "SmolLM2-135M-Instruct"
API_KEY = "test-key-123"
MAX_MODEL_LEN = 1024
USER = [{"role": "user", "content": "Name three colors."}]


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    srv = start_server("--max-model-len", str(MAX_MODEL_LEN), "--graceful-timeout", "4", api_key=API_KEY)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.v1, api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from vramwise.weights import open_weights

    return open_weights(None, show_progress=False).load_tokenizer()


@pytest.fixture(scope="module")
def idle_kv(server: ServerProcess) -> float:
    """KV blocks in use with no request in flight (0 today; a prefix cache may keep some later)."""
    return metrics(server.base_url)["vramwise:kv_blocks_used"]


def _stream_text(stream: Any, chat: bool = False) -> tuple[str, list[Any]]:
    chunks = list(stream)
    parts = []
    for ch in chunks:
        for c in ch.choices:
            parts.append((c.delta.content or "") if chat else c.text)
    return "".join(parts), chunks


# ---- happy paths ----------------------------------------------------------------------------------------


def test_models_list(client: openai.OpenAI) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL


def test_completion_greedy_stream_equals_non_stream_and_usage(client: openai.OpenAI, tokenizer: Any) -> None:
    prompt = "The capital of France is"
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
    choice = r.choices[0]
    assert choice.text and choice.finish_reason in ("length", "stop")
    n_prompt = len(tokenizer.encode(prompt))
    assert r.usage.prompt_tokens == n_prompt
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    if choice.finish_reason == "length":
        assert r.usage.completion_tokens == 12

    text, chunks = _stream_text(
        client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0, stream=True, stream_options={"include_usage": True})
    )
    assert text == choice.text
    assert chunks[-2].choices[0].finish_reason == choice.finish_reason
    # include_usage: one last chunk, no choices, the same usage as the non-streaming answer
    assert chunks[-1].choices == []
    assert chunks[-1].usage.model_dump() == r.usage.model_dump()
    assert all(c.usage is None for c in chunks[:-1])


def test_token_id_prompts_and_usage(client: openai.OpenAI) -> None:
    ids = [504, 3575, 282, 4649, 314]
    r = client.completions.create(model=MODEL, prompt=ids, max_tokens=4, temperature=0, extra_body={"ignore_eos": True})
    assert r.usage.prompt_tokens == 5 and r.usage.completion_tokens == 4 and r.choices[0].finish_reason == "length"
    r = client.completions.create(model=MODEL, prompt=[ids, ids[:3]], max_tokens=3, temperature=0, extra_body={"ignore_eos": True})
    assert [c.index for c in r.choices] == [0, 1]
    assert r.usage.prompt_tokens == 8 and r.usage.completion_tokens == 6


def test_chat_greedy_stream_equals_non_stream(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=16, temperature=0)
    msg = r.choices[0].message
    assert msg.role == "assistant" and msg.content
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    text, chunks = _stream_text(
        client.chat.completions.create(
            model=MODEL, messages=USER, max_completion_tokens=16, temperature=0, stream=True, stream_options={"include_usage": True}
        ),
        chat=True,
    )
    assert text == msg.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason == r.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == r.usage.model_dump()


def test_same_seed_same_text(client: openai.OpenAI) -> None:
    kw: dict[str, Any] = dict(model=MODEL, prompt="Once upon a time", max_tokens=12, temperature=1.0, seed=1234)
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert a.choices[0].text == b.choices[0].text
    ckw: dict[str, Any] = dict(model=MODEL, messages=USER, max_tokens=12, temperature=1.0, seed=7)
    assert client.chat.completions.create(**ckw).choices[0].message.content == client.chat.completions.create(**ckw).choices[0].message.content


def test_n_gives_n_choices(client: openai.OpenAI) -> None:
    r = client.completions.create(model=MODEL, prompt="My favourite food is", max_tokens=6, temperature=1.0, n=3)
    assert sorted(c.index for c in r.choices) == [0, 1, 2]
    assert 3 <= r.usage.completion_tokens <= 18
    r = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=6, temperature=1.0, n=3)
    assert sorted(c.index for c in r.choices) == [0, 1, 2]
    chunks = list(client.chat.completions.create(model=MODEL, messages=USER, max_tokens=4, temperature=1.0, n=3, stream=True))
    assert {c.index for ch in chunks for c in ch.choices} == {0, 1, 2}
    assert sum(1 for ch in chunks for c in ch.choices if c.finish_reason) == 3


def test_stop_strings_cut_correctly(client: openai.OpenAI) -> None:
    prompt = "List the days of the week: Monday,"
    full = client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0, extra_body={"ignore_eos": True}).choices[0].text
    assert len(full) > 6, full
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    expected = full[: full.find(stop)]
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0, stop=[stop, "never-seen-stop"])
    assert r.choices[0].text == expected and r.choices[0].finish_reason == "stop"
    text, chunks = _stream_text(client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0, stop=stop, stream=True))
    assert text == expected and chunks[-1].choices[0].finish_reason == "stop"
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0, stop=stop, extra_body={"include_stop_str_in_output": True})
    assert r.choices[0].text == expected + stop


def test_lm_eval_loglikelihood_echo_logprobs(client: openai.OpenAI, tokenizer: Any) -> None:
    """lm-evaluation-harness scores continuations with echo=True, max_tokens=1 (or 0), logprobs=1, prompts
    as token ids, and reads logprobs.token_logprobs[ctxlen:-1] and compares with max(top_logprobs)."""
    ctx = tokenizer.encode("The capital of France is")
    greedy = client.completions.create(model=MODEL, prompt=ctx, max_tokens=1, temperature=0, logprobs=1)
    g_lp = greedy.choices[0].logprobs
    assert len(g_lp.tokens) == 1 and g_lp.token_logprobs[0] == max(g_lp.top_logprobs[0].values())
    cont = tokenizer.encode(greedy.choices[0].text, add_special_tokens=False)
    full = ctx + cont

    r1 = client.completions.create(model=MODEL, prompt=[full], max_tokens=1, echo=True, logprobs=1, temperature=0)
    lp1 = r1.choices[0].logprobs
    assert len(lp1.token_logprobs) == len(full) + 1  # the prompt, then the one generated token
    assert lp1.token_logprobs[0] is None and lp1.top_logprobs[0] is None
    assert r1.choices[0].text.startswith("The capital of France is")
    assert lp1.text_offset[0] == 0 and lp1.text_offset == sorted(lp1.text_offset)
    # the continuation was the greedy choice: lm-eval's is_greedy test must pass
    cont_lps = lp1.token_logprobs[len(ctx) : -1]
    cont_tops = lp1.top_logprobs[len(ctx) : -1]
    assert all(tok == max(top.values()) for tok, top in zip(cont_lps, cont_tops))
    assert math.isclose(sum(cont_lps), g_lp.token_logprobs[0], abs_tol=1e-3)

    r0 = client.completions.create(model=MODEL, prompt=[full], max_tokens=0, echo=True, logprobs=1)
    lp0 = r0.choices[0].logprobs
    assert len(lp0.token_logprobs) == len(full) and r0.usage.completion_tokens == 0
    for a, b in zip(lp0.token_logprobs[1:], lp1.token_logprobs[1 : len(full)]):
        assert math.isclose(a, b, abs_tol=1e-4)


def test_chat_logprobs_shape(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=4, temperature=0, logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for entry in content:
        assert entry.logprob <= 0 and isinstance(entry.token, str) and entry.bytes
        assert len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
    # greedy: the chosen token is the best alternative
    assert content[0].logprob == pytest.approx(content[0].top_logprobs[0].logprob)


# ---- errors -------------------------------------------------------------------------------------------

_ERRORS: list[tuple[str, dict[str, Any], int, str | None]] = [
    ("completions", dict(prompt="x", temperature=-1), 400, "temperature"),
    ("completions", dict(prompt="x", top_p=1.5), 400, "top_p"),
    ("completions", dict(prompt="x", n=0), 400, "n"),
    ("completions", dict(prompt="x", max_tokens=0), 400, "max_tokens"),
    ("completions", dict(prompt="x", logprobs=21), 400, "logprobs"),
    ("completions", dict(prompt="x", stop=[""]), 400, "stop"),
    ("completions", dict(prompt="x", extra_body={"top_k": -5}), 400, "top_k"),
    ("completions", dict(prompt="x", extra_body={"logit_bias": {"1": 5}}), 400, "logit_bias"),
    ("completions", dict(prompt=""), 400, "prompt"),
    ("completions", dict(prompt=[]), 400, "prompt"),
    ("completions", dict(prompt=[[1, 2], []]), 400, "prompt"),
    ("completions", dict(prompt=[10**6]), 400, "prompt"),
    ("completions", dict(prompt=[3, -1]), 400, "prompt"),
    ("completions", dict(prompt="hi", max_tokens=5000), 400, "prompt"),
    ("completions", dict(prompt="hi", max_tokens=5000, stream=True), 400, "prompt"),
    ("completions", dict(prompt="x", model="no-such-model"), 404, "model"),
    ("chat", dict(messages=[]), 400, "messages"),
    ("chat", dict(messages=[{"role": "robot", "content": "x"}]), 400, "messages"),
    ("chat", dict(messages=USER, max_completion_tokens=0), 400, "max_completion_tokens"),
    ("chat", dict(messages=USER, temperature=3), 400, "temperature"),
    ("chat", dict(messages=USER, frequency_penalty=5), 400, "frequency_penalty"),
    ("chat", dict(messages=USER, top_logprobs=3), 400, "top_logprobs"),
    ("chat", dict(messages=USER, logprobs=True, top_logprobs=50), 400, "top_logprobs"),
    ("chat", dict(messages=USER, max_tokens=5000), 400, "messages"),
    ("chat", dict(messages=USER, max_tokens=5000, stream=True), 400, "messages"),
    ("chat", dict(messages=USER, model="no-such-model", stream=True), 404, "model"),
]


def _still_answers(client: openai.OpenAI) -> None:
    r = client.completions.create(model=MODEL, prompt="Hello", max_tokens=1, temperature=0)
    assert r.choices[0].finish_reason in ("length", "stop")


@pytest.mark.parametrize(("endpoint", "kwargs", "status", "param"), _ERRORS, ids=[f"{e}-{i}" for i, (e, *_rest) in enumerate(_ERRORS)])
def test_invalid_requests(client: openai.OpenAI, endpoint: str, kwargs: dict[str, Any], status: int, param: str | None) -> None:
    kwargs = {"model": MODEL, **kwargs}
    create = client.completions.create if endpoint == "completions" else client.chat.completions.create
    with pytest.raises(openai.APIStatusError) as info:
        create(**kwargs)
    e = info.value
    assert e.status_code == status, e.message
    assert e.type == "invalid_request_error"
    assert e.param == param, e.message
    if status == 404:
        assert e.code == "model_not_found"
    if kwargs.get("max_tokens") == 5000:  # context overflow: the message gives both numbers
        assert str(MAX_MODEL_LEN) in e.message and "5000" in e.message
    _still_answers(client)


@pytest.mark.parametrize(
    "body",
    [b"{not json", b"[1, 2]", b'"a string"', b"42", b"", b"null", "{\"prompt\": \"\u00e9\"".encode()],
    ids=["malformed", "array", "string", "number", "empty", "null", "truncated"],
)
def test_malformed_bodies_are_400(server: ServerProcess, client: openai.OpenAI, body: bytes) -> None:
    for path in ("/v1/completions", "/v1/chat/completions", "/completions"):
        r = httpx.post(server.base_url + path, content=body, headers={**server.headers(), "content-type": "application/json"})
        assert r.status_code == 400, (path, r.text)
        err = r.json()["error"]
        assert err["type"] == "invalid_request_error" and err["message"]
    _still_answers(client)


def test_api_key(server: ServerProcess, client: openai.OpenAI) -> None:
    bad = openai.OpenAI(base_url=server.v1, api_key="wrong-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as info:
        bad.models.list()
    assert info.value.status_code == 401 and info.value.type == "invalid_request_error"
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model=MODEL, messages=USER, max_tokens=1, stream=True)
    r = httpx.post(server.v1 + "/completions", json={"prompt": "x"})  # no key at all
    assert r.status_code == 401 and r.json()["error"]["type"] == "invalid_request_error"
    assert httpx.get(server.base_url + "/models").status_code == 401  # the unprefixed alias too
    assert httpx.get(server.base_url + "/health").status_code == 200  # health stays open
    _still_answers(client)


# ---- disconnects and load -------------------------------------------------------------------------------


def test_disconnect_mid_stream_frees_kv_blocks(server: ServerProcess, idle_kv: float) -> None:
    body = {"model": MODEL, "prompt": "Write a long story about a dragon.", "max_tokens": 400, "stream": True, "ignore_eos": True}
    with httpx.Client(timeout=60, headers=server.headers()) as c:
        with c.stream("POST", server.v1 + "/completions", json=body) as r:
            assert r.status_code == 200
            # Keep the line iterator referenced: a `for ... break` would let httpx close the connection
            # at once (a disconnect) before the gauges below are read.
            lines = r.iter_lines()
            seen = 0
            while seen < 3:
                seen += next(lines).startswith("data: ")
            busy = metrics(server.base_url)
            assert busy["vramwise:kv_blocks_used"] > idle_kv
            assert busy["vramwise:num_requests_running"] == 1
    # the connection is closed: the request must be aborted and its blocks returned at once
    assert wait_for_metric(server.base_url, "vramwise:kv_blocks_used", idle_kv, timeout=20) == idle_kv
    assert wait_for_metric(server.base_url, "vramwise:num_requests_running", 0, timeout=20) == 0
    # a non-streaming request whose client gives up is aborted too
    impatient = openai.OpenAI(base_url=server.v1, api_key=API_KEY, max_retries=0, timeout=1.0)
    with pytest.raises(openai.APITimeoutError):
        impatient.completions.create(model=MODEL, prompt="Tell me everything.", max_tokens=400, extra_body={"ignore_eos": True})
    assert wait_for_metric(server.base_url, "vramwise:kv_blocks_used", idle_kv, timeout=20) == idle_kv


def test_load_32_concurrent_streaming_clients(server: ServerProcess, client: openai.OpenAI, idle_kv: float) -> None:
    prompts = [
        "The quick brown fox",
        "In the beginning",
        "Python is a programming language that",
        "The three primary colors are",
        "To make a cup of tea,",
        "The largest planet in our solar system",
    ]
    max_tokens = 8
    # each prompt's single-client greedy output
    expected = {p: client.completions.create(model=MODEL, prompt=p, max_tokens=max_tokens, temperature=0).choices[0].text for p in prompts}
    clients, rounds = 32, 3

    async def main() -> list[tuple[str, str]]:
        aclient = openai.AsyncOpenAI(base_url=server.v1, api_key=API_KEY, max_retries=0, timeout=240)

        async def one_client(i: int) -> list[tuple[str, str]]:
            got = []
            for j in range(rounds):
                p = prompts[(i + j) % len(prompts)]
                stream = await aclient.completions.create(model=MODEL, prompt=p, max_tokens=max_tokens, temperature=0, stream=True)
                text = "".join([c.choices[0].text async for c in stream if c.choices])
                got.append((p, text))
            return got

        try:
            results = await asyncio.wait_for(asyncio.gather(*(one_client(i) for i in range(clients))), timeout=300)
        finally:
            await aclient.close()
        return [r for rs in results for r in rs]

    t0 = time.monotonic()
    results = asyncio.run(main())
    elapsed = time.monotonic() - t0
    assert len(results) == clients * rounds
    mismatches = [(p, t, expected[p]) for p, t in results if t != expected[p]]
    assert not mismatches, mismatches[:3]
    assert wait_for_metric(server.base_url, "vramwise:kv_blocks_used", idle_kv, timeout=20) == idle_kv
    print(f"load: {clients * rounds} streams in {elapsed:.1f}s")


def test_metrics_exposed(server: ServerProcess) -> None:
    m = metrics(server.base_url)
    assert m['vramwise:requests_total{route="/v1/completions",status="200"}'] > 0
    assert m['vramwise:requests_total{route="/v1/completions",status="400"}'] > 0
    assert m['vramwise:requests_total{route="/v1/chat/completions",status="404"}'] > 0
    assert m["vramwise:prompt_tokens_total"] > 0 and m["vramwise:generation_tokens_total"] > 0
    assert m["vramwise:time_to_first_token_seconds_count"] > 0
    assert m["vramwise:inter_token_latency_seconds_count"] > 0
    assert m["vramwise:kv_blocks_total"] > 0
    assert {"vramwise:num_requests_running", "vramwise:num_requests_waiting", "vramwise:kv_cache_usage_perc"} <= m.keys()
    assert m["vramwise:engine_up"] == 1


# ---- shutdown (last: it stops the module's server) -----------------------------------------------------


def test_sigterm_finishes_or_aborts_in_flight_and_exits_0(server: ServerProcess) -> None:
    results: dict[str, list[str]] = {}

    def stream(name: str, max_tokens: int) -> None:
        body = {"model": MODEL, "prompt": "Count to one hundred:", "max_tokens": max_tokens, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", server.v1 + "/completions", json=body, headers=server.headers(), timeout=60) as r:
            results[name] = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]

    threads = [threading.Thread(target=stream, args=("short", 3)), threading.Thread(target=stream, args=("long", 600))]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while metrics(server.base_url)["vramwise:num_requests_running"] < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.stop(signal.SIGTERM, timeout=30) == 0
    for t in threads:
        t.join(timeout=30)
    # both streams end properly: the short one finished, the long one was aborted after the grace period
    assert results["short"][-1] == "[DONE]" and json.loads(results["short"][-2])["choices"][0]["finish_reason"] == "length"
    assert results["long"][-1] == "[DONE]" and json.loads(results["long"][-2])["error"]["type"] == "service_unavailable"
