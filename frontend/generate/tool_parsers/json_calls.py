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
    stop = len(text) if stop is None else stop
    scan = ObjectScan()
    depth = 0
    in_string = escape = False
    state = "key"  # at depth 1: key | colon | value | after_value
    key: str | None = None
    key_start = value_start = 0
    value_kind = ""  # "string" | "container" | "scalar" (the current depth-1 value)
    position = start
    while position < stop:
        char = text[position]
        if in_string:
            if escape:
                escape = False
            elif char == "\\":
                escape = True
            elif char == '"':
                in_string = False
                if depth == 1 and state == "key_string":
                    try:
                        key = json.loads(text[key_start:position + 1])
                    except ValueError:
                        scan.error = True
                        break
                    state = "colon"
                elif depth == 1 and state == "value" and value_kind == "string":
                    _value_done(scan, text, key, value_start, position + 1)
                    if scan.error:
                        break
                    state = "after_value"
            position += 1
            continue
        if depth == 0:
            if char != "{":
                scan.error = True
                break
            depth = 1
        elif depth == 1 and state == "key":
            if char == '"':
                in_string, key_start, state = True, position, "key_string"
            elif char == "}":
                scan.end = position + 1
                break
            elif not char.isspace():
                scan.error = True
                break
        elif depth == 1 and state == "colon":
            if char == ":":
                state = "value_start"
            elif not char.isspace():
                scan.error = True
                break
        elif depth == 1 and state == "value_start":
            if not char.isspace():
                value_start, state = position, "value"
                if key in ARGUMENT_KEYS:
                    scan.args_start = position
                if char == '"':
                    value_kind, in_string = "string", True
                elif char in "{[":
                    value_kind, depth = "container", 2
                elif char in "}],:":
                    scan.error = True
                    break
                else:
                    value_kind = "scalar"
        elif depth == 1 and state == "value":  # a scalar (number, true, false, null)
            if char.isspace() or char in ",}":
                _value_done(scan, text, key, value_start, position)
                if scan.error:
                    break
                state = "after_value"
                continue  # read the delimiter again as after_value
        elif depth == 1 and state == "after_value":
            if char == ",":
                state = "key"
            elif char == "}":
                scan.end = position + 1
                break
            elif not char.isspace():
                scan.error = True
                break
        else:  # inside a container value
            if char == '"':
                in_string = True
            elif char in "{[":
                depth += 1
            elif char in "}]":
                depth -= 1
                if depth == 1:
                    _value_done(scan, text, key, value_start, position + 1)
                    if scan.error:
                        break
                    state = "after_value"
        position += 1
    scan.stopped_at = position
    return scan


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
        text = self.text
        while True:
            state = self._state
            if state == "start":
                first = skip_whitespace(text, self._position)
                if first == len(text):
                    if final:
                        self._fallback(0)
                        continue
                    return
                rest = text[first:]
                prefix = next((marker for marker in self.prefixes if rest.startswith(marker)), None)
                if prefix is not None:
                    self._position, self._state = first + len(prefix), "opener"
                    continue
                if not final and any(marker.startswith(rest) for marker in self.prefixes):
                    return  # may be the start of a prefix marker
                self._position, self._state = first, "opener"
            elif state == "opener":
                first = skip_whitespace(text, self._position)
                if first == len(text):
                    if final:
                        self._fallback(0)
                        continue
                    return
                if self.opener:
                    if text[first] != self.opener:
                        self._fallback(0)
                        continue
                    self._position = first + 1
                elif text[first] != "{":
                    self._fallback(0)
                    continue
                else:
                    self._position = first
                self._state = "expect_object"
            elif state == "expect_object":
                first = skip_whitespace(text, self._position)
                if first == len(text):
                    if final:
                        self._fallback(first)
                        continue
                    return
                if text[first] == "{":
                    self._call = JsonCallStream(self, first, self.require_arguments)
                    self._state = "in_object"
                elif self.closer and text[first] == self.closer and self.tools_called:
                    self._position, self._state = first + 1, "content"
                else:
                    self._fallback(first)
            elif state == "in_object":
                call = self._call
                assert call is not None
                scan = call.update()
                if scan.error or scan.end is not None or final:
                    is_call = call.close()
                    self._call = None
                    if not is_call:
                        self._fallback(call.start)
                    elif scan.error:
                        self._position, self._state = scan.stopped_at, "content"
                    elif scan.end is not None:
                        self._position, self._state = scan.end, "after_object"
                    else:
                        self._position, self._state = len(text), "content"
                    continue
                return
            elif state == "after_object":
                first = skip_whitespace(text, self._position)
                if first == len(text):
                    if final:
                        self._position, self._state = first, "content"
                        continue
                    return
                if text[first] == self.separator:
                    self._position, self._state = first + 1, "expect_object"
                elif self.closer and text[first] == self.closer:
                    self._position, self._state = first + 1, "content"
                else:
                    self._state = "content"  # from the end of the call: text after it keeps its spacing
            else:  # content
                self._content(text[self._position:])
                self._position = len(text)
                return
