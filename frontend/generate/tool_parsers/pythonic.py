"""`pythonic`: Llama 3.2 / Llama 4 / ToolACE style, a Python list of calls with keyword arguments.

    [get_weather(city="Paris", unit="celsius"), get_time()]

Values must be literals (strings, numbers, True/False/None or true/false/null, lists, dicts, tuples), read with
Python's `ast`; nothing is evaluated. Llama 4's `<|python_start|>` ... `<|python_end|>` wrapper is accepted.
Streaming sends a call's name and `{` with its first keyword argument, then one piece per further argument,
then `}`: the pieces concatenate to exactly the `json.dumps` text a non-streaming answer carries.
"""
from __future__ import annotations

import ast
import json
import re
from typing import Any

from frontend.generate.tool_parsers.base import ToolParser, _CallRecord, skip_whitespace
from frontend.generate.tool_parsers.registry import register_tool_parser

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*")
_JSON_NAMES = {"true": True, "false": False, "null": None}


class _NotLiteral(ValueError):
    pass


def literal_value(node: ast.AST) -> Any:
    """A JSON-compatible value from a literal expression; _NotLiteral otherwise."""
    if isinstance(node, ast.Constant) and isinstance(node.value, (str, int, float, bool, type(None))):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = literal_value(node.operand)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, (ast.List, ast.Tuple)):
        return [literal_value(item) for item in node.elts]
    if isinstance(node, ast.Dict):
        result: dict[str, Any] = {}
        for key, value in zip(node.keys, node.values):
            if key is None:
                raise _NotLiteral("** in a dict")
            key_value = literal_value(key)
            if not isinstance(key_value, (str, int, float, bool)) and key_value is not None:
                raise _NotLiteral("dict key")
            result[key_value if isinstance(key_value, str) else json.dumps(key_value)] = literal_value(value)
        return result
    if isinstance(node, ast.Name) and node.id in _JSON_NAMES:
        return _JSON_NAMES[node.id]
    raise _NotLiteral(ast.dump(node))


def parse_keyword_argument(source: str) -> tuple[str, Any]:
    """`key=literal` -> (key, value); _NotLiteral (or SyntaxError) otherwise."""
    expression = ast.parse(f"f({source})", mode="eval").body
    if not isinstance(expression, ast.Call) or expression.args or len(expression.keywords) != 1:
        raise _NotLiteral(source)
    keyword = expression.keywords[0]
    if keyword.arg is None:
        raise _NotLiteral(source)
    return keyword.arg, literal_value(keyword.value)


def split_arguments(text: str, start: int) -> tuple[list[tuple[int, int]], int | None]:
    """Top-level argument spans of a call whose "(" ends just before `start`, and the index of its ")" (None if
    not there yet). The last span is included only once the ")" or the next "," is seen."""
    spans: list[tuple[int, int]] = []
    depth = 0
    quote = ""
    position = segment_start = start
    while position < len(text):
        char = text[position]
        if quote:
            if char == "\\":
                position += 2
                continue
            if text.startswith(quote, position):
                position += len(quote)
                quote = ""
                continue
            position += 1
            continue
        if char in "'\"":
            # At the very end a quote may still become a triple quote; nothing completes there anyway, and the
            # next call rescans from the start.
            quote = char * 3 if text.startswith(char * 3, position) else char
            position += len(quote)
            continue
        if char in "([{":
            depth += 1
        elif char in ")]}":
            if depth == 0:
                if char != ")":
                    raise _NotLiteral("unbalanced")
                spans.append((segment_start, position))
                return spans, position
            depth -= 1
        elif char == "," and depth == 0:
            spans.append((segment_start, position))
            segment_start = position + 1
        position += 1
    return spans, None


@register_tool_parser("pythonic")
class PythonicToolParser(ToolParser):
    start_markers = ("<|python_start|>",)
    end_markers = ("<|python_end|>",)

    def __init__(self, tools: list[dict[str, Any]] | None = None) -> None:
        super().__init__(tools)
        self._call_start = 0  # index of the open call's name
        self._record: _CallRecord | None = None
        self._args_start = 0  # index after the open call's "("
        self._num_args_sent = 0

    def _advance(self, final: bool) -> None:
        steps = {"start": self._at_start, "open": self._at_open, "expect_call": self._expect_call,
                 "after_call": self._after_call, "after_list": self._after_list}
        while True:
            if self._state == "content":
                self._content(self.text[self._position:])
                self._position = len(self.text)
                return
            if self._state == "in_call":
                if not self._advance_call(final):
                    return
                continue
            first = skip_whitespace(self.text, self._position)
            if first == len(self.text):  # nothing to read yet: wait, or (final) the rest is content
                if not final:
                    return
                self._fallback(first)
            elif not steps[self._state](first, final):
                return

    # Each step reads the next non-space character (at `first`) in its state; True: go on (state or position
    # moved), False: wait for more text.

    def _at_start(self, first: int, final: bool) -> bool:
        rest = self.text[first:]
        marker = next((m for m in self.start_markers if rest.startswith(m)), None)
        if marker is not None:
            self._position, self._state = first + len(marker), "open"
        elif not final and any(m.startswith(rest) for m in self.start_markers):
            return False
        else:
            self._position, self._state = first, "open"
        return True

    def _at_open(self, first: int, final: bool) -> bool:
        if self.text[first] != "[":
            self._fallback(0)
        else:
            self._position, self._state = first + 1, "expect_call"
        return True

    def _expect_call(self, first: int, final: bool) -> bool:
        text = self.text
        match = _NAME.match(text, first)
        if match is None:
            self._fallback(first)
            return True
        after = skip_whitespace(text, match.end())
        if after == len(text):
            if final:
                self._fallback(first)
            return final
        if text[after] != "(":
            self._fallback(first)
            return True
        self._call_start, self._args_start, self._num_args_sent = first, after + 1, 0
        self._record = self._call_open()
        self._record.name = match.group(0)
        self._state = "in_call"
        return True

    def _after_call(self, first: int, final: bool) -> bool:
        if self.text[first] == ",":
            self._position, self._state = first + 1, "expect_call"
        elif self.text[first] == "]":
            self._position, self._state = first + 1, "after_list"
        else:
            self._fallback(first)
        return True

    def _after_list(self, first: int, final: bool) -> bool:
        rest = self.text[first:]
        marker = next((m for m in self.end_markers if rest.startswith(m)), None)
        if marker is not None:
            self._position = first + len(marker)
        elif not final and any(m.startswith(rest) for m in self.end_markers):
            return False
        self._state = "content"
        return True

    def _advance_call(self, final: bool) -> bool:
        """Send the open call's completed arguments; True once the call is over (state changed)."""
        record = self._record
        assert record is not None and record.name is not None
        text = self.text
        try:
            spans, close = split_arguments(text, self._args_start)
        except _NotLiteral:
            self._end_call(None)
            return True
        for start, end in spans[self._num_args_sent:]:
            source = text[start:end]
            self._num_args_sent += 1
            if not source.strip() and end == close and self._num_args_sent > 1:
                continue  # a trailing comma: f(a=1, )
            if not source.strip() and end == close:
                break  # f()
            try:
                key, value = parse_keyword_argument(source)
            except (_NotLiteral, SyntaxError, ValueError, RecursionError):
                self._end_call(close)
                return True
            piece = json.dumps(key, ensure_ascii=False) + ": " + json.dumps(value, ensure_ascii=False)
            if not record.name_sent:
                self._call_name(record, record.name)
                self._call_arguments(record, "{" + piece)
            else:
                self._call_arguments(record, ", " + piece)
        if close is not None:
            if not record.name_sent:
                self._call_name(record, record.name)
                self._call_arguments(record, "{}")
            else:
                self._call_arguments(record, "}")
            self._position, self._state, self._record = close + 1, "after_call", None
            return True
        if final:
            self._end_call(None)
            return True
        return False

    def _end_call(self, close: int | None) -> None:
        """The open call is not a valid call. Once some of it was sent it stays a call (closed here) and parsing
        goes on after its ")" (`close`), else its text is content."""
        record = self._record
        assert record is not None
        self._record = None
        if record.name_sent:
            self._call_arguments(record, "}")
            if close is not None:
                self._position, self._state = close + 1, "after_call"
            else:
                self._state, self._position = "content", len(self.text)
        else:
            self._call_drop(record)
            self._fallback(self._call_start)
