#!/usr/bin/env python3
"""OpenAI-compatible proxy for disaggregated serving: each request is prefilled on one instance, decoded on another.

    python scripts/disagg_proxy.py --port 8000 --prefill http://10.0.0.1:8100 [URL...] \
                                               --decode  http://10.0.0.2:8200 [URL...]

For POST /v1/completions and /v1/chat/completions the proxy
  1. sends the body to the next prefill instance (round robin) as a one-token, non-streaming request with
     `kv_transfer_params={"do_remote_decode": true}`; the instance computes the prompt's KV cache, keeps it and
     answers with a `kv_transfer_params` object saying where the blocks are (an error answer goes back unchanged);
  2. sends the client's original body plus that `kv_transfer_params` to the next decode instance, which pulls
     the KV blocks instead of recomputing the prompt, and relays its answer byte for byte (SSE or JSON).
GET /v1/models goes to the first upstream that answers; GET /health is 200 only when every upstream is healthy.
An upstream that cannot be reached gives 502 with an OpenAI-shaped error body.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import anyio
import httpx
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

logger = logging.getLogger("conveyor.disagg_proxy")

# Only these client headers reach the upstreams: hop-by-hop and length headers must not be copied, and the
# request id lets prefill and decode logs be matched up.
FORWARDED_REQUEST_HEADERS = ("authorization", "x-request-id")
FORWARDED_RESPONSE_HEADERS = ("x-request-id",)
HEALTH_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class ProxyConfig:
    prefill_urls: tuple[str, ...]
    decode_urls: tuple[str, ...]
    connect_timeout_s: float = 10.0


class RoundRobin:
    """Cycles over upstream base URLs; one event loop serves the proxy, so a plain counter is race-free."""

    def __init__(self, urls: Sequence[str]) -> None:
        if not urls:
            raise ValueError("at least one upstream URL is needed")
        self.urls = tuple(urls)
        self._next_index = 0

    def pick(self) -> str:
        url = self.urls[self._next_index % len(self.urls)]
        self._next_index += 1
        return url


class UpstreamUnreachable(Exception):
    """A transport failure (refused, reset, DNS, connect timeout) talking to one upstream."""

    def __init__(self, url: str, cause: BaseException) -> None:
        super().__init__(f"upstream {url} unreachable: {type(cause).__name__}: {cause}".rstrip(": "))
        self.url = url


def error_body(status_code: int, message: str, error_type: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type, "param": None, "code": status_code}}


def error_json(status_code: int, message: str, error_type: str) -> JSONResponse:
    return JSONResponse(error_body(status_code, message, error_type), status_code=status_code)


def normalize_url(url: str) -> str:
    """`host:port`, a full URL or an OpenAI base URL (`.../v1`) -> `http://host:port`, the routes are added later."""
    url = url.strip().rstrip("/").removesuffix("/v1")
    return url if "://" in url else f"http://{url}"


def prefill_body(body: Mapping[str, Any]) -> dict[str, Any]:
    """The request a prefill instance sees: the same prompt and sampling, but only its first token, no stream."""
    request = dict(body)
    request["max_tokens"] = 1
    if "max_completion_tokens" in request:
        request["max_completion_tokens"] = 1
    request.pop("min_tokens", None)  # a min_tokens above 1 would be rejected next to max_tokens=1
    request["stream"] = False
    request.pop("stream_options", None)  # only valid with stream=true
    request["kv_transfer_params"] = {"do_remote_decode": True}
    return request


def forwarded_headers(request: Request, request_id: str) -> dict[str, str]:
    headers = {name: request.headers[name] for name in FORWARDED_REQUEST_HEADERS if name in request.headers}
    headers["x-request-id"] = request_id
    # Byte-for-byte relaying needs the upstream's bytes uncompressed (the client never negotiated an encoding).
    headers["accept-encoding"] = "identity"
    return headers


def passthrough(upstream: httpx.Response, content: bytes) -> Response:
    """A complete (non-streamed) upstream answer, status, content type and body unchanged."""
    headers = {name: upstream.headers[name] for name in FORWARDED_RESPONSE_HEADERS if name in upstream.headers}
    return Response(content, status_code=upstream.status_code, headers=headers,
                    media_type=upstream.headers.get("content-type"))


class UpstreamStreamingResponse(StreamingResponse):
    """Relays an upstream SSE stream; the upstream response is closed however the relay ends (finished, client
    gone, cancelled), so a disconnecting client also disconnects the decode instance, which aborts the request."""

    def __init__(self, upstream: httpx.Response, url: str) -> None:
        headers = {name: upstream.headers[name] for name in FORWARDED_RESPONSE_HEADERS if name in upstream.headers}
        super().__init__(self._relay(upstream, url), status_code=upstream.status_code, headers=headers,
                         media_type=upstream.headers.get("content-type"))
        self.upstream = upstream

    @staticmethod
    async def _relay(upstream: httpx.Response, url: str) -> AsyncIterator[bytes]:
        try:
            async for chunk in upstream.aiter_raw():
                yield chunk
        except httpx.TransportError as exc:
            # Headers already went out: the only way left to tell the client is an error event, as vLLM does.
            logger.warning("decode stream from %s broke: %s", url, exc)
            event = error_body(502, f"decode instance {url} broke the stream: {exc}", "BadGatewayError")
            yield f"data: {json.dumps(event)}\n\n".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):  # the closing must survive the cancellation that got us here
                await self.upstream.aclose()


class DisaggProxy:
    """Routes generation requests prefill-then-decode over one shared HTTP client."""

    def __init__(self, config: ProxyConfig, client: httpx.AsyncClient) -> None:
        self.prefill = RoundRobin(config.prefill_urls)
        self.decode = RoundRobin(config.decode_urls)
        self.client = client
        self._warned_no_kv_params: set[str] = set()

    async def generate(self, request: Request, path: str) -> Response:
        try:
            body = await request.json()
        except ValueError:
            return error_json(400, "the request body is not valid JSON", "BadRequestError")
        if not isinstance(body, dict):
            return error_json(400, "the request body must be a JSON object", "BadRequestError")
        request_id = request.headers.get("x-request-id") or f"disagg-{uuid.uuid4().hex}"
        headers = forwarded_headers(request, request_id)
        started = time.perf_counter()

        prefill_url = self.prefill.pick()
        prefilled = await self._post(prefill_url + path, prefill_body(body), headers)
        prefill_s = time.perf_counter() - started
        if not prefilled.is_success:
            logger.debug("%s %s id=%s prefill=%s -> %d (%.3f s), returned as is", request.method, path, request_id,
                         prefill_url, prefilled.status_code, prefill_s)
            return passthrough(prefilled, prefilled.content)
        kv_transfer_params = self._kv_transfer_params(prefilled, prefill_url)
        if isinstance(kv_transfer_params, Response):
            return kv_transfer_params
        if await request.is_disconnected():  # the prefill's blocks are freed when their lease expires
            logger.debug("%s %s id=%s: client left during prefill", request.method, path, request_id)
            return Response(status_code=499)

        decode_url = self.decode.pick()
        decode_request = {key: value for key, value in body.items() if key != "kv_transfer_params"}
        if kv_transfer_params is not None:
            decode_request["kv_transfer_params"] = kv_transfer_params
        upstream = await self._send(decode_url + path, decode_request, headers)
        logger.debug("%s %s id=%s prefill=%s (%.3f s) decode=%s -> %d (%.3f s to headers) stream=%s",
                     request.method, path, request_id, prefill_url, prefill_s, decode_url, upstream.status_code,
                     time.perf_counter() - started, bool(body.get("stream")))
        if upstream.headers.get("content-type", "").startswith("text/event-stream"):
            return UpstreamStreamingResponse(upstream, decode_url)
        try:
            content = await upstream.aread()
        except httpx.TransportError as exc:
            raise UpstreamUnreachable(decode_url, exc) from exc
        finally:
            await upstream.aclose()
        return passthrough(upstream, content)

    def _kv_transfer_params(self, prefilled: httpx.Response, url: str) -> dict[str, Any] | None | Response:
        """The prefill answer's `kv_transfer_params`; None (decode recomputes the prompt) if it sent none."""
        try:
            answer = prefilled.json()
        except ValueError:
            return error_json(502, f"prefill instance {url} answered with invalid JSON", "BadGatewayError")
        params = answer.get("kv_transfer_params") if isinstance(answer, dict) else None
        if params is None:
            # Misconfiguration, not a per-request event: say it loudly once per instance, then quietly.
            log = logger.debug if url in self._warned_no_kv_params else logger.warning
            self._warned_no_kv_params.add(url)
            log("prefill instance %s sent no kv_transfer_params; decode instances recompute the prompt "
                "(is it started with a kv_producer --kv-transfer-config?)", url)
            return None
        if not isinstance(params, dict):
            return error_json(502, f"prefill instance {url} sent a malformed kv_transfer_params", "BadGatewayError")
        return params

    async def _post(self, url: str, body: dict[str, Any], headers: dict[str, str]) -> httpx.Response:
        try:
            return await self.client.post(url, json=body, headers=headers)
        except httpx.TransportError as exc:
            raise UpstreamUnreachable(url, exc) from exc

    async def _send(self, url: str, body: dict[str, Any], headers: dict[str, str]) -> httpx.Response:
        """POST and return as soon as the headers arrive; the caller owns (and must close) the open response."""
        try:
            return await self.client.send(self.client.build_request("POST", url, json=body, headers=headers),
                                          stream=True)
        except httpx.TransportError as exc:
            raise UpstreamUnreachable(url, exc) from exc

    async def models(self, request: Request) -> Response:
        """Every instance serves the same model, so the first one that answers speaks for all."""
        headers = forwarded_headers(request, request.headers.get("x-request-id") or f"disagg-{uuid.uuid4().hex}")
        failures = []
        for base_url in (*self.decode.urls, *self.prefill.urls):
            try:
                answer = await self.client.get(f"{base_url}/v1/models", headers=headers)
            except httpx.TransportError as exc:
                failures.append(str(UpstreamUnreachable(base_url, exc)))
                continue
            return passthrough(answer, answer.content)
        return error_json(502, "; ".join(failures), "BadGatewayError")

    async def health(self) -> Response:
        urls = (*self.prefill.urls, *self.decode.urls)
        states = await asyncio.gather(*(self._upstream_health(url) for url in urls))
        healthy = all(state == "ok" for state in states)
        return JSONResponse({"healthy": healthy, "upstreams": dict(zip(urls, states))},
                            status_code=200 if healthy else 503)

    async def _upstream_health(self, base_url: str) -> str:
        try:
            answer = await self.client.get(f"{base_url}/health", timeout=HEALTH_TIMEOUT_S)
        except httpx.HTTPError as exc:
            return f"unreachable: {type(exc).__name__}"
        return "ok" if answer.status_code == 200 else f"HTTP {answer.status_code}"


def create_app(config: ProxyConfig) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # No read/write/pool timeout: a decode stream may run for minutes, and a prefill may queue behind
        # others. Connections are unlimited because each open stream holds one. trust_env=False keeps
        # HTTP(S)_PROXY settings meant for the outside world away from the cluster-internal upstreams.
        timeout = httpx.Timeout(None, connect=config.connect_timeout_s)
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=256)
        async with httpx.AsyncClient(timeout=timeout, limits=limits, trust_env=False) as client:
            app.state.proxy = DisaggProxy(config, client)
            yield

    app = FastAPI(title="Conveyor disaggregated prefill/decode proxy", lifespan=lifespan)

    @app.exception_handler(UpstreamUnreachable)
    async def on_unreachable(_: Request, exc: Exception) -> JSONResponse:
        logger.warning("%s", exc)
        return error_json(502, str(exc), "BadGatewayError")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        proxy: DisaggProxy = request.app.state.proxy
        return await proxy.generate(request, "/v1/completions")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        proxy: DisaggProxy = request.app.state.proxy
        return await proxy.generate(request, "/v1/chat/completions")

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        proxy: DisaggProxy = request.app.state.proxy
        return await proxy.models(request)

    @app.get("/health")
    async def health(request: Request) -> Response:
        proxy: DisaggProxy = request.app.state.proxy
        return await proxy.health()

    return app


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--prefill", nargs="+", action="extend", required=True, metavar="URL",
                        help="prefill instances (http://host:port or host:port)")
    parser.add_argument("--decode", nargs="+", action="extend", required=True, metavar="URL",
                        help="decode instances (http://host:port or host:port)")
    parser.add_argument("--connect-timeout", type=float, default=10.0, help="seconds to connect to an upstream")
    parser.add_argument("--graceful-shutdown-timeout", type=float, default=5.0,
                        help="seconds open streams may go on after SIGTERM/SIGINT before they are cut")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                        help="debug logs one line per request")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # it logs every upstream request at info
    config = ProxyConfig(prefill_urls=tuple(normalize_url(url) for url in args.prefill),
                         decode_urls=tuple(normalize_url(url) for url in args.decode),
                         connect_timeout_s=args.connect_timeout)
    logger.info("disagg proxy on http://%s:%d: prefill %s, decode %s", args.host, args.port,
                ", ".join(config.prefill_urls), ", ".join(config.decode_urls))
    # Without a graceful-shutdown limit uvicorn would wait for every open generation stream to end on SIGTERM.
    uvicorn.run(create_app(config), host=args.host, port=args.port, log_level="warning", access_log=False,
                timeout_graceful_shutdown=args.graceful_shutdown_timeout)


if __name__ == "__main__":
    main()
