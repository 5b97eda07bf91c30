"""The ASGI layers in front of the routes, in the order a request meets them:

    CORS (answers preflights; headers on every answer, 401s included)
      -> X-Request-Id (--enable-request-id-headers)
        -> API key (frontend/auth.py; 401 before the body is read)
          -> FastAPI's routes

All are pure ASGI (no BaseHTTPMiddleware), so streamed answers pass through unbuffered.
"""
from __future__ import annotations

import uuid

from fastapi import FastAPI
from starlette.datastructures import Headers, MutableHeaders
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from engine_core.config import FrontendConfig
from frontend.auth import OPEN_PATHS, ApiKeyMiddleware, ApiKeys


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


def install_middleware(app: FastAPI, config: FrontendConfig, keys: ApiKeys) -> None:
    """Add the layers above to `app` (Starlette runs the last added first)."""
    if keys.required:
        open_paths = OPEN_PATHS - {"/metrics"} if config.metrics_require_api_key else OPEN_PATHS
        app.add_middleware(ApiKeyMiddleware, keys=keys, open_paths=open_paths)
    if config.enable_request_id_headers:
        app.add_middleware(RequestIdMiddleware)
    app.add_middleware(CORSMiddleware, allow_origins=list(config.allowed_origins),
                       allow_methods=list(config.allowed_methods), allow_headers=list(config.allowed_headers),
                       allow_credentials=config.allow_credentials)
