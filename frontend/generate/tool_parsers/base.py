"""What every tool-call parser shares: result types, call ids, and the bookkeeping of a streamed answer.

A parser is fed the generated text delta by delta (`feed`, then `finish` once at the end) and answers with
what may be shown so far: content text, and tool-call deltas shaped like OpenAI's `delta.tool_calls[i]` (the
first delta of a call carries its id, type and function name; later ones carry `function.arguments` pieces).
The non-streaming result (`extract`) is the same machine run over the whole text at once, so a streamed answer
and a complete one always agree.

Content rules, shared by all formats: text before the first call is content as it arrives; after a call,
whitespace between or after calls is dropped, other text is content. A block that turns out not to be a call
(bad JSON, no name) is content, verbatim.
"""
from __future__ import annotations

import json
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar


def make_tool_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class ToolCall:
    """One complete call: `arguments` is JSON text (an object)."""

    id: str
    name: str
    arguments: str

    def to_openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class DeltaToolCall:
    """A piece of call `index`: id and name only in the call's first piece."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""

    def to_openai(self) -> dict[str, Any]:
        function: dict[str, Any] = {"arguments": self.arguments}
        if self.name is not None:
            function = {"name": self.name, "arguments": self.arguments}
        piece: dict[str, Any] = {"index": self.index}
        if self.id is not None:
            piece.update(id=self.id, type="function")
        piece["function"] = function
        return piece


@dataclass
class StreamDelta:
    """What one `feed`/`finish` adds: content text and call pieces (at most one piece per call index)."""

    content: str = ""
    tool_calls: list[DeltaToolCall] = field(default_factory=list)

    def merge(self, other: StreamDelta) -> StreamDelta:
        self.content += other.content
        for piece in other.tool_calls:
            self.add_call_piece(piece)
        return self

    def add_call_piece(self, piece: DeltaToolCall) -> None:
        for existing in self.tool_calls:
            if existing.index == piece.index:
                existing.id = existing.id or piece.id
                existing.name = existing.name if existing.name is not None else piece.name
                existing.arguments += piece.arguments
                return
        self.tool_calls.append(DeltaToolCall(piece.index, piece.id, piece.name, piece.arguments))

    def __bool__(self) -> bool:
        return bool(self.content or self.tool_calls)


@dataclass
class ExtractedToolCalls:
    """A whole answer: `content` is None when empty (as OpenAI sends it beside tool calls)."""

    content: str | None
    tool_calls: list[ToolCall]

    @property
    def tools_called(self) -> bool:
        return bool(self.tool_calls)


def normalize_arguments(raw: str) -> str:
    """Arguments JSON as `json.dumps` writes it (what a non-streaming answer carries); raw text if it is not JSON.
    A JSON string holding the arguments (some models quote them) is unwrapped."""
    try:
        value = json.loads(raw)
    except ValueError:
        return raw
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False)


class ToolOutputProcessor(ABC):
    """Turns one choice's generated text into content + tool calls, incrementally."""

    def __init__(self) -> None:
        self.text = ""  # everything fed so far
        self._out = StreamDelta()  # what the current feed/finish produces
        self._calls: list[_CallRecord] = []
        self._pending_ws = ""  # whitespace after a call, dropped unless other content follows
        self._finished = False
        self._state = "start"  # the subclass's scanner state; "content" once the rest is plain text
        self._position = 0  # index into `text` the scanner has decided up to

    # ------------------------------------------------------------------ public

    @property
    def tools_called(self) -> bool:
        return any(call.name_sent for call in self._calls)

    def feed(self, delta_text: str) -> StreamDelta:
        self.text += delta_text
        return self._run(final=False)

    def finish(self) -> StreamDelta:
        """The generation ended: release held text, close open calls."""
        if self._finished:
            return StreamDelta()
        self._finished = True
        return self._run(final=True)

    def extract(self, text: str) -> ExtractedToolCalls:
        """Parse a complete answer (the processor must be fresh)."""
        result = self.feed(text).merge(self.finish())
        calls = [ToolCall(call.id, call.name or "", self._final_arguments(call)) for call in self._calls
                 if call.name_sent]
        return ExtractedToolCalls(result.content or None, calls)

    # ------------------------------------------------------------------ for subclasses

    @abstractmethod
    def _advance(self, final: bool) -> None:
        """Consume as much of `self.text` as can be decided, through `_content` and `_call_*`."""

    def _final_arguments(self, call: _CallRecord) -> str:
        return normalize_arguments(call.arguments)

    def _fallback(self, start: int) -> None:
        """The rest is content: from the beginning if no call was made yet (nothing was shown), else from `start`."""
        self._state = "content"
        self._position = start if self.tools_called else 0

    def _content(self, text: str) -> None:
        if not text:
            return
        if not self.tools_called:
            self._out.content += text
        elif not text.strip():
            self._pending_ws += text
        else:
            self._out.content += self._pending_ws + text
            self._pending_ws = ""

    def _call_open(self) -> _CallRecord:
        """A new (possible) call; nothing is sent until `_call_name`."""
        self._pending_ws = ""
        record = _CallRecord(index=sum(1 for call in self._calls if call.name_sent))
        self._calls.append(record)
        return record

    def _call_name(self, record: _CallRecord, name: str) -> None:
        if record.name_sent:
            return
        record.index = sum(1 for call in self._calls if call.name_sent)
        record.name, record.name_sent = name, True
        self._pending_ws = ""
        self._out.add_call_piece(DeltaToolCall(record.index, record.id, name, ""))

    def _call_arguments(self, record: _CallRecord, text: str) -> None:
        """Append argument text (the record must have been named)."""
        if text:
            record.arguments += text
            self._out.add_call_piece(DeltaToolCall(record.index, arguments=text))

    def _call_drop(self, record: _CallRecord) -> None:
        """A possible call that was not one (never named)."""
        if not record.name_sent and record in self._calls:
            self._calls.remove(record)

    def _run(self, final: bool) -> StreamDelta:
        self._out = StreamDelta()
        self._advance(final)
        if final:
            self._pending_ws = ""
        return self._out


@dataclass
class _CallRecord:
    index: int
    id: str = field(default_factory=make_tool_call_id)
    name: str | None = None
    name_sent: bool = False
    arguments: str = ""


class ToolParser(ToolOutputProcessor):
    """A model's tool-call syntax (`--tool-call-parser NAME`), one instance per choice."""

    name: ClassVar[str]
    # Tool-call markers are special tokens in some tokenizers: keep them in the text while parsing.
    keep_special_tokens: ClassVar[bool] = True

    def __init__(self, tools: list[dict[str, Any]] | None = None) -> None:
        super().__init__()
        self.tools = tools or []


def partial_suffix(text: str, start: int, marker: str) -> int:
    """Length of the longest end of `text[start:]` that is a proper prefix of `marker` (held back: it may be
    the beginning of the marker)."""
    longest = min(len(marker) - 1, len(text) - start)
    for size in range(longest, 0, -1):
        if marker.startswith(text[len(text) - size:]):
            return size
    return 0


def skip_whitespace(text: str, position: int) -> int:
    while position < len(text) and text[position].isspace():
        position += 1
    return position
