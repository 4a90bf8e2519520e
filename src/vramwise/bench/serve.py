"""Online serving benchmark: a load client for any OpenAI-compatible /v1/completions endpoint.

For each concurrency level, `concurrency` workers keep that many streaming requests in flight until
`num_prompts` requests are done. Each request sends `prompt_len` random token ids and asks for exactly
`gen_len` tokens (ignore_eos, greedy), so every level does the same work per request. Measured per
request on the client: time to first token (TTFT), the gaps between streamed chunks (inter-token latency,
ITL; one chunk per engine step, i.e. per token) and the end-to-end latency; per level: request and token
throughput over the level's wall time, and errors.

    vramwise bench serve --url http://127.0.0.1:8000 --concurrency 1,4,16,64 --json sweep.json
    python -m vramwise.bench.serve --url ...        (the same, without the `vramwise bench` wiring)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np

from vramwise.argtypes import positive_int, positive_int_list

DEFAULT_CONCURRENCY = (1, 4, 16, 64)


@dataclass
class _Result:
    ok: bool = False
    error: str | None = None
    ttft: float | None = None
    itls: list[float] = field(default_factory=list)
    latency: float = 0.0
    output_tokens: int = 0
    prompt_tokens: int = 0


def _pct(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


async def _one_request(
    client: httpx.AsyncClient, url: str, model: str, prompt: list[int], gen_len: int
) -> _Result:
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": gen_len,
        "temperature": 0,
        "ignore_eos": True,  # fixed output length: every request does the same work
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    res = _Result()
    t0 = time.perf_counter()
    last: float | None = None
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
            if r.status_code != 200:
                text = (await r.aread()).decode(errors="replace")
                res.error = f"HTTP {r.status_code}: {text[:200]}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    break
                obj = json.loads(data)
                if "error" in obj:
                    res.error = f"stream error: {obj['error'].get('message')}"
                    return res
                if obj.get("usage"):
                    res.output_tokens = obj["usage"]["completion_tokens"]
                    res.prompt_tokens = obj["usage"]["prompt_tokens"]
                if obj.get("choices"):
                    now = time.perf_counter()
                    if last is None:
                        res.ttft = now - t0
                    else:
                        res.itls.append(now - last)
                    last = now
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        res.error = f"{type(e).__name__}: {e}"
        return res
    res.latency = time.perf_counter() - t0
    res.ok = res.ttft is not None
    if not res.ok:
        res.error = "no tokens received"
    return res


async def _run_level(
    url: str, model: str, concurrency: int, prompts: list[list[int]], gen_len: int, headers: dict[str, str], timeout: float
) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(headers=headers, limits=limits, timeout=httpx.Timeout(timeout, connect=10)) as client:
        todo = iter(prompts)
        results: list[_Result] = []

        async def worker() -> None:
            for prompt in todo:  # shared iterator: each worker takes the next prompt when it is free
                results.append(await _one_request(client, url, model, prompt, gen_len))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    ok = [r for r in results if r.ok]
    ttfts = [r.ttft for r in ok if r.ttft is not None]
    itls = [x for r in ok for x in r.itls]
    out_tokens = sum(r.output_tokens for r in ok)
    prompt_tokens = sum(r.prompt_tokens for r in ok)
    errors = [r.error for r in results if not r.ok]
    return {
        "concurrency": concurrency,
        "requests": len(results),
        "completed": len(ok),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "wall_s": wall,
        "request_throughput": len(ok) / wall,
        "output_token_throughput": out_tokens / wall,
        "total_token_throughput": (out_tokens + prompt_tokens) / wall,
        "ttft_p50_ms": _ms(_pct(ttfts, 50)),
        "ttft_p99_ms": _ms(_pct(ttfts, 99)),
        "itl_p50_ms": _ms(_pct(itls, 50)),
        "itl_p99_ms": _ms(_pct(itls, 99)),
        "latency_p50_s": _pct([r.latency for r in ok], 50),
        "output_tokens": out_tokens,
        "prompt_tokens": prompt_tokens,
    }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000.0


def _discover_model(url: str, headers: dict[str, str]) -> str:
    r = httpx.get(f"{url}/v1/models", headers=headers, timeout=30)
    r.raise_for_status()
    return r.json()["data"][0]["id"]


def run_serve_bench(
    url: str,
    model: str | None,
    concurrency_levels: list[int] | tuple[int, ...] = DEFAULT_CONCURRENCY,
    num_prompts: int | None = None,
    prompt_len: int = 128,
    gen_len: int = 64,
    api_key: str | None = None,
    seed: int = 0,
    timeout: float = 600.0,
    warmup: bool = True,
) -> list[dict[str, Any]]:
    """Run the sweep against a server at `url` (no /v1); one dict of figures per concurrency level.

    num_prompts: requests per level (default: 2 x concurrency, at least 8). Prompts are random token ids
    in [100, 10000), which any vocabulary of 10k+ tokens accepts.
    """
    url = url.rstrip("/").removesuffix("/v1")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    model = model or _discover_model(url, headers)
    rng = random.Random(seed)
    rows: list[dict[str, Any]] = []

    async def main() -> None:
        if warmup:  # first-request costs (lazy init, allocator growth) are not what a level measures
            await _run_level(url, model, 1, [[rng.randrange(100, 10000) for _ in range(prompt_len)]], min(gen_len, 4), headers, timeout)
        for c in concurrency_levels:
            n = num_prompts if num_prompts is not None else max(8, 2 * c)
            prompts = [[rng.randrange(100, 10000) for _ in range(prompt_len)] for _ in range(n)]
            row = await _run_level(url, model, c, prompts, gen_len, headers, timeout)
            row.update(model=model, prompt_len=prompt_len, gen_len=gen_len)
            rows.append(row)

    asyncio.run(main())
    if rows and rows[0]["output_token_throughput"] > 0:
        base = rows[0]["output_token_throughput"]
        for row in rows:
            row["speedup_vs_first"] = row["output_token_throughput"] / base
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    def f(v: Any, spec: str) -> str:
        return "-" if v is None else format(v, spec)

    head = "| clients | requests | errors | req/s | output tok/s | speedup | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms |"
    lines = [head, "|" + "---:|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(
            f"| {r['concurrency']} | {r['requests']} | {r['errors']} | {f(r['request_throughput'], '.2f')} "
            f"| {f(r['output_token_throughput'], '.1f')} | {f(r.get('speedup_vs_first'), '.2f')}x "
            f"| {f(r['ttft_p50_ms'], '.0f')} | {f(r['ttft_p99_ms'], '.0f')} | {f(r['itl_p50_ms'], '.0f')} | {f(r['itl_p99_ms'], '.0f')} |"
        )
    return "\n".join(lines)


# ---- command line -------------------------------------------------------------------------------------


def _configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", required=True, help="server address, e.g. http://127.0.0.1:8000 (with or without /v1)")
    p.add_argument("--model", default=None, help="model name to send (default: the first from /v1/models)")
    p.add_argument("--concurrency", type=positive_int_list, default=list(DEFAULT_CONCURRENCY), help="comma-separated client counts (default: 1,4,16,64)")
    p.add_argument("--num-prompts", type=positive_int, default=None, help="requests per level (default: 2 x clients, at least 8)")
    p.add_argument("--prompt-len", type=positive_int, default=128, help="prompt tokens per request (default: 128)")
    p.add_argument("--gen-len", type=positive_int, default=64, help="generated tokens per request (default: 64)")
    p.add_argument("--api-key", default=None, help="Bearer key, if the server needs one")
    p.add_argument("--seed", type=int, default=0, help="seed for the random prompts")
    p.add_argument("--timeout", type=float, default=600.0, help="per-request timeout in seconds (default: 600)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the figures as JSON to PATH")
    p.set_defaults(func=cmd_serve_bench)


def add_serve_parser(
    subparsers: argparse._SubParsersAction, name: str = "serve", prog: str | None = None
) -> argparse.ArgumentParser:
    """Register the load client as subcommand `name` (vramwise's CLI registers it as `bench-serve` and
    routes `vramwise bench serve ...` to it; `prog` sets the name shown in usage and errors)."""
    kw = {"prog": prog} if prog else {}
    p = subparsers.add_parser(
        name, help="load-test an OpenAI-compatible server (TTFT, ITL, throughput)", description=__doc__.split("\n\n")[1], **kw
    )
    _configure(p)
    return p


def cmd_serve_bench(args: argparse.Namespace) -> int:
    rows = run_serve_bench(
        args.url, args.model, args.concurrency, args.num_prompts, args.prompt_len, args.gen_len, args.api_key, args.seed, args.timeout
    )
    print(format_table(rows))
    for r in rows:
        if r["first_error"]:
            print(f"clients={r['concurrency']}: {r['errors']} errors, first: {r['first_error']}", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 1 if any(r["errors"] for r in rows) else 0


def main(argv: list[str] | None = None, prog: str = "python -m vramwise.bench.serve") -> int:
    """Stand-alone entry point; `vramwise bench serve ARGS` can delegate here as main(ARGS, "vramwise bench serve")."""
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[1])
    _configure(p)
    args = p.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
