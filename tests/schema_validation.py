"""Strict OpenAI-conformance checks of one raw body or stream, route by route, against the official `openai` types.

Each validator runs `model_validate(raw, strict=True)` with the route's `openai.types` class: no required field
missing, no wrong type, no coercion.

- `/v1/models` -> `SyncPage[Model]`, `/v1/models/{id}` -> `Model`
- `/v1/completions` -> `Completion`; each SSE chunk -> `Completion` with one relaxation: `finish_reason` may be null
  on a chunk that does not end its choice (OpenAI's own stream sends `"finish_reason": null` there, and the SDK
  reads chunks into this same type without validating), a chunk that ends a choice validates against the unmodified
  `Completion`
- `/v1/chat/completions` -> `ChatCompletion`; each SSE chunk -> `ChatCompletionChunk`
- `/v1/responses` SSE events -> `ResponseStreamEvent` (tests/responses_validation.py)
- errors -> exactly `{"error": {"message", "type", "param", "code"}}`
- `/tokenize`, `/metrics` (Prometheus text, parsed by prometheus_client)

Fields the SDK does not declare are vLLM's extras: each one must be in `EXTRAS` for its object, with a sane type,
so a misspelt or stray field fails too. Streams are also checked as a whole: one id, `[DONE]` last, at most one
finish per choice and nothing for it afterwards, a usage-only chunk only at the end.

`tests/conformance_validation.Recorder` runs these on every body a test receives.
"""
from __future__ import annotations

import json
from typing import Any, Callable, List, Literal, Optional

from openai.pagination import SyncPage
from openai.types import Completion, CompletionChoice, Model
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from openai.types.chat import chat_completion as chat_types
from openai.types.chat import chat_completion_chunk as chunk_types
from prometheus_client.parser import text_string_to_metric_families
from pydantic import BaseModel

from tests.responses_validation import parse_sse, validate_event, visit_models

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
    assert raw.get("system_fingerprint", "") is not None, raw  # a string when present (OpenAI's spec)
    completion = Completion.model_validate(raw, strict=True)
    check_extras(completion)
    _aligned_logprobs(completion.choices)
    assert completion.id.startswith("cmpl-") and completion.usage is not None
    _usage_sums(completion.usage)
    assert sorted(choice.index for choice in completion.choices) == list(range(len(completion.choices)))
    return completion


def validate_chat_completion(raw: dict[str, Any]) -> ChatCompletion:
    # OpenAI's published spec, stricter than the SDK's types: a message always carries `refusal` (null here), and
    # `system_fingerprint` is a string when present, never null
    assert all("refusal" in choice["message"] for choice in raw["choices"]), raw
    assert raw.get("system_fingerprint", "") is not None, raw
    chat = ChatCompletion.model_validate(raw, strict=True)
    check_extras(chat)
    assert chat.id.startswith("chatcmpl-") and chat.usage is not None
    _usage_sums(chat.usage)
    assert sorted(choice.index for choice in chat.choices) == list(range(len(chat.choices)))
    return chat


def validate_completion_chunk(raw: dict[str, Any]) -> Completion:
    assert raw.get("system_fingerprint", "") is not None, raw
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
