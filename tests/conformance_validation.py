"""Strict OpenAI-conformance checks of every raw body a test sees, recorded at the HTTP transport.

`Recorder` hands out `openai.OpenAI`, `openai.AsyncOpenAI` and plain `httpx` clients whose transport tees every
response body (JSON or SSE, whole or streamed) and validates it, route by route, against the official `openai`
types with `model_validate(raw, strict=True)`: no required field missing, no wrong type, no coercion. The per-route
checks (and vLLM's extra fields) are in tests/schema_validation.py; `/v1/responses[/{id}[/cancel]]` -> `Response`
(tests/responses_validation.py), `/detokenize`, `/version` and `/health` are checked here.

Validation never raises inside the transport (the SDK would turn that into a retry or a connection error): failures
are collected and `Recorder.assert_clean()` (called by the test module's fixture) fails the test with them.
"""
from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import httpx
import openai
from openai.types.responses import Response

from tests.responses_validation import validate_response
from tests.schema_validation import (validate_chat_completion, validate_completion, validate_error,
                                     validate_generation_stream, validate_metrics, validate_model, validate_models,
                                     validate_responses_stream, validate_tokenize)
from tests.server_harness import ConveyorServer

# --------------------------------------------------------------------------- the recorder


@dataclass
class Record:
    """One HTTP exchange: the request JSON (if any), the status and what the body parsed to."""

    method: str
    path: str
    status: int
    request: Any
    json: Any = None  # a JSON body
    events: list[dict[str, Any]] = field(default_factory=list)  # an SSE body's payloads (chunks or events)
    text: str = ""
    complete: bool = True  # False: the client closed the stream before its end


class Recorder:
    """Validates every response body its clients receive; collects failures for `assert_clean`."""

    def __init__(self) -> None:
        self.records: list[Record] = []
        self.failures: list[str] = []
        self.unread: dict[int, str] = {}  # responses received but whose body was never read to the end and closed
        self._keys = itertools.count()

    # ------------------------------------------------------------------ clients

    def openai(self, server: ConveyorServer) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=server.api_key or "unused", max_retries=0,
                             http_client=httpx.Client(transport=_SyncRecording(self), timeout=180.0))

    def async_openai(self, server: ConveyorServer) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"{server.base_url}/v1", api_key=server.api_key or "unused",
                                  max_retries=0,
                                  http_client=httpx.AsyncClient(transport=_AsyncRecording(self), timeout=180.0))

    def http(self, server: ConveyorServer) -> httpx.Client:
        return httpx.Client(base_url=server.base_url, transport=_SyncRecording(self), timeout=180.0)

    # ------------------------------------------------------------------ lookups for tests

    def last(self, path: str) -> Record:
        for record in reversed(self.records):
            if record.path == path:
                return record
        raise AssertionError(f"no exchange recorded for {path}")

    def assert_clean(self) -> None:
        assert self.records, "the test made no recorded HTTP exchange"
        assert not self.unread, f"responses never read and closed (so never validated): {list(self.unread.values())}"
        assert not self.failures, "responses that break the OpenAI types:\n\n" + "\n\n".join(self.failures)

    # ------------------------------------------------------------------ validation

    def received(self, request: httpx.Request) -> Callable[[int, httpx.Headers, bytes, bool], None]:
        """Note a response whose body is still to come; the callback validates it once it is closed."""
        key = next(self._keys)
        self.unread[key] = f"{request.method} {request.url.path}"

        def done(status: int, headers: httpx.Headers, body: bytes, complete: bool) -> None:
            self.unread.pop(key, None)
            self.observe(request, status, headers, body, complete)
        return done

    def observe(self, request: httpx.Request, status: int, headers: httpx.Headers, body: bytes,
                complete: bool = True) -> None:
        """Validate one body; `complete` is False when the client closed a stream before its end (the SDK does
        after an error event): the events received so far are validated, the end-of-stream checks skipped."""
        path = request.url.path
        try:
            request_json = json.loads(request.content) if request.content else None
        except ValueError:
            request_json = None
        record = Record(request.method, path, status, request_json, complete=complete)
        self.records.append(record)
        try:
            assert "content-encoding" not in headers, "compressed bodies are not decoded by this recorder"
            self._validate(record, headers.get("content-type", ""), body.decode("utf-8"))
        except Exception as exc:  # noqa: BLE001 - every failure is reported by assert_clean
            self.failures.append(f"{request.method} {path} -> {status}: {type(exc).__name__}: {exc}\n"
                                 f"  request: {str(request_json)[:600]}\n  body: {body[:1500]!r}")

    def _validate(self, record: Record, content_type: str, text: str) -> None:
        path, method, status = record.path, record.method, record.status
        record.text = text
        if content_type.startswith("text/event-stream"):
            assert status == 200, status
            if not record.complete:
                text = text[:text.rfind("\n\n") + 2] if "\n\n" in text else ""  # whole events only
            if path in ("/v1/completions", "/v1/chat/completions"):
                record.events = validate_generation_stream(text, path == "/v1/chat/completions", record.complete)
            elif path.startswith("/v1/responses"):
                record.events = validate_responses_stream(text, record.complete)
            else:
                raise AssertionError("no stream validator for this route")
            return
        if path == "/metrics":
            assert status == 200 and content_type.startswith("text/plain"), (status, content_type)
            validate_metrics(text)
            return
        if path == "/health":
            if status == 503:
                validate_error(json.loads(text))
            else:
                assert status == 200 and text == "", (status, text[:200])
            return
        assert content_type.startswith("application/json"), f"content-type {content_type!r}"
        raw = record.json = json.loads(text)
        if status >= 400:
            validate_error(raw)
            return
        assert status == 200, status
        if path == "/v1/models":
            validate_models(raw)
        elif path.startswith("/v1/models/"):
            validate_model(raw)
        elif path == "/v1/completions":
            validate_completion(raw)
        elif path == "/v1/chat/completions":
            validate_chat_completion(raw)
        elif path.startswith("/v1/responses") and method != "DELETE":
            response = validate_response(raw)
            assert isinstance(response, Response)
        elif path.startswith("/v1/responses"):
            assert raw == {"id": path.rsplit("/", 1)[1], "object": "response", "deleted": True}, raw
        elif path == "/tokenize":
            validate_tokenize(raw)
        elif path == "/detokenize":
            assert set(raw) == {"prompt"} and isinstance(raw["prompt"], str), raw
        elif path == "/version":
            assert set(raw) == {"version"} and isinstance(raw["version"], str) and raw["version"], raw
        else:
            raise AssertionError("no validator for this route")


# --------------------------------------------------------------------------- transports that tee the body


class _SyncTee(httpx.SyncByteStream):
    def __init__(self, inner: httpx.SyncByteStream, done: Callable[[bytes, bool], None]) -> None:
        self._inner, self._done, self._body, self._closed, self._eof = inner, done, bytearray(), False, False

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self._inner:
            self._body.extend(chunk)
            yield chunk
        self._eof = True

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._inner.close()
            self._done(bytes(self._body), self._eof)


class _AsyncTee(httpx.AsyncByteStream):
    def __init__(self, inner: httpx.AsyncByteStream, done: Callable[[bytes, bool], None]) -> None:
        self._inner, self._done, self._body, self._closed, self._eof = inner, done, bytearray(), False, False

    async def __aiter__(self):  # type: ignore[override]
        async for chunk in self._inner:
            self._body.extend(chunk)
            yield chunk
        self._eof = True

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            await self._inner.aclose()
            self._done(bytes(self._body), self._eof)


class _SyncRecording(httpx.BaseTransport):
    def __init__(self, recorder: Recorder) -> None:
        self._recorder, self._inner = recorder, httpx.HTTPTransport()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        request.read()
        response = self._inner.handle_request(request)
        assert isinstance(response.stream, httpx.SyncByteStream)
        done = self._recorder.received(request)
        tee = _SyncTee(response.stream, lambda body, eof: done(response.status_code, response.headers, body, eof))
        return httpx.Response(response.status_code, headers=response.headers, stream=tee,
                              extensions=response.extensions, request=request)

    def close(self) -> None:
        self._inner.close()


class _AsyncRecording(httpx.AsyncBaseTransport):
    def __init__(self, recorder: Recorder) -> None:
        self._recorder, self._inner = recorder, httpx.AsyncHTTPTransport()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        await request.aread()
        response = await self._inner.handle_async_request(request)
        assert isinstance(response.stream, httpx.AsyncByteStream)
        done = self._recorder.received(request)
        tee = _AsyncTee(response.stream,
                        lambda body, eof: done(response.status_code, response.headers, body, eof))
        return httpx.Response(response.status_code, headers=response.headers, stream=tee,
                              extensions=response.extensions, request=request)

    async def aclose(self) -> None:
        await self._inner.aclose()
