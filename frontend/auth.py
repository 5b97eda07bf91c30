"""API-key authentication (`--api-key`, `VLLM_API_KEY`) as a pure ASGI middleware in front of every route.

Deny by default: every path needs `Authorization: Bearer KEY` except a short allow-list of operational ones
(`/health`, `/version`, `/metrics`, ...), so a router added later is protected without anyone remembering to
protect it. The check runs on the request's headers only, so a refused request is answered 401 before its body
is read. WebSocket handshakes (`/v1/realtime`) get the same check, and may also carry the key as the
`openai-insecure-api-key.KEY` subprotocol (what browser clients of OpenAI's Realtime API send).
"""
from __future__ import annotations

import hashlib
import logging
import os
import secrets
from collections.abc import Iterable
from dataclasses import dataclass

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from frontend.errors import error_body

logger = logging.getLogger("conveyor.frontend")

# Paths that answer without a key: probes, the version, scraping, and the API's own description (no model in
# it). Matched exactly, after removing --root-path, the way the router matches them.
OPEN_PATHS = frozenset({"/health", "/ping", "/load", "/version", "/metrics", "/openapi.json"})

API_KEY_SUBPROTOCOL = "openai-insecure-api-key."
_MESSAGE = "Incorrect or missing API key: send `Authorization: Bearer <key>`."


@dataclass(frozen=True)
class ApiKeys:
    """The accepted keys, kept as SHA-256 digests so every comparison takes the same time whatever the length."""

    digests: tuple[bytes, ...]

    @classmethod
    def resolve(cls, configured: str | Iterable[str] | None) -> ApiKeys:
        """--api-key's keys, else VLLM_API_KEY's, else none (no authentication)."""
        keys = [configured] if isinstance(configured, str) else list(configured or ())
        keys = [key for key in keys if key] or [os.environ.get("VLLM_API_KEY", "")]
        return cls(tuple(_digest(key) for key in keys if key))

    @property
    def required(self) -> bool:
        return bool(self.digests)

    def matches(self, candidate: str) -> bool:
        """Whether `candidate` is one of the keys; compares against all of them (no early exit)."""
        digest = _digest(candidate)
        matched = False
        for key_digest in self.digests:
            matched |= secrets.compare_digest(digest, key_digest)
        return matched

    def admits(self, scope: Scope) -> bool:
        """No keys configured, or the request (HTTP or WebSocket handshake) carries one of them."""
        if not self.required:
            return True
        return any(self.matches(candidate) for candidate in _presented_keys(scope))


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


def _presented_keys(scope: Scope) -> list[str]:
    """`Authorization: Bearer KEY`, plus, on a WebSocket, an `openai-insecure-api-key.KEY` subprotocol."""
    candidates = []
    scheme, _, token = Headers(scope=scope).get("authorization", "").partition(" ")
    if scheme.lower() == "bearer":
        candidates.append(token.strip())
    if scope["type"] == "websocket":
        for protocol in scope.get("subprotocols") or []:
            if str(protocol).startswith(API_KEY_SUBPROTOCOL):
                candidates.append(str(protocol)[len(API_KEY_SUBPROTOCOL):])
    return candidates


def route_path(scope: Scope) -> str:
    """The path the router matches: scope["path"] less --root-path when it starts with it (Starlette's rule,
    repeated here so the allow-list and the router can never disagree about which route a URL reaches)."""
    path: str = scope["path"]
    root_path: str = scope.get("root_path", "")
    if not root_path or not path.startswith(root_path):
        return path
    if path == root_path:
        return ""
    return path[len(root_path):] if path[len(root_path)] == "/" else path


class ApiKeyMiddleware:
    """Answers 401 (OpenAI's error shape) to any HTTP request or WebSocket handshake outside `open_paths` that
    does not carry one of `keys`; lets everything else through untouched (streams included)."""

    def __init__(self, app: ASGIApp, keys: ApiKeys, open_paths: frozenset[str] = OPEN_PATHS) -> None:
        self.app = app
        self.keys = keys
        self.open_paths = open_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or route_path(scope) in self.open_paths \
                or self.keys.admits(scope):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "http":
            await unauthorized_response()(scope, receive, send)
        else:
            await _deny_websocket(scope, send)


def unauthorized_response() -> JSONResponse:
    # `WWW-Authenticate` tells generic HTTP clients which scheme to use; the body is what OpenAI answers.
    return JSONResponse(error_body(401, _MESSAGE, code="invalid_api_key"), status_code=401,
                        headers={"WWW-Authenticate": "Bearer"})


async def _deny_websocket(scope: Scope, send: Send) -> None:
    """Refuse the handshake with the same 401 body when the server can send one, else close it (1008)."""
    if "websocket.http.response" in scope.get("extensions", {}):
        response = unauthorized_response()
        await send({"type": "websocket.http.response.start", "status": 401, "headers": response.raw_headers})
        await send({"type": "websocket.http.response.body", "body": response.body})
    else:
        await send({"type": "websocket.close", "code": 1008, "reason": "invalid_api_key"})
