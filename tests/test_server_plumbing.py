"""AsyncEngine and the HTTP shell around a scripted stand-in engine: streaming, aborts, crashes, auth off,
OpenAPI. No model is loaded; these run in seconds. The real-model acceptance tests are in test_server.py."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest

from server_utils import FakeEngine, ThreadedServer
from vramwise.engine.async_engine import AsyncEngine, EngineDeadError, RequestFailedError
from vramwise.sampling_params import SamplingParams
from vramwise.server.app import ServerConfig, build_app

MODEL = "fake-model"


def _app(engine: FakeEngine, api_key: str | None = None):
    return build_app(AsyncEngine(engine), ServerConfig(served_model_names=(MODEL, "alias"), api_key=api_key))  # type: ignore[arg-type]


# ---- AsyncEngine --------------------------------------------------------------------------------------


def test_async_engine_streams_validates_and_aborts() -> None:
    async def main() -> None:
        # Steps slow enough that the 200-token request below is still running when it is aborted.
        fake = FakeEngine(step_delay=0.005)
        engine = AsyncEngine(fake)  # type: ignore[arg-type]
        engine.start()
        try:
            # validation errors come back from add_request, before any stream exists
            with pytest.raises(ValueError, match="empty"):
                await engine.add_request("bad", [], SamplingParams(max_tokens=3))
            texts = [out.outputs[0].text async for out in engine.generate("a", "hi", SamplingParams(max_tokens=3))]
            assert texts == ["a", "ab", "abc"]

            # two concurrent requests each get their own outputs
            async def run(rid: str, n: int) -> str:
                last = ""
                async for out in engine.generate(rid, "x", SamplingParams(max_tokens=n)):
                    last = out.outputs[0].text
                return last

            assert await asyncio.gather(run("p", 2), run("q", 5)) == ["ab", "abcde"]

            # leaving a stream early aborts the request in the engine
            agen = engine.generate("long", "x", SamplingParams(max_tokens=200))
            await agen.__anext__()
            await agen.aclose()
            for _ in range(1000):  # bounded wait (10 s) for the engine thread; a loaded 2-core box is slow
                if "long" in fake.aborted:
                    break
                await asyncio.sleep(0.01)
            assert "long" in fake.aborted and "long" not in fake.requests
        finally:
            await engine.shutdown()
        assert not engine.is_running

    asyncio.run(main())


def test_async_engine_step_failure_fails_its_requests_and_serves_on() -> None:
    async def main() -> None:
        fake = FakeEngine(step_delay=0.01)
        engine = AsyncEngine(fake)  # type: ignore[arg-type]
        engine.start()
        try:
            stream = await engine.add_request("ok", "fine", SamplingParams(max_tokens=200))
            with pytest.raises(RequestFailedError, match="simulated engine failure"):
                async for _ in engine.generate("b", "boom", SamplingParams(max_tokens=50)):
                    pass
            with pytest.raises(RequestFailedError):  # it was in the failed step too
                async for _ in stream:
                    pass
            assert engine.is_running and not fake.requests  # both aborted in the engine
            texts = [o.outputs[0].text async for o in engine.generate("late", "x", SamplingParams(max_tokens=2))]
            assert texts == ["a", "ab"]  # the process keeps serving
        finally:
            await engine.shutdown()

    asyncio.run(main())


def test_async_engine_unhealthy_after_a_failure_is_dead_and_refuses_new_requests() -> None:
    async def main() -> None:
        fake = FakeEngine(step_delay=0.01)
        fake.check_health = lambda: "the GPU does not answer: simulated"  # type: ignore[attr-defined]
        engine = AsyncEngine(fake)  # type: ignore[arg-type]
        engine.start()
        try:
            with pytest.raises((EngineDeadError, RequestFailedError), match="simulated engine failure"):
                async for _ in engine.generate("b", "boom", SamplingParams(max_tokens=50)):
                    pass
            for _ in range(500):  # bounded wait for the engine thread to stop
                if not engine.is_running:
                    break
                await asyncio.sleep(0.01)
            assert not engine.is_running
            with pytest.raises(EngineDeadError):
                await engine.add_request("late", "x", SamplingParams(max_tokens=2))
        finally:
            await engine.shutdown()

    asyncio.run(main())


# ---- the HTTP shell -----------------------------------------------------------------------------------


def _events(text: str) -> list[str]:
    return [line[len("data: ") :] for line in text.splitlines() if line.startswith("data: ")]


def test_no_api_key_mode_aliases_and_streaming() -> None:
    with ThreadedServer(_app(FakeEngine())) as srv:
        client = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="anything", max_retries=0)
        assert [m.id for m in client.models.list()] == [MODEL]
        r = client.completions.create(model="alias", prompt="hi", max_tokens=4, n=2)
        assert sorted(c.text for c in r.choices) == ["abcd", "abcd"]
        assert r.usage.completion_tokens == 8 and r.usage.prompt_tokens == 2
        chunks = list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=3, stream=True))
        assert chunks[0].choices[0].delta.role == "assistant"
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == "abc"
        assert chunks[-1].choices[0].finish_reason == "length"
        # unprefixed aliases, as llama.cpp serves them
        assert httpx.get(srv.base_url + "/models").json()["data"][0]["id"] == MODEL
        # two prompts in one request: choices indexed prompt-major, streamed interleaved
        r = client.completions.create(model=MODEL, prompt=["a", "b"], max_tokens=2, n=2)
        assert [c.index for c in r.choices] == [0, 1, 2, 3]
        stream = client.completions.create(model=MODEL, prompt=[[65], [66, 67]], max_tokens=3, stream=True, stream_options={"include_usage": True})
        chunks = list(stream)
        assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == 3 and chunks[-1].usage.completion_tokens == 6
        assert {c.choices[0].index for c in chunks[:-1]} == {0, 1}


def test_mid_stream_failure_sends_error_event_then_done_and_the_server_serves_on() -> None:
    with ThreadedServer(_app(FakeEngine(step_delay=0.01))) as srv:
        r = httpx.post(srv.base_url + "/v1/completions", json={"prompt": "boom", "max_tokens": 20, "stream": True}, timeout=10)
        assert r.status_code == 200
        events = _events(r.text)
        assert json.loads(events[0])["choices"][0]["text"] == "a"  # the stream had begun
        err = json.loads(events[-2])["error"]
        assert err["type"] == "server_error" and "simulated engine failure" in err["message"]
        assert events[-1] == "[DONE]"
        r = httpx.post(srv.base_url + "/v1/completions", json={"prompt": "boom", "max_tokens": 20}, timeout=10)
        assert r.status_code == 500 and "simulated engine failure" in r.json()["error"]["message"]
        assert httpx.get(srv.base_url + "/health").status_code == 200  # the engine checked itself and goes on
        r = httpx.post(srv.base_url + "/v1/completions", json={"prompt": "x", "max_tokens": 2})
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == "ab"
        assert "vramwise:engine_up 1.0" in httpx.get(srv.base_url + "/metrics").text


def test_mid_stream_failure_of_an_unhealthy_engine_turns_health_503() -> None:
    fake = FakeEngine(step_delay=0.01)
    fake.check_health = lambda: "the GPU does not answer: simulated"  # type: ignore[attr-defined]
    with ThreadedServer(_app(fake)) as srv:
        assert httpx.get(srv.base_url + "/health").status_code == 200
        r = httpx.post(srv.base_url + "/v1/completions", json={"prompt": "boom", "max_tokens": 20, "stream": True}, timeout=10)
        assert r.status_code == 200
        events = _events(r.text)
        assert json.loads(events[0])["choices"][0]["text"] == "a"  # the stream had begun
        assert json.loads(events[-2])["error"]["type"] in ("service_unavailable", "server_error")
        assert events[-1] == "[DONE]"
        for _ in range(500):  # bounded wait for the engine thread to stop
            if httpx.get(srv.base_url + "/health").status_code == 503:
                break
            time.sleep(0.01)
        health = httpx.get(srv.base_url + "/health")
        assert health.status_code == 503 and health.json()["error"]["type"] == "service_unavailable"
        r = httpx.post(srv.base_url + "/v1/completions", json={"prompt": "x", "max_tokens": 2})
        assert r.status_code == 503 and r.json()["error"]["type"] == "service_unavailable"
        assert "vramwise:engine_up 0.0" in httpx.get(srv.base_url + "/metrics").text


def test_non_streaming_client_timeout_aborts_the_request() -> None:
    fake = FakeEngine(step_delay=0.01)
    with ThreadedServer(_app(fake)) as srv:
        client = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="x", max_retries=0, timeout=0.3)
        with pytest.raises(openai.APITimeoutError):
            client.completions.create(model=MODEL, prompt="slow", max_tokens=200)
        deadline = time.monotonic() + 5
        while not fake.aborted and time.monotonic() < deadline:
            time.sleep(0.02)
        assert fake.aborted and not fake.requests


def test_errors_are_openai_shaped_and_documented() -> None:
    with ThreadedServer(_app(FakeEngine())) as srv:
        r = httpx.get(srv.base_url + "/no/such/route")
        assert r.status_code == 404 and r.json()["error"]["type"] == "invalid_request_error"
        r = httpx.get(srv.base_url + "/v1/completions")
        assert r.status_code == 405 and "error" in r.json()
        r = httpx.post(srv.base_url + "/v1/completions", content=b"\xff\xfe not json", headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
        spec = httpx.get(srv.base_url + "/openapi.json").json()
        for path in ("/v1/completions", "/v1/chat/completions"):
            responses = spec["paths"][path]["post"]["responses"]
            for status in ("400", "401", "404", "500", "503"):
                ref = responses[status]["content"]["application/json"]["schema"]["$ref"]
                assert ref.endswith("/ErrorResponse"), (path, status)
        assert "ErrorResponse" in spec["components"]["schemas"]


def test_api_key_guards_api_but_not_health() -> None:
    with ThreadedServer(_app(FakeEngine(), api_key="s3cret")) as srv:
        assert httpx.get(srv.base_url + "/health").status_code == 200
        assert httpx.get(srv.base_url + "/metrics").status_code == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret"}):
            r = httpx.get(srv.base_url + "/v1/models", headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(srv.base_url + "/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200


# ---- the load client ------------------------------------------------------------------------------------


def test_serve_bench_reports_every_level() -> None:
    from vramwise.bench.serve import format_table, run_serve_bench

    with ThreadedServer(_app(FakeEngine(max_model_len=512, step_delay=0.002))) as srv:
        rows = run_serve_bench(srv.base_url, None, [1, 3], num_prompts=4, prompt_len=8, gen_len=5)
    assert [r["concurrency"] for r in rows] == [1, 3]
    for r in rows:
        assert r["model"] == MODEL and r["errors"] == 0 and r["completed"] == 4
        assert r["output_tokens"] == 20 and r["prompt_tokens"] == 32
        assert r["ttft_p50_ms"] > 0 and r["itl_p99_ms"] >= r["itl_p50_ms"] > 0 and r["output_token_throughput"] > 0
    assert len(format_table(rows).splitlines()) == 4


@pytest.mark.parametrize("bad", [["--concurrency", "0,x"], ["--concurrency", "1,x"], ["--concurrency", "0"], ["--num-prompts", "-3"]])
def test_serve_bench_rejects_bad_arguments(bad: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    from vramwise.bench.serve import main

    with pytest.raises(SystemExit) as info:
        main(["--url", "http://127.0.0.1:9", *bad])
    assert info.value.code == 2
    assert f"argument {bad[0]}" in capsys.readouterr().err


def test_cli_wiring_of_serve_and_bench_serve(capsys: pytest.CaptureFixture[str]) -> None:
    from vramwise.cli import main

    with pytest.raises(SystemExit) as info:
        main(["bench", "serve", "--url", "http://127.0.0.1:9", "--concurrency", "0,x"])
    assert info.value.code == 2 and "vramwise bench serve: error: argument --concurrency" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["serve", "--port", "99999"])
    assert info.value.code == 2 and "argument --port" in capsys.readouterr().err
