"""Strict OpenAI-conformance checks of every raw body a test sees, recorded at the HTTP transport.

`Recorder` hands out `openai.OpenAI`, `openai.AsyncOpenAI` and plain `httpx` clients whose transport tees every
response body (JSON or SSE, whole or streamed) and validates it, route by route, against the official `openai`
types with `model_validate(raw, strict=True)`: no required field missing, no wrong type, no coercion.

- `/v1/models` -> `SyncPage[Model]`, `/v1/models/{id}` -> `Model`
- `/v1/completions` -> `Completion`; each SSE chunk -> `Completion` with one relaxation: `finish_reason` may be null
  on a chunk that does not end its choice (OpenAI's own stream sends `"finish_reason": null` there, and the SDK
  reads chunks into this same type without validating), a chunk that ends a choice validates against the unmodified
  `Completion`
- `/v1/chat/completions` -> `ChatCompletion`; each SSE chunk -> `ChatCompletionChunk`
- `/v1/responses[/{id}[/cancel]]` -> `Response`; SSE events -> `ResponseStreamEvent` (tests/responses_validation.py)
- errors -> exactly `{"error": {"message", "type", "param", "code"}}`
- `/tokenize`, `/detokenize`, `/version`, `/health`, `/metrics` (Prometheus text, parsed by prometheus_client)

Fields the SDK does not declare are vLLM's extras: each one must be in `EXTRAS` for its object, with a sane type,
so a misspelt or stray field fails too. Streams are also checked as a whole: one id, `[DONE]` last, at most one
finish per choice and nothing for it afterwards, a usage-only chunk only at the end.

Validation never raises inside the transport (the SDK would turn that into a retry or a connection error): failures
are collected and `Recorder.assert_clean()` (called by the test module's fixture) fails the test with them.
"""
from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, List, Literal, Optional

import httpx
import openai
from openai.pagination import SyncPage
from openai.types import Completion, CompletionChoice, Model
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from openai.types.chat import chat_completion as chat_types
from openai.types.chat import chat_completion_chunk as chunk_types
from openai.types.responses import Response
from prometheus_client.parser import text_string_to_metric_families
from pydantic import BaseModel

from tests.responses_validation import parse_sse, validate_event, validate_response, visit_models
from tests.server_harness import ConveyorServer

# --------------------------------------------------------------------------- vLLM extras: name -> type check


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _int_list(value: Any) -> None:
    assert isinstance(value, list) and all(_is_int(item) for item in value), f"not a list of ints: {value!r}"


def _optional(check: Callable[[Any], None]) -> Callable[[Any], None]:
    def optional(value: Any) -> None:
        if value is not None:
            check(value)
    return optional


def _of_type(*types: type) -> Callable[[Any], None]:
    def check(value: Any) -> None:
        assert isinstance(value, types) and not isinstance(value, bool), \
            f"{value!r} is not {'/'.join(t.__name__ for t in types)}"
    return check


def _stop_reason(value: Any) -> None:
    """vLLM: the stop token id, the stop string (or the repetition message), or null."""
    assert value is None or _is_int(value) or isinstance(value, str), f"bad stop_reason {value!r}"


def _prompt_logprobs(value: Any) -> None:
    """vLLM: per prompt token null (the first) or {"<token id>": {logprob, rank, decoded_token}}."""
    if value is None:
        return
    assert isinstance(value, list) and value and value[0] is None, f"bad prompt_logprobs {str(value)[:200]}"
    for position in value[1:]:
        assert isinstance(position, dict) and position, f"bad prompt_logprobs position {position!r}"
        for token_id, entry in position.items():
            assert token_id.isdigit(), f"prompt_logprobs key {token_id!r} is not a token id"
            assert isinstance(entry, dict) and set(entry) == {"logprob", "rank", "decoded_token"}, entry
            assert _is_number(entry["logprob"]) and entry["logprob"] <= 0, entry
            assert _is_int(entry["rank"]) and entry["rank"] >= 1, entry
            assert isinstance(entry["decoded_token"], str), entry


def _permission(value: Any) -> None:
    assert isinstance(value, list) and all(isinstance(item, dict) and item.get("object") == "model_permission"
                                           for item in value), value


_CHOICE_EXTRAS = {"stop_reason": _stop_reason, "token_ids": _optional(_int_list)}

# Checked by exact class first, then along the MRO (the relaxed stream choice inherits CompletionChoice's).
EXTRAS: dict[type, dict[str, Callable[[Any], None]]] = {
    Model: {"root": _of_type(str), "parent": _optional(_of_type(str)), "max_model_len": _of_type(int),
            "permission": _permission},
    Completion: {"kv_transfer_params": _optional(_of_type(dict))},
    CompletionChoice: {**_CHOICE_EXTRAS, "prompt_logprobs": _prompt_logprobs,
                       "prompt_token_ids": _optional(_int_list)},
    ChatCompletion: {"prompt_logprobs": _prompt_logprobs, "prompt_token_ids": _optional(_int_list),
                     "kv_transfer_params": _optional(_of_type(dict))},
    chat_types.Choice: dict(_CHOICE_EXTRAS),
    ChatCompletionChunk: {"prompt_token_ids": _int_list},
    chunk_types.Choice: dict(_CHOICE_EXTRAS),
}


def _extras_for(model: BaseModel) -> dict[str, Callable[[Any], None]]:
    for cls in type(model).__mro__:
        if cls in EXTRAS:
            return EXTRAS[cls]
    return {}


def _check_model_extras(model: BaseModel, path: str) -> None:
    allowed = _extras_for(model)
    for name, value in (model.model_extra or {}).items():
        where = f"{path or type(model).__name__}.{name}"
        assert name in allowed, f"{where}: field unknown to the SDK and not a known vLLM extra"
        try:
            allowed[name](value)
        except AssertionError as exc:
            raise AssertionError(f"{where}: {exc}") from None


def check_extras(model: BaseModel, path: str = "") -> None:
    """Every field the SDK does not declare, anywhere in the tree, is a known vLLM extra with a sane type."""
    visit_models(model, _check_model_extras, path)


# --------------------------------------------------------------------------- per-route validators


class _StreamCompletionChoice(CompletionChoice):
    """A streamed legacy-completion choice: `finish_reason` is null until the chunk that ends the choice."""

    finish_reason: Optional[Literal["stop", "length", "content_filter"]] = None  # type: ignore[assignment]


class _CompletionChunk(Completion):
    choices: List[_StreamCompletionChoice]  # type: ignore[assignment]


def validate_error(raw: Any) -> dict[str, Any]:
    assert isinstance(raw, dict) and set(raw) == {"error"}, f"not the OpenAI error shape: {raw!r}"
    error = raw["error"]
    assert isinstance(error, dict) and set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"] and "Traceback" not in error["message"], error
    assert isinstance(error["type"], str) and error["type"], error
    assert error["param"] is None or isinstance(error["param"], str), error
    assert error["code"] is None or isinstance(error["code"], (str, int)), error
    return error


def _usage_sums(usage: Any) -> None:
    if usage is not None:
        assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens, usage


def _aligned_logprobs(choices: list[Any]) -> None:
    """Legacy logprobs: tokens, token_logprobs, top_logprobs and text_offset run in step."""
    for choice in choices:
        if choice.logprobs is not None:
            lengths = {len(getattr(choice.logprobs, name) or []) for name in
                       ("tokens", "token_logprobs", "top_logprobs", "text_offset")}
            assert len(lengths) == 1, f"choice {choice.index}: logprobs lists of different lengths"


def validate_completion(raw: dict[str, Any]) -> Completion:
    completion = Completion.model_validate(raw, strict=True)
    check_extras(completion)
    _aligned_logprobs(completion.choices)
    assert completion.id.startswith("cmpl-") and completion.usage is not None
    _usage_sums(completion.usage)
    assert sorted(choice.index for choice in completion.choices) == list(range(len(completion.choices)))
    return completion


def validate_chat_completion(raw: dict[str, Any]) -> ChatCompletion:
    chat = ChatCompletion.model_validate(raw, strict=True)
    check_extras(chat)
    assert chat.id.startswith("chatcmpl-") and chat.usage is not None
    _usage_sums(chat.usage)
    assert sorted(choice.index for choice in chat.choices) == list(range(len(chat.choices)))
    return chat


def validate_completion_chunk(raw: dict[str, Any]) -> Completion:
    chunk = _CompletionChunk.model_validate(raw, strict=True)
    check_extras(chunk)
    _aligned_logprobs(chunk.choices)
    if chunk.choices and all(choice.finish_reason is not None for choice in chunk.choices):
        Completion.model_validate(raw, strict=True)  # a finishing chunk needs no relaxation at all
    return chunk


def validate_chat_chunk(raw: dict[str, Any]) -> ChatCompletionChunk:
    chunk = ChatCompletionChunk.model_validate(raw, strict=True)
    check_extras(chunk)
    return chunk


def validate_models(raw: dict[str, Any]) -> SyncPage[Model]:
    page = SyncPage[Model].model_validate(raw, strict=True)
    assert page.object == "list" and page.data
    for model in page.data:
        check_extras(model)
    return page


def validate_model(raw: dict[str, Any]) -> Model:
    model = Model.model_validate(raw, strict=True)
    check_extras(model)
    return model


def _check_stream_shape(chunks: list[Any]) -> None:
    """One id/model/created; per choice at most one finish and nothing after it; usage-only chunk last."""
    assert chunks, "a stream without chunks"
    assert len({(chunk.id, chunk.model, chunk.created) for chunk in chunks}) == 1, "chunks disagree on id/model"
    finished: set[int] = set()
    for position, chunk in enumerate(chunks):
        if not chunk.choices:
            assert chunk.usage is not None and position == len(chunks) - 1, "a choice-less chunk must be the " \
                                                                              "final usage chunk"
        for choice in chunk.choices:
            assert choice.index not in finished, f"choice {choice.index} continued after its finish_reason"
            if choice.finish_reason is not None:
                finished.add(choice.index)
    indexes = {choice.index for chunk in chunks for choice in chunk.choices}
    assert finished == indexes, f"choices without a finish_reason: {sorted(indexes - finished)}"


def _check_chat_stream(chunks: list[ChatCompletionChunk]) -> None:
    first_seen: set[int] = set()
    calls_seen: set[tuple[int, int]] = set()
    for chunk in chunks:
        for choice in chunk.choices:
            if choice.index not in first_seen:
                first_seen.add(choice.index)
                assert choice.delta.role is not None, "the first chunk of a choice must carry the role"
            for call in choice.delta.tool_calls or []:
                if (choice.index, call.index) not in calls_seen:  # OpenAI: id, type and name come first
                    calls_seen.add((choice.index, call.index))
                    assert call.id and call.type == "function" and call.function and call.function.name, call


def _split_sse(text: str) -> list[str]:
    """`data:` payloads of a chat/completions stream; no other line kinds."""
    payloads = []
    for line in text.split("\n"):
        if not line:
            continue
        assert line.startswith("data: "), f"unexpected SSE line {line[:200]!r}"
        payloads.append(line[len("data: "):])
    return payloads


def validate_generation_stream(text: str, chat: bool, complete: bool = True) -> list[dict[str, Any]]:
    payloads = _split_sse(text)
    if complete or payloads and payloads[-1] == "[DONE]":
        assert payloads and payloads[-1] == "[DONE]", "the stream must end with data: [DONE]"
        payloads = payloads[:-1]
    assert "[DONE]" not in payloads, "[DONE] before the end"
    raws = [json.loads(payload) for payload in payloads]
    chunks = []
    for raw in raws:
        if "error" in raw:  # an error after the headers went out: the error shape, then [DONE]
            validate_error(raw)
            assert raw is raws[-1], "chunks after a stream error"
            continue
        chunks.append(validate_chat_chunk(raw) if chat else validate_completion_chunk(raw))
        expected = "chat.completion.chunk" if chat else "text_completion"
        assert raw["object"] == expected, raw["object"]
    if complete and chunks and "error" not in raws[-1]:
        _check_stream_shape(chunks)
        if chat:
            _check_chat_stream(chunks)  # type: ignore[arg-type]
    return raws


def validate_responses_stream(text: str, complete: bool = True) -> list[dict[str, Any]]:
    events = parse_sse(iter(text.split("\n")))
    assert events or not complete, "an empty Responses stream"
    for event in events:
        validate_event(event)
    if not events:
        return events
    numbers = [event["sequence_number"] for event in events]
    assert numbers == list(range(numbers[0], numbers[0] + len(numbers))), numbers
    if numbers[0] == 0:
        assert events[0]["type"] == "response.created", events[0]["type"]
    types = [event["type"] for event in events]
    if "error" in types:  # OpenAI: an error event, then response.failed
        assert types[types.index("error"):] == ["error", "response.failed"], types
    if complete:
        assert types[-1] in ("response.completed", "response.incomplete", "response.failed"), types[-1]
    return events


def validate_metrics(text: str) -> None:
    families = list(text_string_to_metric_families(text))
    assert families, "no metrics"
    for family in families:
        for sample in family.samples:
            assert isinstance(sample.value, float), sample


def validate_tokenize(raw: dict[str, Any]) -> None:
    assert set(raw) == {"count", "max_model_len", "tokens", "token_strs"}, raw
    _int_list(raw["tokens"])
    assert _is_int(raw["count"]) and raw["count"] == len(raw["tokens"]) and _is_int(raw["max_model_len"])
    strs = raw["token_strs"]
    assert strs is None or (isinstance(strs, list) and len(strs) == len(raw["tokens"])
                            and all(isinstance(item, str) for item in strs)), strs


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
