"""Tool calls written as JSON objects ({"name": ..., "arguments": {...}}), read while they are still growing.

`scan_object` reads one top-level object from a prefix of the text: the name once its string is complete, where
the arguments value starts and (once known) ends, and where the object ends. `JsonCallStream` streams one such
call: the name as soon as it is known, then the arguments' raw text as it grows (the concatenated pieces are the
model's own JSON; the non-streaming answer carries it re-serialized by `json.dumps`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from frontend.generate.tool_parsers.base import ToolOutputProcessor, _CallRecord, skip_whitespace

NAME_KEYS = ("name",)
ARGUMENT_KEYS = ("arguments", "parameters")


@dataclass
class ObjectScan:
    name: str | None = None  # the "name" member's value, once its string is complete
    args_start: int | None = None  # index of the arguments value's first character
    args_end: int | None = None  # index after its last character, once complete
    end: int | None = None  # index after the object's closing brace
    error: bool = False  # not a JSON object (or a "name" that is not a string)
    stopped_at: int = 0  # where scanning stopped


def scan_object(text: str, start: int, stop: int | None = None) -> ObjectScan:
    """Scan the object starting at `text[start] == "{"`, looking no further than `stop`."""
    return _ObjectScanner(text, start, len(text) if stop is None else stop).run()


class _ObjectScanner:
    """One pass of `scan_object`, a character at a time. At depth 1 (the call object's own members) the state is
    key -> colon -> value_start -> value -> after_value -> key ...; strings and nested containers are skipped
    over, noting only where the "name" and "arguments" values start and end."""

    def __init__(self, text: str, start: int, stop: int) -> None:
        self.text, self.position, self.stop = text, start, stop
        self.scan = ObjectScan()
        self.depth = 0
        self.in_string = self.escape = False
        self.state = "key"  # at depth 1: key | key_string | colon | value_start | value | after_value
        self.key: str | None = None
        self.key_start = self.value_start = 0
        self.value_kind = ""  # "string" | "container" | "scalar" (the current depth-1 value)
        self.finished = False  # stop here: the object ended or is not one
        self.reread = False  # read the current character again (in the new state)
        self.member_steps = {"key": self._at_key, "colon": self._at_colon, "value_start": self._at_value_start,
                             "value": self._in_scalar, "after_value": self._after_value}

    def run(self) -> ObjectScan:
        while self.position < self.stop:
            char = self.text[self.position]
            if self.in_string:
                self._string_char(char)
            elif self.depth == 0:
                self._open(char)
            elif self.depth == 1:
                self.member_steps[self.state](char)
            else:
                self._container_char(char)
            if self.finished:
                break
            if self.reread:
                self.reread = False
                continue
            self.position += 1
        self.scan.stopped_at = self.position
        return self.scan

    def _fail(self) -> None:
        self.scan.error = self.finished = True

    def _end_object(self) -> None:
        self.scan.end = self.position + 1
        self.finished = True

    def _value_done(self, end: int) -> None:
        _value_done(self.scan, self.text, self.key, self.value_start, end)
        if self.scan.error:
            self.finished = True
        else:
            self.state = "after_value"

    def _string_char(self, char: str) -> None:
        if self.escape:
            self.escape = False
        elif char == "\\":
            self.escape = True
        elif char == '"':
            self.in_string = False
            if self.depth == 1 and self.state == "key_string":
                try:
                    self.key = json.loads(self.text[self.key_start:self.position + 1])
                except ValueError:
                    self._fail()
                    return
                self.state = "colon"
            elif self.depth == 1 and self.state == "value" and self.value_kind == "string":
                self._value_done(self.position + 1)

    def _open(self, char: str) -> None:
        if char != "{":
            self._fail()
        else:
            self.depth = 1

    def _at_key(self, char: str) -> None:
        if char == '"':
            self.in_string, self.key_start, self.state = True, self.position, "key_string"
        elif char == "}":
            self._end_object()
        elif not char.isspace():
            self._fail()

    def _at_colon(self, char: str) -> None:
        if char == ":":
            self.state = "value_start"
        elif not char.isspace():
            self._fail()

    def _at_value_start(self, char: str) -> None:
        if char.isspace():
            return
        self.value_start, self.state = self.position, "value"
        if self.key in ARGUMENT_KEYS:
            self.scan.args_start = self.position
        if char == '"':
            self.value_kind, self.in_string = "string", True
        elif char in "{[":
            self.value_kind, self.depth = "container", 2
        elif char in "}],:":
            self._fail()
        else:
            self.value_kind = "scalar"

    def _in_scalar(self, char: str) -> None:
        """A number, true, false or null: it ends at the first space, comma or closing brace."""
        if char.isspace() or char in ",}":
            self._value_done(self.position)
            self.reread = not self.finished  # the delimiter is read again as after_value

    def _after_value(self, char: str) -> None:
        if char == ",":
            self.state = "key"
        elif char == "}":
            self._end_object()
        elif not char.isspace():
            self._fail()

    def _container_char(self, char: str) -> None:
        if char == '"':
            self.in_string = True
        elif char in "{[":
            self.depth += 1
        elif char in "}]":
            self.depth -= 1
            if self.depth == 1:
                self._value_done(self.position + 1)


def _value_done(scan: ObjectScan, text: str, key: str | None, start: int, end: int) -> None:
    if key in ARGUMENT_KEYS:
        scan.args_end = end
    elif key in NAME_KEYS:
        try:
            name = json.loads(text[start:end])
        except ValueError:
            name = None
        if isinstance(name, str) and name:
            scan.name = name
        else:
            scan.error = True


class JsonCallStream:
    """One JSON call object being streamed by `processor`."""

    def __init__(self, processor: ToolOutputProcessor, start: int, require_arguments: bool) -> None:
        self.processor = processor
        self.start = start  # index of "{" in processor.text
        self.require_arguments = require_arguments
        self.record: _CallRecord = processor._call_open()
        self._args_sent = 0
        self.scan = ObjectScan()

    @property
    def named(self) -> bool:
        return self.record.name_sent

    def update(self, stop: int | None = None) -> ObjectScan:
        """Rescan up to `stop` and send what became known; returns the scan."""
        text = self.processor.text
        scan = self.scan = scan_object(text, self.start, stop)
        if scan.error or scan.name is None:
            return scan
        if self.require_arguments and scan.args_start is None and not self.named:
            return scan  # {"name": ...} alone is not a call yet (it may be an ordinary JSON answer)
        self.processor._call_name(self.record, scan.name)
        if scan.args_start is not None:
            if text[scan.args_start] == '"':  # arguments given as a JSON string: send it decoded, once complete
                if scan.args_end is not None and self._args_sent == 0:
                    self.processor._call_arguments(self.record, _decoded(text[scan.args_start:scan.args_end]))
                    self._args_sent = scan.args_end - scan.args_start
                return scan
            end = scan.args_end if scan.args_end is not None else (len(text) if stop is None else stop)
            piece = text[scan.args_start + self._args_sent:end]
            self._args_sent += len(piece)
            self.processor._call_arguments(self.record, piece)
        return scan

    def close(self) -> bool:
        """The call's text is over. True if it was a call (it was named); a call without arguments gets {}."""
        if not self.named:
            scan = self.scan
            if scan.end is not None and scan.name is not None and not self.require_arguments and not scan.error:
                self.processor._call_name(self.record, scan.name)
            else:
                self.processor._call_drop(self.record)
                return False
        if self.scan.args_start is None and not self.record.arguments:
            self.processor._call_arguments(self.record, "{}")
        return True


def _decoded(literal: str) -> str:
    try:
        value = json.loads(literal)
    except ValueError:
        return literal
    return value if isinstance(value, str) else literal


class JsonCallSequence(ToolOutputProcessor):
    """Calls as a run of JSON objects: `[prefix] [opener] {call} separator {call} ... [closer]`, then content.

    Output that does not start that way is plain content; so is a first object that is not a call.
    """

    prefixes: tuple[str, ...] = ()  # optional markers before the calls (e.g. <|python_tag|>)
    opener = ""  # e.g. "[" (empty: the first call's "{" opens the run)
    separator = ";"
    closer = ""  # e.g. "]" (empty: the run ends at the first text that is not a separator)
    require_arguments = True

    def __init__(self) -> None:
        super().__init__()
        self._call: JsonCallStream | None = None

    def _advance(self, final: bool) -> None:
        steps = {"start": self._at_start, "opener": self._at_opener, "expect_object": self._expect_object,
                 "in_object": self._in_object, "after_object": self._after_object}
        while steps.get(self._state, self._rest_is_content)(final):
            pass

    # Each step reads from self._position in its state; True: go on (state or position moved), False: wait for
    # more text.

    def _next_char(self) -> int | None:
        """Index of the next non-space character; None at the end of the text (so far)."""
        first = skip_whitespace(self.text, self._position)
        return first if first < len(self.text) else None

    def _at_start(self, final: bool) -> bool:
        first = self._next_char()
        if first is None:
            if final:
                self._fallback(0)
            return final
        rest = self.text[first:]
        prefix = next((marker for marker in self.prefixes if rest.startswith(marker)), None)
        if prefix is not None:
            self._position, self._state = first + len(prefix), "opener"
            return True
        if not final and any(marker.startswith(rest) for marker in self.prefixes):
            return False  # may be the start of a prefix marker
        self._position, self._state = first, "opener"
        return True

    def _at_opener(self, final: bool) -> bool:
        first = self._next_char()
        if first is None:
            if final:
                self._fallback(0)
            return final
        if self.opener:
            if self.text[first] != self.opener:
                self._fallback(0)
                return True
            self._position = first + 1
        elif self.text[first] != "{":
            self._fallback(0)
            return True
        else:
            self._position = first
        self._state = "expect_object"
        return True

    def _expect_object(self, final: bool) -> bool:
        first = self._next_char()
        if first is None:
            if final:
                self._fallback(len(self.text))
            return final
        if self.text[first] == "{":
            self._call = JsonCallStream(self, first, self.require_arguments)
            self._state = "in_object"
        elif self.closer and self.text[first] == self.closer and self.tools_called:
            self._position, self._state = first + 1, "content"
        else:
            self._fallback(first)
        return True

    def _in_object(self, final: bool) -> bool:
        call = self._call
        assert call is not None
        scan = call.update()
        if not (scan.error or scan.end is not None or final):
            return False
        is_call = call.close()
        self._call = None
        if not is_call:
            self._fallback(call.start)
        elif scan.error:
            self._position, self._state = scan.stopped_at, "content"
        elif scan.end is not None:
            self._position, self._state = scan.end, "after_object"
        else:
            self._position, self._state = len(self.text), "content"
        return True

    def _after_object(self, final: bool) -> bool:
        first = self._next_char()
        if first is None:
            if final:
                self._position, self._state = len(self.text), "content"
            return final
        if self.text[first] == self.separator:
            self._position, self._state = first + 1, "expect_object"
        elif self.closer and self.text[first] == self.closer:
            self._position, self._state = first + 1, "content"
        else:
            self._state = "content"  # from the end of the call: text after it keeps its spacing
        return True

    def _rest_is_content(self, final: bool) -> bool:
        self._content(self.text[self._position:])
        self._position = len(self.text)
        return False
