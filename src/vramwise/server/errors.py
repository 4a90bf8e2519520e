"""Errors in OpenAI's shape, and the handlers that make every failure one of them.

Bad input must never become a 500: FastAPI's RequestValidationError (malformed JSON, a body that is not
an object, a field out of range) maps to 400 naming the parameter; engine ValueErrors map to 400; an
unknown route to 404; a dead engine to 503. Only a bug in the server is a 500.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from vramwise.engine.async_engine import EngineDeadError, RequestFailedError
from vramwise.server.protocol import ErrorInfo, ErrorResponse

log = logging.getLogger(__name__)

INVALID_REQUEST = "invalid_request_error"
SERVER_ERROR = "server_error"
UNAVAILABLE = "service_unavailable"


class APIError(Exception):
    """Raised by handlers; rendered as {"error": {...}} with `status`."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = INVALID_REQUEST,  # noqa: A002 - OpenAI's field name
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.info = ErrorInfo(message=message, type=type, param=param, code=code)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, INVALID_REQUEST, param, code)


def from_value_error(e: ValueError, default_param: str | None) -> APIError:
    """An engine/SamplingParams ValueError as a 400; SamplingParams sets `.param` on its errors."""
    return bad_request(str(e), getattr(e, "param", None) or default_param)


def error_body(info: ErrorInfo) -> dict[str, Any]:
    return ErrorResponse(error=info).model_dump()


def error_json(status: int, info: ErrorInfo, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(info), status_code=status, headers=headers)


def sse_error(info: ErrorInfo) -> str:
    """An error event inside an SSE stream (the stream then ends with [DONE])."""
    return f"data: {json.dumps(error_body(info))}\n\n"


# OpenAPI: what each route may answer besides its 200.
_DESCRIPTIONS = {
    400: "Invalid request: malformed JSON, a parameter out of range (named in `param`), an empty or "
    "out-of-vocabulary prompt, or prompt + max_tokens beyond the context length",
    401: "Missing or wrong API key (when the server runs with --api-key)",
    404: "Unknown model (code `model_not_found`)",
    500: "Internal server error",
    503: "The engine is not running (it failed, or the server is shutting down)",
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {s: {"model": ErrorResponse, "description": _DESCRIPTIONS[s]} for s in statuses}


def _param_from_loc(loc: Sequence[int | str]) -> str | None:
    # loc is ("body", "messages", 0, "content", ...); OpenAI's `param` is the top-level field name.
    parts = [p for p in loc if p != "body"]
    return str(parts[0]) if parts and isinstance(parts[0], str) else None


def _validation_message(errors: Sequence[dict[str, Any]]) -> tuple[str, str | None]:
    first = errors[0]
    etype = first.get("type", "")
    loc = tuple(first.get("loc", ()))
    if etype == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "")
        return f"malformed JSON body{': ' + str(detail) if detail else ''}", None
    if loc == ("body",):
        if etype == "missing":
            return "the request body is missing; expected a JSON object", None
        return "the request body must be a JSON object (sent as Content-Type: application/json)", None
    msgs = []
    for err in errors[:3]:
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
        msgs.append(f"{where}: {msg}" if where else msg)
    return "; ".join(msgs), _param_from_loc(loc)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
        return error_json(e.status, e.info, headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, e: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(list(e.errors()) or [{"msg": "invalid request"}])
        return error_json(400, ErrorInfo(message=message, type=INVALID_REQUEST, param=param))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, e: StarletteHTTPException) -> JSONResponse:
        etype = INVALID_REQUEST if e.status_code < 500 else SERVER_ERROR
        code = "not_found" if e.status_code == 404 else None
        return error_json(e.status_code, ErrorInfo(message=str(e.detail), type=etype, code=code), dict(e.headers or {}))

    @app.exception_handler(EngineDeadError)
    async def _dead(_: Request, e: EngineDeadError) -> JSONResponse:
        return error_json(503, ErrorInfo(message=str(e), type=UNAVAILABLE))

    @app.exception_handler(RequestFailedError)
    async def _failed(_: Request, e: RequestFailedError) -> JSONResponse:
        return error_json(500, ErrorInfo(message=str(e), type=SERVER_ERROR))

    @app.exception_handler(Exception)
    async def _internal(_: Request, e: Exception) -> JSONResponse:
        log.exception("internal error")
        return error_json(500, ErrorInfo(message=f"internal server error: {type(e).__name__}", type=SERVER_ERROR))
