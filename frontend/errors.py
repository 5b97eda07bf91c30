"""Every failure a client can see, in the OpenAI error shape: `{"error": {message, type, param, code}}`.

Routers and serving code raise `APIError` subclasses; `install_error_handlers` maps them, FastAPI's own
validation and HTTP exceptions, and anything unexpected to JSON. A client never sees a traceback.
"""
from __future__ import annotations

import json
import logging
from typing import Any, Sequence

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger("conveyor.frontend")

QUEUE_FULL = "the engine's waiting queue is full"  # engine_core.scheduler's refusal, answered 503 + Retry-After

_TYPE_BY_STATUS = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError",
                   405: "MethodNotAllowedError", 413: "RequestTooLargeError", 422: "BadRequestError",
                   500: "InternalServerError", 503: "ServiceUnavailableError"}


class APIError(Exception):
    """An error with an HTTP status; `code` defaults to the status (vLLM does the same)."""

    status_code = 500
    headers: dict[str, str] = {}

    def __init__(self, message: str, *, param: str | None = None, code: str | int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code if code is not None else self.status_code


class BadRequestError(APIError):
    status_code = 400


class AuthenticationError(APIError):
    status_code = 401


class NotFoundError(APIError):
    status_code = 404


class InternalServerError(APIError):
    status_code = 500


class QueueFullError(APIError):
    """The engine's waiting queue is at --max-waiting-requests: come back shortly."""

    status_code = 503
    headers = {"Retry-After": "1"}


class EngineDeadError(APIError):
    """The engine core died or stopped sending heartbeats; every request answers 503 from then on."""

    status_code = 503


def error_body(status_code: int, message: str, param: str | None = None,
               code: str | int | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": _TYPE_BY_STATUS.get(status_code, "APIError"),
                      "param": param, "code": code if code is not None else status_code}}


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error_body(error.status_code, error.message, error.param, error.code),
                        status_code=error.status_code, headers=error.headers or None)


def error_event(error: APIError) -> str:
    """The SSE event sent when a stream fails after its headers went out."""
    return f"data: {json.dumps(error_body(error.status_code, error.message, error.param, error.code))}\n\n"


def engine_error(message: str) -> APIError:
    """Map a request the engine finished with reason "error": its own prompt problems are the client's fault."""
    if message.startswith(QUEUE_FULL):
        return QueueFullError(message, code="queue_full")
    if "already in use" in message:  # another frontend runs a request with the same request_id
        return BadRequestError(message, param="request_id")
    if message.startswith("invalid vllm_xargs"):  # a logits processor rejected its args (workers/logits_processors)
        return BadRequestError(message, param="vllm_xargs")
    if "--runner" in message or "pooling task" in message:  # the model does not serve what was asked
        return BadRequestError(message, param="model")
    if "prompt" in message.lower():
        return BadRequestError(message, param="prompt")
    return InternalServerError(message)


def validation_error(errors: Sequence[Any]) -> BadRequestError:
    """Turn pydantic's error list into one 400 naming the first offending parameter."""
    if not errors:
        return BadRequestError("invalid request")
    first = errors[0]
    location = [str(part) for part in first.get("loc", ()) if part != "body" and not _is_union_tag(part)]
    if first.get("type") == "json_invalid":
        detail = first.get("ctx", {}).get("error")
        return BadRequestError("the request body is not valid JSON" + (f": {detail}" if detail else ""))
    param = ".".join(location) or None
    message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    if param is None:
        return BadRequestError(f"invalid request body: {message}")
    if first.get("type") != "missing" and "input" in first:
        message = f"{message} (got {_short(first['input'])})"
    return BadRequestError(f"invalid value for '{param}': {message}", param=param)


_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none", "null"}


def _is_union_tag(part: Any) -> bool:
    """pydantic puts the union member it tried into `loc` ("stop", "str"); that is not a parameter name."""
    return isinstance(part, str) and ("[" in part or part in _TYPE_TAGS)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def install_error_handlers(app: FastAPI) -> None:
    """Replace FastAPI's default handlers so every error, expected or not, has the OpenAI shape."""

    async def on_api_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, APIError)
        return error_response(exc)

    async def on_validation_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return error_response(validation_error(exc.errors()))

    async def on_http_exception(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        body = error_body(exc.status_code, str(exc.detail))
        return JSONResponse(body, status_code=exc.status_code, headers=getattr(exc, "headers", None))

    async def on_unexpected(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("unexpected error while serving a request")
        return JSONResponse(error_body(500, f"internal server error: {type(exc).__name__}"), status_code=500)

    app.add_exception_handler(APIError, on_api_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_exception)
    app.add_exception_handler(Exception, on_unexpected)
