"""The ASGI layers in front of the routes, in the order a request meets them:

    CORS (answers preflights; headers on every answer, 401s included)
      -> X-Request-Id (--enable-request-id-headers)
        -> API key (frontend/auth.py; 401 before the body is read)
          -> body size (--max-request-body-mb; 413 before a larger body is buffered)
            -> FastAPI's routes

All are pure ASGI (no BaseHTTPMiddleware), so streamed answers pass through unbuffered.
"""
from __future__ import annotations

import json
import uuid

from fastapi import FastAPI
from starlette.datastructures import Headers, MutableHeaders
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from engine_core.config import FrontendConfig
from frontend.auth import OPEN_PATHS, ApiKeyMiddleware, ApiKeys
from frontend.errors import error_body


class RequestIdMiddleware:
    """Every HTTP answer carries `X-Request-Id`: the client's own, or a fresh one. A fresh one is also put into
    the request's headers, so the serving code names the response (`chatcmpl-<id>`) and the engine request
    after the same id."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = Headers(scope=scope).get("x-request-id")
        if not request_id:
            request_id = uuid.uuid4().hex
            scope = {**scope, "headers": [*scope["headers"], (b"x-request-id", request_id.encode("latin-1"))]}

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message)["X-Request-Id"] = request_id
            await send(message)

        await self.app(scope, receive, send_with_id)


class BodyLimitMiddleware:
    """413 in OpenAI's shape for a body over `max_bytes`: at once when its Content-Length says so, else as soon as
    the bytes received pass the limit (a chunked body), before the route has buffered it. Inline base64 media count
    like any other byte."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(send)
            return
        received, started, refused = 0, False, False

        async def counting_receive() -> Message:
            # Past the limit: answer 413 here and tell the route the client left (it stops reading; whatever it
            # answers then is dropped below), since FastAPI turns any error raised while reading into a 400.
            nonlocal received, refused
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes and not started:
                    refused = True
                    await self._refuse(send)
                    return {"type": "http.disconnect"}
            return message

        async def watching_send(message: Message) -> None:
            nonlocal started
            if refused:
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        await self.app(scope, counting_receive, watching_send)

    async def _refuse(self, send: Send) -> None:
        body = json.dumps(error_body(413, f"the request body is larger than {self.max_bytes} bytes "
                                          "(--max-request-body-mb)", code="request_too_large")).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


def install_middleware(app: FastAPI, config: FrontendConfig, keys: ApiKeys) -> None:
    """Add the layers above to `app` (Starlette runs the last added first)."""
    if config.max_request_body_mb > 0:
        app.add_middleware(BodyLimitMiddleware, max_bytes=int(config.max_request_body_mb * 2**20))
    if keys.required:
        open_paths = OPEN_PATHS - {"/metrics"} if config.metrics_require_api_key else OPEN_PATHS
        app.add_middleware(ApiKeyMiddleware, keys=keys, open_paths=open_paths)
    if config.enable_request_id_headers:
        app.add_middleware(RequestIdMiddleware)
    app.add_middleware(CORSMiddleware, allow_origins=list(config.allowed_origins),
                       allow_methods=list(config.allowed_methods), allow_headers=list(config.allowed_headers),
                       allow_credentials=config.allow_credentials)
