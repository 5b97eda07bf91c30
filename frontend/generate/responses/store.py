"""The Responses API's in-memory store: responses for GET / cancel / previous_response_id, per frontend process.

Off by default, as in vLLM: `VLLM_ENABLE_RESPONSES_API_STORE=1` (read when the frontend starts) turns it on.
Each frontend process has its own store (with `--api-server-count N` or several frontend hosts, a GET must reach
the process that answered the POST). It is bounded: least recently used responses beyond `capacity` are dropped
(never one that is still running).
"""
from __future__ import annotations

import asyncio
import copy
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

STORE_ENV = "VLLM_ENABLE_RESPONSES_API_STORE"
DEFAULT_CAPACITY = 1000
ACTIVE_STATUSES = ("queued", "in_progress")


def store_enabled_from_env() -> bool:
    return os.environ.get(STORE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


@dataclass
class ResponseObject:
    """The mutable state of one response; `to_dict()` is the OpenAI `Response` JSON."""

    header: dict[str, Any]  # id, created_at, model and the echoed request fields
    status: str = "in_progress"
    output: list[dict[str, Any]] = field(default_factory=list)
    usage: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    incomplete_details: dict[str, Any] | None = None
    completed_at: int | None = None

    @property
    def id(self) -> str:
        return str(self.header["id"])

    def to_dict(self) -> dict[str, Any]:
        body = {**self.header, "status": self.status, "output": copy.deepcopy(self.output), "usage": self.usage,
                "error": self.error, "incomplete_details": self.incomplete_details}
        if self.completed_at is not None:
            body["completed_at"] = self.completed_at
        return body


@dataclass
class StoredResponse:
    response: ResponseObject
    messages: list[dict[str, Any]]  # the conversation it answered (without instructions), for continuation
    call_names: dict[str, str] = field(default_factory=dict)  # call_id -> function name, for tool outputs
    task: asyncio.Task[None] | None = None  # background generation
    events: list[dict[str, Any]] | None = None  # a background stream's events, for GET ?stream=true
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    finished: bool = False

    @property
    def active(self) -> bool:
        return not self.finished

    def notify(self) -> None:
        self.changed.set()


class ResponseStore:
    def __init__(self, enabled: bool, capacity: int = DEFAULT_CAPACITY) -> None:
        self.enabled = enabled
        self.capacity = capacity
        self._entries: OrderedDict[str, StoredResponse] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, response_id: str) -> StoredResponse | None:
        entry = self._entries.get(response_id)
        if entry is not None:
            self._entries.move_to_end(response_id)
        return entry

    def put(self, entry: StoredResponse) -> None:
        if not self.enabled:
            return
        self._entries[entry.response.id] = entry
        self._entries.move_to_end(entry.response.id)
        if len(self._entries) > self.capacity:
            for key in [key for key, stored in self._entries.items() if not stored.active]:
                if len(self._entries) <= self.capacity:
                    break
                del self._entries[key]

    def delete(self, response_id: str) -> StoredResponse | None:
        return self._entries.pop(response_id, None)
