"""`vramwise serve`: load a model and serve it through the OpenAI-compatible API (uvicorn)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import socket
import sys
import time
from collections.abc import Generator
from pathlib import Path
from typing import Any

from vramwise.argtypes import port, seconds

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    from vramwise.cli import add_engine_args

    p = subparsers.add_parser(
        "serve",
        help="serve a model through an OpenAI-compatible HTTP API",
        description="Serve a model at http://HOST:PORT/v1 (OpenAI-compatible: /v1/models, /v1/completions, "
        "/v1/chat/completions; /health and /metrics beside them).",
    )
    add_engine_args(p)
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    g.add_argument("--port", type=port, default=8000, help="TCP port (default: 8000; 0 picks a free one)")
    g.add_argument(
        "--api-key",
        default=None,
        help="require 'Authorization: Bearer KEY' on the API routes (/health and /metrics stay open)",
    )
    g.add_argument(
        "--served-model-name",
        nargs="+",
        default=None,
        metavar="NAME",
        help="name(s) clients send as `model`; the first is listed (default: the model's file or directory name)",
    )
    g.add_argument(
        "--graceful-timeout",
        type=seconds,
        default=10.0,
        help="on SIGINT/SIGTERM, seconds to let in-flight requests finish before aborting them (default: 10)",
    )
    p.set_defaults(func=cmd_serve)


def default_served_model_names(model: str | None) -> tuple[str, ...]:
    """Basename of the model (without .gguf; the bundled file's base name), plus the --model text itself."""
    if model is None:
        from vramwise.weights.bundled import BUNDLED_FILENAME

        return (BUNDLED_FILENAME.split(".")[0],)
    name = Path(model).name
    if name.lower().endswith(".gguf"):
        name = name[: -len(".gguf")]
    names = [name or model]
    if model not in names:
        names.append(model)
    return tuple(names)


def _bind(host: str, port: int) -> socket.socket:
    """Bind before loading the model: a taken port fails in a second, not after the load."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


def _make_server(config: Any, engine: Any, graceful_timeout: float) -> Any:
    import uvicorn  # lazily: `vramwise --help` must stay fast

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Generator[None, None, None]:
            # uvicorn re-raises a caught SIGINT/SIGTERM after its graceful shutdown so that the default
            # handler kills the process; a server that shut down cleanly should exit 0 instead.
            handled = (signal.SIGINT, signal.SIGTERM)
            original = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
            try:
                yield
            finally:
                for sig, handler in original.items():
                    signal.signal(sig, handler)

        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            # Left to uvicorn, requests still running at its timeout are cancelled mid-write: streams end
            # without [DONE]. Instead: stop accepting, let in-flight requests finish for graceful_timeout,
            # then abort the rest through the engine, so each stream ends with an error event and [DONE]
            # and each waiting client gets a 503.
            print("vramwise: shutting down", file=sys.stderr, flush=True)
            for server in self.servers:
                server.close()
            for connection in list(self.server_state.connections):
                connection.shutdown()  # idle keep-alive connections close; busy ones close after this answer
            deadline = time.monotonic() + graceful_timeout
            while engine.num_open_streams and time.monotonic() < deadline and not self.force_exit:
                await asyncio.sleep(0.05)
            await engine.shutdown()
            await super().shutdown(sockets)

    return Server(config)


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from vramwise.cli import make_engine_config
    from vramwise.engine.async_engine import AsyncEngine
    from vramwise.server.app import ServerConfig, build_app

    names = tuple(args.served_model_name) if args.served_model_name else default_served_model_names(args.model)
    sock = _bind(args.host, args.port)
    host, port = sock.getsockname()[:2]
    # The shared builder, so engine flags added to add_engine_args reach the server too.
    engine = AsyncEngine.from_config(make_engine_config(args, show_progress=sys.stderr.isatty()))
    app = build_app(engine, ServerConfig(served_model_names=names, api_key=args.api_key))
    level = logging.getLogger().getEffectiveLevel()
    config = uvicorn.Config(
        app,
        log_level=level,
        access_log=level <= logging.INFO,
        # A backstop only: our shutdown() has drained and aborted the engine's requests already.
        timeout_graceful_shutdown=5,
        # Keep the engine's stream open while the client reads slowly; SSE needs no proxy buffering.
        timeout_keep_alive=30,
    )
    server = _make_server(config, engine, args.graceful_timeout)
    url_host = f"[{host}]" if ":" in host else host
    print(
        f"vramwise: serving {names[0]!r} (max_model_len {engine.max_model_len}) at http://{url_host}:{port}/v1"
        + (" (API key required)" if args.api_key else ""),
        file=sys.stderr,
        flush=True,
    )
    from vramwise.engine.llm_engine import frozen_gc

    with frozen_gc():  # the model and engine stay out of the collector's walks while serving
        server.run(sockets=[sock])
    return 0
