"""One response being generated (`ResponseRun`) and the output items and typed stream events it produces
(`OutputWriter`): a message item from text deltas, function_call items from a tool parser's calls."""
from __future__ import annotations

import copy
import itertools
import json
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterator

from frontend.generate.choices import Choice
from frontend.generate.responses.protocol import ResponsesRequest
from frontend.generate.responses.store import ResponseObject
from frontend.generate.tool_calling import ToolPlan
from frontend.generate.tool_parsers import DeltaToolCall, make_tool_call_id


def sse(event: dict[str, Any]) -> str:
    return f"event: {event['type']}\ndata: {json.dumps(event, ensure_ascii=False, separators=(',', ':'))}\n\n"


@dataclass
class ResponseRun:
    """One response being generated: the engine request, the object it fills and its event numbering."""

    request: ResponsesRequest
    response: ResponseObject
    choice: Choice
    conversation: list[dict[str, Any]]  # history + this input, without instructions (what a successor continues)
    call_names: dict[str, str]
    store: bool
    tools: ToolPlan
    stream_interval: int = 1  # vLLM's stream_interval: tokens per text delta at most every N
    sequence: Iterator[int] = field(default_factory=itertools.count)

    def event(self, kind: str, **fields: Any) -> dict[str, Any]:
        return {"type": kind, "sequence_number": next(self.sequence), **fields}


def usage(choice: Choice) -> dict[str, Any]:
    input_tokens, output_tokens = len(choice.prompt_token_ids), len(choice.state.token_ids)
    return {"input_tokens": input_tokens,
            "input_tokens_details": {"cached_tokens": choice.state.num_cached_tokens, "cache_write_tokens": 0},
            "output_tokens": output_tokens, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": input_tokens + output_tokens}


def event_logprobs(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The text events' shape of output_text logprob entries: no bytes."""
    return [{"token": entry["token"], "logprob": entry["logprob"],
             "top_logprobs": [{"token": top["token"], "logprob": top["logprob"]} for top in entry["top_logprobs"]]}
            for entry in entries]


class OutputWriter:
    """Builds `response.output` item by item and answers the events each step adds: a message (text) item,
    function_call items (from a tool parser); the open item closes when another kind starts or at the end."""

    def __init__(self, run: ResponseRun) -> None:
        self.run = run
        self.output = run.response.output
        self.current: dict[str, Any] | None = None  # the open item
        self.call_items: dict[int, dict[str, Any]] = {}  # parser call index -> its function_call item
        self.indexes: dict[str, int] = {}  # item id -> output_index

    def _open(self, item: dict[str, Any]) -> dict[str, Any]:
        self.output.append(item)
        self.indexes[item["id"]] = len(self.output) - 1
        self.current = item
        return self.run.event("response.output_item.added", output_index=self.indexes[item["id"]],
                              item=copy.deepcopy(item))

    def _where(self, item: dict[str, Any]) -> dict[str, Any]:
        return {"item_id": item["id"], "output_index": self.indexes[item["id"]], "content_index": 0}

    def content(self, text: str, logprobs: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        if self.current is None or self.current["type"] != "message":
            if not text and self.current is not None:
                return events
            events += self._close()
            part: dict[str, Any] = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
            message: dict[str, Any] = {"id": f"msg_{uuid.uuid4().hex}", "type": "message", "role": "assistant",
                                       "status": "in_progress", "content": []}
            events.append(self._open(message))
            message["content"].append(part)
            events.append(self.run.event("response.content_part.added", **self._where(message),
                                         part=copy.deepcopy(part)))
        if text:
            assert self.current is not None
            part = self.current["content"][0]
            part["text"] += text
            part["logprobs"] += logprobs or []
            events.append(self.run.event("response.output_text.delta", **self._where(self.current), delta=text,
                                         logprobs=event_logprobs(logprobs or [])))
        return events

    def calls(self, pieces: list[DeltaToolCall]) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        for piece in pieces:
            item = self.call_items.get(piece.index)
            if item is None:
                events += self._close()
                item = {"id": f"fc_{uuid.uuid4().hex}", "type": "function_call",
                        "call_id": piece.id or make_tool_call_id(), "name": piece.name or "", "arguments": "",
                        "status": "in_progress"}
                self.call_items[piece.index] = item
                events.append(self._open(item))
            if piece.arguments:
                item["arguments"] += piece.arguments
                events.append(self.run.event("response.function_call_arguments.delta", item_id=item["id"],
                                             output_index=self.indexes[item["id"]], delta=piece.arguments))
        return events

    def _close(self, status: str = "completed") -> list[dict[str, Any]]:
        item, self.current = self.current, None
        if item is None:
            return []
        item["status"] = status
        events: list[dict[str, Any]] = []
        if item["type"] == "message":
            part = item["content"][0]
            events.append(self.run.event("response.output_text.done", **self._where(item), text=part["text"],
                                         logprobs=event_logprobs(part["logprobs"])))
            events.append(self.run.event("response.content_part.done", **self._where(item),
                                         part=copy.deepcopy(part)))
        else:
            events.append(self.run.event("response.function_call_arguments.done", item_id=item["id"],
                                         output_index=self.indexes[item["id"]], arguments=item["arguments"]))
        events.append(self.run.event("response.output_item.done", output_index=self.indexes[item["id"]],
                                     item=copy.deepcopy(item)))
        return events

    def close(self, incomplete: bool) -> list[dict[str, Any]]:
        """The end: an empty message when nothing came out; the last item is incomplete at the length limit."""
        events = self.content("") if not self.output else []
        return events + self._close("incomplete" if incomplete else "completed")


def close_items(response: ResponseObject) -> None:
    for item in response.output:
        if item.get("status") == "in_progress":
            item["status"] = "incomplete"
