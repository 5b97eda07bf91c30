"""Strict checks of Responses API JSON against the official `openai.types.responses` models.

`strict=True` pydantic validation (no coercion) plus: no field the SDK does not know, anywhere in the tree, except
`store` on the response (OpenAI's API sends it; this SDK version does not declare it).
"""
from __future__ import annotations

import json
from typing import Any, Callable, Iterator

from openai.types.responses import Response, ResponseStreamEvent
from pydantic import BaseModel, TypeAdapter

_EVENT = TypeAdapter(ResponseStreamEvent)
_ALLOWED_EXTRA = {Response: {"store"}}

# OpenAI's order for one text message: created, in_progress, item added, part added, deltas, text done,
# part done, item done, then completed | incomplete.
HEAD_EVENTS = ["response.created", "response.in_progress", "response.output_item.added",
               "response.content_part.added"]
TAIL_EVENTS = ["response.output_text.done", "response.content_part.done", "response.output_item.done"]


def visit_models(model: BaseModel, check: Callable[[BaseModel, str], None], path: str = "") -> None:
    """Call `check(model, path)` on `model` and every pydantic model nested in it (lists and dicts included)."""
    check(model, path)
    for name in type(model).model_fields:
        _visit(getattr(model, name), check, f"{path or type(model).__name__}.{name}")


def _visit(value: Any, check: Callable[[BaseModel, str], None], path: str) -> None:
    if isinstance(value, BaseModel):
        visit_models(value, check, path)
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _visit(item, check, f"{path}[{index}]")
    elif isinstance(value, dict):
        for key, item in value.items():
            _visit(item, check, f"{path}.{key}")


def _known_fields_only(model: BaseModel, path: str) -> None:
    extra = set(model.model_extra or {}) - _ALLOWED_EXTRA.get(type(model), set())
    assert not extra, f"{path or type(model).__name__}: fields unknown to the SDK: {sorted(extra)}"


def _no_unknown_fields(model: BaseModel) -> None:
    visit_models(model, _known_fields_only)


def validate_response(raw: dict[str, Any]) -> Response:
    response = Response.model_validate(raw, strict=True)
    _no_unknown_fields(response)
    assert raw["object"] == "response" and raw["id"].startswith("resp_")
    return response


def validate_event(raw: dict[str, Any]) -> Any:
    event = _EVENT.validate_python(raw, strict=True)
    _no_unknown_fields(event)
    return event


def parse_sse(lines: Iterator[str]) -> list[dict[str, Any]]:
    """Raw SSE lines -> event dicts; checks every `event:` line names the `type` of its `data:` line."""
    events: list[dict[str, Any]] = []
    name: str | None = None
    for line in lines:
        if line.startswith("event: "):
            name = line[len("event: "):]
        elif line.startswith("data: "):
            data = json.loads(line[len("data: "):])
            assert name == data["type"], (name, data["type"])
            events.append(data)
            name = None
        else:
            assert line == "", line
    return events


def check_event_sequence(events: list[dict[str, Any]], final: str = "response.completed") -> str:
    """Validates every event and the whole order; returns the streamed text."""
    for event in events:
        validate_event(event)
    types = [event["type"] for event in events]
    assert [event["sequence_number"] for event in events] == list(range(len(events)))
    assert types[:4] == HEAD_EVENTS, types
    assert types[-4:] == TAIL_EVENTS + [final], types
    assert all(kind == "response.output_text.delta" for kind in types[4:-4]), types
    text = "".join(event["delta"] for event in events[4:-4])
    item_id = events[2]["item"]["id"]
    assert all(event["item_id"] == item_id for event in events[3:-2])
    assert events[-4]["text"] == text and events[-3]["part"]["text"] == text
    assert events[-2]["item"]["content"][0]["text"] == text
    response = validate_response(events[-1]["response"])
    assert response.output_text == text and response.output[0].id == item_id
    assert events[0]["response"]["status"] in ("in_progress", "queued")
    assert events[1]["response"]["status"] == "in_progress"
    return text
