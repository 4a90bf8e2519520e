"""The OpenAI-compatible HTTP server: FastAPI routes over an AsyncEngine.

A thin shell: it turns OpenAI requests into (prompt token ids, SamplingParams), hands them to the engine,
and turns RequestOutputs back into OpenAI responses or SSE chunks. Tokenization and chat templates are
the tokenizer's; sampling, stopping and detokenization are the engine's.

Routes live under /v1 and, as llama.cpp serves them, without the prefix too:
    GET  /v1/models, /v1/models/{id}        POST /v1/completions, /v1/chat/completions
    GET  /health, /metrics, /version         (open even when --api-key is set)
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.types import Receive, Scope, Send
from tokenizers.decoders import ByteLevel as ByteLevelDecoder

from vramwise import __version__
from vramwise.engine.async_engine import (
    AsyncEngine,
    EngineDeadError,
    RequestAbortedError,
    RequestFailedError,
    RequestStream,
)
from vramwise.engine.outputs import Logprob, RequestOutput
from vramwise.sampling_params import SamplingParams
from vramwise.server.errors import (
    UNAVAILABLE,
    APIError,
    ErrorInfo,
    bad_request,
    error_json,
    error_responses,
    from_value_error,
    install_error_handlers,
    sse_error,
)
from vramwise.server.metrics import CONTENT_TYPE, RequestTracker, ServerMetrics, StatusCounterMiddleware
from vramwise.server.protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatResponseMessage,
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    DeltaMessage,
    HealthResponse,
    ModelCard,
    ModelList,
    TokenLogprob,
    TopLogprob,
    Usage,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerConfig:
    served_model_names: tuple[str, ...]  # the first is listed by /v1/models; all are accepted as `model`
    api_key: str | None = None
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def model_name(self) -> str:
        return self.served_model_names[0]


# ---- token strings for logprobs -----------------------------------------------------------------------


def _byte_decoder() -> dict[str, int]:
    """Inverse of the byte-level BPE alphabet (GPT-2, Llama 3, SmolLM2): each byte is written as one
    printable character; bytes that are printable Latin-1 stand for themselves, the rest are shifted
    to U+0100 and up, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table: dict[str, int] = {chr(b): b for b in printable}
    shift = 0
    for b in range(256):
        if b not in printable:
            table[chr(256 + shift)] = b
            shift += 1
    return table


class TokenText:
    """Token id -> (display string, UTF-8 bytes) for logprobs, cached: a vocabulary is a few 10k entries.

    A token may hold part of a multi-byte character; OpenAI then shows it as "bytes:\\xe2\\x80" and gives
    the true bytes, which byte-level tokenizers let us recover exactly from the token's spelling.
    """

    def __init__(self, tokenizer: Any) -> None:
        self._tok = tokenizer
        hf = getattr(tokenizer, "hf", None)  # absent on stand-in tokenizers
        decoder = getattr(getattr(hf, "backend_tokenizer", None), "decoder", None)
        self._byte_level = isinstance(decoder, ByteLevelDecoder)
        self._bytes_of = _byte_decoder() if self._byte_level else {}
        self._cache: dict[int, tuple[str, bytes]] = {}

    def get(self, token_id: int) -> tuple[str, bytes]:
        hit = self._cache.get(token_id)
        if hit is not None:
            return hit
        raw: bytes | None = None
        if self._byte_level:
            spelled = self._tok.hf.convert_ids_to_tokens(token_id)
            if isinstance(spelled, str) and all(ch in self._bytes_of for ch in spelled):
                raw = bytes(self._bytes_of[ch] for ch in spelled)
        if raw is None:  # special tokens of byte-level vocabularies, SentencePiece vocabularies
            raw = self._tok.decode([token_id], skip_special_tokens=False).encode()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
        self._cache[token_id] = (text, raw)
        return text, raw


# ---- one engine request inside an HTTP request ---------------------------------------------------------


@dataclass
class _Sub:
    """One prompt of an HTTP request: its engine request and what the response needs about it."""

    index: int  # prompt index; choice index = index * n + output index
    request_id: str
    prompt_text: str
    prompt_ids: list[int]
    stream: RequestStream
    tracker: RequestTracker
    final: RequestOutput | None = None


def _sse(model: Any) -> str:
    return f"data: {model.model_dump_json()}\n\n"


_SSE_DONE = "data: [DONE]\n\n"


class _SSEResponse(StreamingResponse):
    """StreamingResponse that always closes its generator, so the generator's `finally` (which aborts the
    engine request) runs at once however the response ends (disconnect, send error, cancellation)."""

    media_type = "text/event-stream"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()


class OpenAIServing:
    def __init__(self, engine: AsyncEngine, config: ServerConfig, metrics: ServerMetrics) -> None:
        self.engine = engine
        self.config = config
        self.metrics = metrics
        self.tokens = TokenText(engine.tokenizer)

    # -- shared ---------------------------------------------------------------------------------------
    def check_model(self, model: str | None) -> str:
        if model is None or model in self.config.served_model_names:
            return self.config.model_name
        raise APIError(
            404,
            f"the model {model!r} does not exist; this server serves {self.config.model_name!r}",
            param="model",
            code="model_not_found",
        )

    def model_list(self) -> ModelList:
        return ModelList(data=[self.model_card()])

    def model_card(self) -> ModelCard:
        return ModelCard(id=self.config.model_name, created=self.config.created, max_model_len=self.engine.max_model_len)

    async def _add_all(
        self,
        base_id: str,
        prompts: Sequence[tuple[str, list[int]]],
        params: Sequence[SamplingParams],
        arrival: float,
        default_param: str,
        rename: dict[str, str],
    ) -> list[_Sub]:
        """Queue every prompt at once (one engine drain, not one step per prompt); all or none."""
        ids = [f"{base_id}-{i}" for i in range(len(prompts))]
        results = await asyncio.gather(
            *(self.engine.add_request(rid, p_ids, sp, arrival) for rid, (_, p_ids), sp in zip(ids, prompts, params)),
            return_exceptions=True,
        )
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            for rid, r in zip(ids, results):
                if not isinstance(r, BaseException):
                    self.engine.abort(rid)
            err = errors[0]
            if isinstance(err, ValueError):
                api = from_value_error(err, default_param)
                api.info.param = rename.get(api.info.param or "", api.info.param)
                raise api from err
            raise err
        subs = []
        for i, (rid, (text, p_ids), stream) in enumerate(zip(ids, prompts, results)):
            tracker = self.metrics.tracker(arrival)
            tracker.accepted(len(p_ids))
            subs.append(_Sub(i, rid, text, p_ids, stream, tracker))  # type: ignore[arg-type]
        return subs

    def _abort_unfinished(self, subs: Sequence[_Sub]) -> None:
        for s in subs:
            if not s.stream.finished:
                self.engine.abort(s.request_id)
                s.tracker.aborted()

    @staticmethod
    async def _merge(subs: Sequence[_Sub]) -> AsyncIterator[tuple[_Sub, RequestOutput]]:
        """Outputs of several engine requests, interleaved as they come."""
        if len(subs) == 1:
            async for out in subs[0].stream:
                yield subs[0], out
            return
        queue: asyncio.Queue[tuple[_Sub, RequestOutput | Exception | None]] = asyncio.Queue()

        async def pump(sub: _Sub) -> None:
            try:
                async for out in sub.stream:
                    queue.put_nowait((sub, out))
            except Exception as e:
                queue.put_nowait((sub, e))
            else:
                queue.put_nowait((sub, None))

        tasks = [asyncio.create_task(pump(s)) for s in subs]
        try:
            remaining = len(subs)
            while remaining:
                sub, item = await queue.get()
                if item is None:
                    remaining -= 1
                elif isinstance(item, Exception):
                    raise item
                else:
                    yield sub, item
        finally:
            for t in tasks:
                t.cancel()

    async def _collect(self, subs: list[_Sub], request: Request) -> None:
        """Wait for every sub's final output; a client that disconnects meanwhile aborts them."""

        async def consume() -> None:
            async for sub, out in self._merge(subs):
                sub.tracker.on_output(out)
                if out.finished:
                    sub.final = out

        async def disconnected() -> None:
            # The body was read already, so the next ASGI message can only be the disconnect.
            while (await request.receive())["type"] != "http.disconnect":
                pass

        work = asyncio.create_task(consume())
        watch = asyncio.create_task(disconnected())
        try:
            await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
            if not work.done():
                raise _ClientGone()
            work.result()  # re-raise an engine failure
        except RequestAbortedError as e:
            raise EngineDeadError(str(e)) from e
        finally:
            watch.cancel()
            work.cancel()
            self._abort_unfinished(subs)

    # -- /v1/completions ---------------------------------------------------------------------------------
    def _completion_prompts(self, prompt: Any) -> list[tuple[str, list[int]]]:
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            prompt = [prompt]
        if not prompt:
            raise bad_request("prompt is empty", "prompt")
        out: list[tuple[str, list[int]]] = []
        tok = self.engine.tokenizer
        for p in prompt:
            if isinstance(p, str):
                if not p:
                    raise bad_request("prompt is empty", "prompt")
                out.append((p, tok.encode(p)))
            else:
                if not p:
                    raise bad_request("prompt is empty", "prompt")
                vocab = self.engine.vocab_size
                bad = next((t for t in p if not 0 <= t < vocab), None)
                if bad is not None:  # checked here too: decoding the echo text must not meet a bad id
                    raise bad_request(f"prompt token id {bad} is outside the vocabulary [0, {vocab})", "prompt")
                out.append((tok.decode(p, skip_special_tokens=False), list(p)))
        return out

    def _completion_params(self, req: CompletionRequest, prompt_len: int) -> SamplingParams:
        if req.best_of is not None and req.best_of not in (1, req.n):
            raise bad_request("best_of is not supported (only best_of == n)", "best_of")
        max_tokens = req.max_tokens if req.max_tokens is not None else max(1, self.engine.max_model_len - prompt_len)
        # echo with logprobs scores the prompt too (lm-evaluation-harness loglikelihood); max_tokens=0 with
        # echo needs prompt scoring to run at all.
        prompt_logprobs = None
        if req.echo and req.logprobs is not None:
            prompt_logprobs = req.logprobs
        elif req.echo and max_tokens == 0:
            prompt_logprobs = 0
        return self._params(req, max_tokens, logprobs=req.logprobs, prompt_logprobs=prompt_logprobs, rename={"prompt_logprobs": "logprobs"})

    def _params(
        self,
        req: CompletionRequest | ChatCompletionRequest,
        max_tokens: int,
        logprobs: int | None,
        prompt_logprobs: int | None,
        rename: dict[str, str],
    ) -> SamplingParams:
        try:
            return SamplingParams(
                max_tokens=max_tokens,
                temperature=1.0 if req.temperature is None else req.temperature,
                top_p=1.0 if req.top_p is None else req.top_p,
                top_k=req.top_k or 0,
                min_p=req.min_p or 0.0,
                seed=req.seed,
                repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
                presence_penalty=req.presence_penalty,
                frequency_penalty=req.frequency_penalty,
                stop=list(req.stop or []),
                stop_token_ids=list(req.stop_token_ids or []),
                ignore_eos=req.ignore_eos,
                include_stop_str_in_output=req.include_stop_str_in_output,
                logprobs=logprobs,
                prompt_logprobs=prompt_logprobs,
                n=req.n,
            )
        except ValueError as e:
            api = from_value_error(e, None)
            api.info.param = rename.get(api.info.param or "", api.info.param)
            raise api from e

    def _completion_logprobs(
        self, token_ids: Sequence[int], logprobs: Sequence[Logprob | None], offset: int
    ) -> tuple[CompletionLogprobs, int]:
        """Legacy logprobs for tokens whose text starts at char `offset`; returns the offset after them."""
        lp = CompletionLogprobs()
        for tid, entry in zip(token_ids, logprobs):
            text, _ = self.tokens.get(tid)
            lp.tokens.append(text)
            lp.text_offset.append(offset)
            offset += 0 if text.startswith("bytes:") else len(text)
            if entry is None:  # the first prompt token: nothing predicts it
                lp.token_logprobs.append(None)
                lp.top_logprobs.append(None)
                continue
            chosen, top = entry
            lp.token_logprobs.append(chosen)
            alts = {self.tokens.get(t)[0]: v for t, v in top}
            # Include the chosen token, as OpenAI does: clients compare it with the alternatives' best.
            alts.setdefault(text, chosen)
            lp.top_logprobs.append(alts)
        return lp, offset

    def _echo_logprobs(self, sub: _Sub, out: RequestOutput) -> Sequence[Logprob | None]:
        plps = out.prompt_logprobs or []
        return list(plps) + [None] * (len(sub.prompt_ids) - len(plps))

    async def completion(self, req: CompletionRequest, request: Request) -> Response | CompletionResponse:
        model = self.check_model(req.model)
        arrival = time.monotonic()
        prompts = self._completion_prompts(req.prompt)
        params = [self._completion_params(req, len(ids)) for _, ids in prompts]
        base_id = f"cmpl-{uuid.uuid4().hex}"
        subs = await self._add_all(base_id, prompts, params, arrival, "prompt", {"prompt_logprobs": "logprobs"})
        if req.stream:
            return _SSEResponse(self._completion_events(base_id, model, req, subs))
        try:
            await self._collect(subs, request)
        except _ClientGone:
            return Response(status_code=499)
        choices: list[CompletionChoice] = []
        completion_tokens = 0
        for sub in subs:
            assert sub.final is not None
            for c in sub.final.outputs:
                completion_tokens += len(c.token_ids)
                text = (sub.prompt_text if req.echo else "") + c.text
                lp = None
                if req.logprobs is not None:
                    lp = CompletionLogprobs()
                    offset = 0 if req.echo else len(sub.prompt_text)
                    if req.echo:
                        lp, offset = self._completion_logprobs(sub.prompt_ids, self._echo_logprobs(sub, sub.final), 0)
                    gen, _ = self._completion_logprobs(c.token_ids, c.logprobs or [], offset)
                    for k in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
                        getattr(lp, k).extend(getattr(gen, k))
                choices.append(CompletionChoice(index=sub.index * req.n + c.index, text=text, logprobs=lp, finish_reason=c.finish_reason))
        prompt_tokens = sum(len(s.prompt_ids) for s in subs)
        return CompletionResponse(
            id=base_id,
            model=model,
            choices=sorted(choices, key=lambda ch: ch.index),
            usage=Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, total_tokens=prompt_tokens + completion_tokens),
        )

    async def _completion_events(self, base_id: str, model: str, req: CompletionRequest, subs: list[_Sub]) -> AsyncIterator[str]:
        created = int(time.time())
        offsets: dict[int, int] = {}  # choice index -> text offset of its next token
        completion_tokens = 0
        try:
            async for sub, out in self._merge(subs):
                sub.tracker.on_output(out)
                choices: list[CompletionChoice] = []
                for c in out.outputs:
                    idx = sub.index * req.n + c.index
                    first = idx not in offsets
                    text = c.text_delta
                    lp: CompletionLogprobs | None = None
                    if first:
                        offsets[idx] = 0 if req.echo else len(sub.prompt_text)
                    if req.logprobs is not None:
                        lp = CompletionLogprobs()
                        if first and req.echo:
                            lp, offsets[idx] = self._completion_logprobs(sub.prompt_ids, self._echo_logprobs(sub, out), 0)
                        gen, offsets[idx] = self._completion_logprobs(c.token_ids_delta, c.logprobs_delta, offsets[idx])
                        for k in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
                            getattr(lp, k).extend(getattr(gen, k))
                    if first and req.echo:
                        text = sub.prompt_text + text
                    if text or c.finish_reason or (lp is not None and lp.tokens):
                        choices.append(CompletionChoice(index=idx, text=text, logprobs=lp, finish_reason=c.finish_reason))
                    if c.finish_reason is not None:
                        completion_tokens += len(c.token_ids)
                if choices:
                    yield _sse(CompletionChunk(id=base_id, created=created, model=model, choices=choices))
            if req.stream_options and req.stream_options.include_usage:
                prompt_tokens = sum(len(s.prompt_ids) for s in subs)
                usage = Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, total_tokens=prompt_tokens + completion_tokens)
                yield _sse(CompletionChunk(id=base_id, created=created, model=model, choices=[], usage=usage))
        except Exception as e:  # noqa: BLE001 - the stream has begun: report in-band, then [DONE]
            yield sse_error(_stream_error(e))
        finally:
            self._abort_unfinished(subs)
        yield _SSE_DONE

    # -- /v1/chat/completions ------------------------------------------------------------------------------
    def _chat_prompt(self, req: ChatCompletionRequest) -> tuple[str, list[int]]:
        # "developer" is OpenAI's newer name for "system"; chat templates know only the latter.
        messages: list[dict[str, Any]] = []
        for m in req.messages:
            msg: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
            if m.name:
                msg["name"] = m.name
            messages.append(msg)
        try:
            ids = self.engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        except ValueError as e:
            raise bad_request(str(e), "messages") from e
        if not ids:
            raise bad_request("the messages render to an empty prompt", "messages")
        return "", list(ids)

    def _chat_params(self, req: ChatCompletionRequest, prompt_len: int) -> tuple[SamplingParams, dict[str, str]]:
        if req.top_logprobs is not None and not req.logprobs:
            raise bad_request("top_logprobs requires logprobs to be true", "top_logprobs")
        max_param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        max_tokens = req.max_completion_tokens or req.max_tokens or max(1, self.engine.max_model_len - prompt_len)
        rename = {"max_tokens": max_param, "logprobs": "top_logprobs", "prompt": "messages"}
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        return self._params(req, max_tokens, logprobs=logprobs, prompt_logprobs=None, rename=rename), rename

    def _chat_logprobs(self, token_ids: Sequence[int], logprobs: Sequence[Logprob]) -> list[TokenLogprob]:
        content: list[TokenLogprob] = []
        for tid, (chosen, top) in zip(token_ids, logprobs):
            text, raw = self.tokens.get(tid)
            alts = []
            for t, v in top:
                at, ab = self.tokens.get(t)
                alts.append(TopLogprob(token=at, logprob=v, bytes=list(ab)))
            content.append(TokenLogprob(token=text, logprob=chosen, bytes=list(raw), top_logprobs=alts))
        return content

    async def chat(self, req: ChatCompletionRequest, request: Request) -> Response | ChatCompletionResponse:
        model = self.check_model(req.model)
        arrival = time.monotonic()
        prompt = self._chat_prompt(req)
        params, rename = self._chat_params(req, len(prompt[1]))
        base_id = f"chatcmpl-{uuid.uuid4().hex}"
        subs = await self._add_all(base_id, [prompt], [params], arrival, "messages", rename)
        if req.stream:
            return _SSEResponse(self._chat_events(base_id, model, req, subs))
        try:
            await self._collect(subs, request)
        except _ClientGone:
            return Response(status_code=499)
        final = subs[0].final
        assert final is not None
        choices = []
        for c in final.outputs:
            lp = ChatLogprobs(content=self._chat_logprobs(c.token_ids, c.logprobs or [])) if req.logprobs else None
            choices.append(ChatChoice(index=c.index, message=ChatResponseMessage(content=c.text), logprobs=lp, finish_reason=c.finish_reason))
        prompt_tokens = len(subs[0].prompt_ids)
        completion_tokens = sum(len(c.token_ids) for c in final.outputs)
        return ChatCompletionResponse(
            id=base_id,
            model=model,
            choices=choices,
            usage=Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, total_tokens=prompt_tokens + completion_tokens),
        )

    async def _chat_events(self, base_id: str, model: str, req: ChatCompletionRequest, subs: list[_Sub]) -> AsyncIterator[str]:
        created = int(time.time())

        def chunk(choices: list[ChatChunkChoice], usage: Usage | None = None) -> str:
            return _sse(ChatCompletionChunk(id=base_id, created=created, model=model, choices=choices, usage=usage))

        completion_tokens = 0
        try:
            # The role comes first, before any token, as OpenAI streams it.
            yield chunk([ChatChunkChoice(index=i, delta=DeltaMessage(role="assistant", content="")) for i in range(req.n)])
            async for sub, out in self._merge(subs):
                sub.tracker.on_output(out)
                choices: list[ChatChunkChoice] = []
                for c in out.outputs:
                    lp = None
                    if req.logprobs and c.token_ids_delta:
                        lp = ChatLogprobs(content=self._chat_logprobs(c.token_ids_delta, c.logprobs_delta))
                    if c.text_delta or c.finish_reason or lp is not None:
                        delta = DeltaMessage(content=c.text_delta or None)
                        choices.append(ChatChunkChoice(index=c.index, delta=delta, logprobs=lp, finish_reason=c.finish_reason))
                    if c.finish_reason is not None:
                        completion_tokens += len(c.token_ids)
                if choices:
                    yield chunk(choices)
            if req.stream_options and req.stream_options.include_usage:
                prompt_tokens = len(subs[0].prompt_ids)
                yield chunk([], Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, total_tokens=prompt_tokens + completion_tokens))
        except Exception as e:  # noqa: BLE001 - the stream has begun: report in-band, then [DONE]
            yield sse_error(_stream_error(e))
        finally:
            self._abort_unfinished(subs)
        yield _SSE_DONE


class _ClientGone(Exception):
    """The client disconnected before its non-streaming answer was ready."""


def _stream_error(e: Exception) -> ErrorInfo:
    if isinstance(e, (EngineDeadError, RequestAbortedError)):
        return ErrorInfo(message=str(e), type=UNAVAILABLE)
    if isinstance(e, RequestFailedError):  # the engine logged it and serves on
        return ErrorInfo(message=str(e), type="server_error")
    log.exception("error while streaming")
    return ErrorInfo(message=f"internal server error: {type(e).__name__}: {e}", type="server_error")


# ---- the app ------------------------------------------------------------------------------------------


def _auth_dependency(api_key: str | None) -> Callable[..., Any]:
    bearer = HTTPBearer(auto_error=False, description="The key given to `vramwise serve --api-key`.")

    async def check(creds: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if api_key is None:
            return
        # Constant-time comparison: the key must not leak through response timing.
        if creds is None or not secrets.compare_digest(creds.credentials.encode(), api_key.encode()):
            raise APIError(401, "invalid or missing API key (send 'Authorization: Bearer <key>')", code="invalid_api_key")

    return check


def build_app(engine: AsyncEngine, config: ServerConfig) -> FastAPI:
    """The FastAPI app serving `engine`. Its lifespan starts the engine thread and shuts it down."""
    metrics = ServerMetrics(engine)
    serving = OpenAIServing(engine, config, metrics)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            # Requests still streaming were cancelled by uvicorn (their generators abort them); abort the
            # rest and stop the engine thread.
            await engine.shutdown()

    extra: dict[str, Any] = {}
    if "strict_content_type" in inspect.signature(FastAPI.__init__).parameters:
        # Parse JSON bodies whatever their Content-Type (`curl -d '{...}'` sends a form type), as OpenAI,
        # vLLM and llama.cpp do; FastAPI versions before this option did so anyway.
        extra["strict_content_type"] = False
    app = FastAPI(
        title="vramwise",
        version=__version__,
        description="OpenAI-compatible API of vramwise. Errors are `{\"error\": {message, type, param, code}}`.",
        lifespan=lifespan,
        **extra,
    )
    install_error_handlers(app)
    app.add_middleware(StatusCounterMiddleware, metrics=metrics)
    app.state.serving = serving
    app.state.metrics = metrics

    api = APIRouter(dependencies=[Depends(_auth_dependency(config.api_key))], responses=error_responses(401, 500))

    @api.get("/models", response_model=ModelList)
    async def list_models() -> ModelList:
        return serving.model_list()

    @api.get("/models/{model_id:path}", response_model=ModelCard, responses=error_responses(404))
    async def get_model(model_id: str) -> ModelCard:
        serving.check_model(model_id)
        return serving.model_card()

    @api.post(
        "/completions",
        response_model=CompletionResponse,
        responses={**error_responses(400, 404, 503), 200: {"content": {"text/event-stream": {}}, "description": "JSON, or SSE chunks with `stream: true`"}},
    )
    async def create_completion(body: CompletionRequest, request: Request) -> Any:
        return await serving.completion(body, request)

    @api.post(
        "/chat/completions",
        response_model=ChatCompletionResponse,
        responses={**error_responses(400, 404, 503), 200: {"content": {"text/event-stream": {}}, "description": "JSON, or SSE chunks with `stream: true`"}},
    )
    async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Any:
        return await serving.chat(body, request)

    app.include_router(api, prefix="/v1")
    app.include_router(api, include_in_schema=False)  # llama.cpp-style unprefixed aliases

    @app.get("/health", response_model=HealthResponse, responses=error_responses(503))
    async def health() -> Any:
        if not engine.is_running:
            reason = engine.dead_error or "not started"
            return error_json(503, ErrorInfo(message=f"the engine is not running: {reason}", type=UNAVAILABLE))
        return HealthResponse()

    @app.get("/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE: {}}}})
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/version")
    async def version() -> JSONResponse:
        return JSONResponse({"version": __version__})

    return app
