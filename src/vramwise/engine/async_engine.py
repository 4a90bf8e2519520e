"""AsyncEngine: the synchronous LLMEngine driven by one background thread, streamed to asyncio callers.

The engine is not thread-safe, so every call into it (add, abort, step) happens on the engine thread.
Callers talk to that thread through a command queue that the thread drains between steps; outputs travel
back to the event loop with `loop.call_soon_threadsafe`, one hop per step, into a per-request asyncio.Queue.

    server handler --add/abort--> command queue --> engine thread: drain commands; step(); publish
    RequestStream  <--outputs---- call_soon_threadsafe <-------------'

Validation errors (ValueError from add_request) come back to the caller of `add_request` before any output,
so an HTTP handler can answer 400 before it starts a stream. If a step raises, every request in the engine
fails with RequestFailedError naming the error (they may all have been in that step), and the engine checks
itself (LLMEngine.check_health: nothing left scheduled, the KV pool whole, the GPU still answering); healthy, it
goes on serving new requests. Otherwise, or if the failure is not an Exception, the engine is dead: every open
stream fails with EngineDeadError and new requests are refused (the server reports 503 on /health).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from vramwise.config import EngineConfig
from vramwise.engine.llm_engine import LLMEngine
from vramwise.engine.outputs import RequestOutput
from vramwise.sampling_params import SamplingParams

log = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine thread stopped (a step raised, or the engine was shut down); no request can be served."""


class RequestFailedError(RuntimeError):
    """An engine step raised while this request was in the engine; the engine itself may go on serving."""


class RequestAbortedError(RuntimeError):
    """Raised to a stream's reader when someone else aborted its request."""


@dataclass(frozen=True)
class EngineStats:
    """A snapshot the engine thread publishes after every iteration; read lock-free by /metrics."""

    num_running: int = 0
    num_waiting: int = 0
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0
    num_requests: int = 0  # requests the engine holds (not yet finished or aborted)
    num_steps: int = 0


# -- commands (caller -> engine thread) ----------------------------------------------------------------
@dataclass
class _Add:
    request_id: str
    prompt: str | list[int]
    params: SamplingParams
    arrival_time: float
    done: asyncio.Future[None]


@dataclass
class _Abort:
    request_id: str


@dataclass
class _Call:
    fn: Callable[[LLMEngine], Any]
    done: asyncio.Future[Any]


class _Stop:
    pass


_Command = _Add | _Abort | _Call | _Stop


class RequestStream:
    """The outputs of one request, in step order. Async-iterable; ends after the finished output.

    Lives on the event loop: only loop callbacks put into it. Each RequestOutput carries the deltas since
    the previous one, so a slow consumer that finds several queued loses nothing.
    """

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self._queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self.finished = False  # the finished output (or an error) has been handed to the consumer

    def _put(self, item: RequestOutput | BaseException) -> None:
        self._queue.put_nowait(item)

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        if item.finished:
            self.finished = True
        return item


class AsyncEngine:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._commands: deque[_Command] = deque()
        self._wake = threading.Condition()
        self._streams: dict[str, RequestStream] = {}  # event-loop side only
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._dead: BaseException | None = None
        self._stopping = False
        self._live: set[str] = set()  # request ids the engine holds; engine thread only
        self.stats = EngineStats(kv_blocks_total=engine.kv_blocks_total)

    @classmethod
    def from_config(cls, config: EngineConfig) -> AsyncEngine:
        """Load the model (slow: seconds) on the calling thread, before any event loop needs to answer."""
        return cls(LLMEngine(config))

    # -- facts the server needs (read-only after construction, safe from any thread) ------------------
    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def vocab_size(self) -> int:
        return self.engine.model_config.vocab_size

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._dead is None

    @property
    def num_open_streams(self) -> int:
        """Requests whose outputs someone is still waiting for (read on the event loop)."""
        return len(self._streams)

    @property
    def dead_error(self) -> BaseException | None:
        return self._dead

    # -- lifecycle --------------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the engine thread; call from the event loop that will consume the streams."""
        if self._thread is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="vramwise-engine", daemon=True)
        self._thread.start()

    async def shutdown(self, reason: str = "the server is shutting down") -> None:
        """Abort every request, stop the engine thread and fail the streams still open. Idempotent."""
        if self._thread is None:
            return
        self._stopping = True
        self._submit(_Stop())
        thread = self._thread
        await asyncio.get_running_loop().run_in_executor(None, thread.join)
        self._fail_all(EngineDeadError(reason))
        if self._dead is None:
            self._dead = EngineDeadError(reason)

    # -- requests ---------------------------------------------------------------------------------------
    async def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        arrival_time: float | None = None,
    ) -> RequestStream:
        """Queue a request and wait until the engine accepted it.

        Raises ValueError (bad prompt or parameters; nothing was queued) or EngineDeadError. The returned
        stream yields the request's outputs; if the caller stops reading early it must call abort().
        """
        self._check_alive()
        assert self._loop is not None
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        stream = RequestStream(request_id)
        # Registered before the engine sees the request, so no output can arrive without a home.
        self._streams[request_id] = stream
        done: asyncio.Future[None] = self._loop.create_future()
        self._submit(_Add(request_id, prompt, params, arrival_time or time.monotonic(), done))
        try:
            await done
        except BaseException:
            self._streams.pop(request_id, None)
            # Cancelled while waiting: the engine may have queued it already; an abort of an unknown id
            # is harmless.
            self._submit(_Abort(request_id))
            raise
        return stream

    async def generate(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        arrival_time: float | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Outputs of one request; leaving the loop early (break, cancellation) aborts the request.

        Validation errors surface at the first iteration; use add_request() to get them before streaming.
        """
        stream = await self.add_request(request_id, prompt, params, arrival_time)
        try:
            async for out in stream:
                yield out
        finally:
            if not stream.finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        """Cancel a request; its KV blocks are freed at the engine's next command drain (before the next
        step). Safe to call for finished or unknown ids, and from the event loop thread only."""
        stream = self._streams.pop(request_id, None)
        if stream is not None and not stream.finished:
            stream._put(RequestAbortedError(f"request {request_id} was aborted"))
        if self._thread is not None and self._dead is None:
            self._submit(_Abort(request_id))

    async def call(self, fn: Callable[[LLMEngine], Any]) -> Any:
        """Run fn(engine) on the engine thread between steps and return its result (for introspection
        that must not race with a step)."""
        self._check_alive()
        assert self._loop is not None
        done: asyncio.Future[Any] = self._loop.create_future()
        self._submit(_Call(fn, done))
        return await done

    def _check_alive(self) -> None:
        if self._dead is not None:
            raise EngineDeadError(f"the engine is not running: {self._dead}")
        if self._thread is None or self._stopping:
            raise EngineDeadError("the engine is not running" if not self._stopping else "the server is shutting down")

    def _submit(self, cmd: _Command) -> None:
        with self._wake:
            self._commands.append(cmd)
            self._wake.notify()

    # -- event-loop side callbacks ----------------------------------------------------------------------
    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue  # aborted by its consumer while the step ran
            stream._put(out)
            if out.finished:
                del self._streams[out.request_id]

    def _fail(self, request_ids: list[str], error: BaseException) -> None:
        for rid in request_ids:
            stream = self._streams.pop(rid, None)
            if stream is not None:
                stream._put(error)

    def _fail_all(self, error: BaseException) -> None:
        streams, self._streams = self._streams, {}
        for stream in streams.values():
            stream._put(error)

    @staticmethod
    def _resolve(fut: asyncio.Future[Any], result: Any = None, error: BaseException | None = None) -> None:
        if fut.done():  # the waiter was cancelled
            return
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(result)

    # -- engine thread ----------------------------------------------------------------------------------
    def _publish_stats(self, steps: int) -> None:
        e = self.engine
        self.stats = EngineStats(
            num_running=e.num_running,
            num_waiting=e.num_waiting,
            kv_blocks_used=e.kv_blocks_used,
            kv_blocks_total=e.kv_blocks_total,
            num_requests=len(self._live),
            num_steps=steps,
        )

    def _take_commands(self, block: bool) -> list[_Command]:
        with self._wake:
            while block and not self._commands:
                self._wake.wait()
            cmds = list(self._commands)
            self._commands.clear()
        return cmds

    def _run(self) -> None:
        loop = self._loop
        assert loop is not None
        steps = 0
        try:
            while True:
                cmds = self._take_commands(block=not self._live)
                for i, cmd in enumerate(cmds):
                    if isinstance(cmd, _Stop):
                        self._stop(loop, steps, cmds[i + 1 :])
                        return
                    self._handle(cmd, loop)
                if self._live:
                    try:
                        outputs = self.engine.step()
                    except Exception as e:  # noqa: BLE001 - its requests fail; the engine goes on if healthy
                        if not self._recover(e, loop):
                            raise
                        continue
                    steps += 1
                    for out in outputs:
                        if out.finished:
                            self._live.discard(out.request_id)
                    if outputs:
                        loop.call_soon_threadsafe(self._deliver, outputs)
                    if not self.engine.has_unfinished_requests():
                        self._live.clear()
                    elif not outputs and self.engine.num_running == 0:
                        # Nothing could be scheduled (should not happen: add_request rejects what can
                        # never fit); do not spin a core while waiting for an abort.
                        with self._wake:
                            self._wake.wait(timeout=0.01)
                self._publish_stats(steps)
        except BaseException as e:  # noqa: BLE001 - any failure in a step leaves the engine unusable
            log.exception("engine step failed; the engine is dead")
            self._dead = e
            err = EngineDeadError(f"the engine failed: {type(e).__name__}: {e}")
            try:
                loop.call_soon_threadsafe(self._fail_all, err)
                # Commands already queued (adds waiting for acceptance) must not hang forever.
                for cmd in self._take_commands(block=False):
                    if isinstance(cmd, (_Add, _Call)):
                        loop.call_soon_threadsafe(self._resolve, cmd.done, None, err)
            except RuntimeError:  # the loop is closed: nobody is waiting
                pass

    def _recover(self, error: Exception, loop: asyncio.AbstractEventLoop) -> bool:
        """After a failed step: fail and abort every request in the engine, then say whether the engine is
        healthy enough to serve new requests (LLMEngine.check_health; True for an engine without one)."""
        ids = list(self._live)
        log.exception("engine step failed; failing its %d request(s)", len(ids))
        err = RequestFailedError(f"the request failed in an engine step: {type(error).__name__}: {error}")
        for rid in ids:
            self.engine.abort_request(rid)
        self._live.clear()
        try:
            loop.call_soon_threadsafe(self._fail, ids, err)
        except RuntimeError:  # the loop is closed: nobody is waiting
            pass
        check = getattr(self.engine, "check_health", None)
        problem = check() if callable(check) else None
        if problem is not None:
            log.error("the engine is not healthy after the failed step: %s", problem)
            return False
        return True

    def _stop(self, loop: asyncio.AbstractEventLoop, steps: int, pending: list[_Command]) -> None:
        for rid in list(self._live):
            self.engine.abort_request(rid)
        self._live.clear()
        self._publish_stats(steps)
        err = EngineDeadError("the server is shutting down")
        for cmd in pending + self._take_commands(block=False):
            if isinstance(cmd, (_Add, _Call)):
                loop.call_soon_threadsafe(self._resolve, cmd.done, None, err)

    def _handle(self, cmd: _Command, loop: asyncio.AbstractEventLoop) -> None:
        if isinstance(cmd, _Add):
            try:
                self.engine.add_request(cmd.request_id, cmd.prompt, cmd.params, arrival_time=cmd.arrival_time)
            except Exception as e:  # validation: goes back to the caller, the engine is unharmed
                loop.call_soon_threadsafe(self._resolve, cmd.done, None, e)
                return
            self._live.add(cmd.request_id)
            loop.call_soon_threadsafe(self._resolve, cmd.done, None, None)
        elif isinstance(cmd, _Abort):
            if cmd.request_id in self._live:
                self.engine.abort_request(cmd.request_id)
                self._live.discard(cmd.request_id)
        elif isinstance(cmd, _Call):
            try:
                result = cmd.fn(self.engine)
            except Exception as e:
                loop.call_soon_threadsafe(self._resolve, cmd.done, None, e)
                return
            loop.call_soon_threadsafe(self._resolve, cmd.done, result, None)
