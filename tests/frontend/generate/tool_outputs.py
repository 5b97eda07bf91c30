"""What each model family writes for the same two tool calls, and how the tool-calling tests read calls back: from
an HTTP answer (`call_values`), or from a tool parser fed the output whole (`extract`) or in random pieces
(`feed_in_pieces`, `check_streaming_matches_the_whole_output`).
"""
from __future__ import annotations

import json
import random
from typing import Any

from frontend.generate.tool_parsers import ToolOutputProcessor, get_tool_parser

CALLS = [("get_weather", {"city": "Paris", "unit": "celsius"}), ("get_time", {"tz": "Europe/Paris"})]

# What each model family writes for CALLS, and the content the parser should leave.
OUTPUTS: dict[str, tuple[str, str | None]] = {
    "hermes": ("Let me check.\n<tool_call>\n"
               '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>\n'
               '<tool_call>\n{"name": "get_time", "arguments": {"tz": "Europe/Paris"}}\n</tool_call>',
               "Let me check.\n"),
    "llama3_json": ('<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}; '
                    '{"name": "get_time", "parameters": {"tz": "Europe/Paris"}}', None),
    "pythonic": ('[get_weather(city="Paris", unit="celsius"), get_time(tz="Europe/Paris")]', None),
}


def call_values(calls: list[Any]) -> list[tuple[str, Any]]:
    result = []
    for call in calls:
        if isinstance(call, dict):
            result.append((call["name"], json.loads(call["arguments"])))
        else:
            result.append((call.function.name, json.loads(call.function.arguments)))
    return result


def feed_in_pieces(processor: ToolOutputProcessor, text: str,
                   rng: random.Random) -> tuple[str, list[tuple[str, str]]]:
    """Content and (name, arguments) calls as a client rebuilds them from `text` fed in pieces of 1 to 5 chars."""
    content, calls = "", []
    position = 0
    while position < len(text):
        size = rng.randint(1, 5)
        out = processor.feed(text[position:position + size])
        position += size
        content += out.content
        for piece in out.tool_calls:
            if piece.name is not None:
                calls.append((piece.name, ""))
            calls[piece.index] = (calls[piece.index][0], calls[piece.index][1] + piece.arguments)
    out = processor.finish()
    content += out.content
    for piece in out.tool_calls:
        if piece.name is not None:
            calls.append((piece.name, ""))
        calls[piece.index] = (calls[piece.index][0], calls[piece.index][1] + piece.arguments)
    return content, calls


def check_streaming_matches_the_whole_output(parser: str, text: str) -> None:
    """Fed in random pieces (five seeds), the parser gives the content and calls it extracts from the whole text."""
    cls = get_tool_parser(parser)
    whole = cls().extract(text)
    for seed in range(5):
        content, calls = feed_in_pieces(cls(), text, random.Random(seed))
        assert content == (whole.content or "")
        assert [name for name, _ in calls] == [call.name for call in whole.tool_calls]
        for (_, arguments), call in zip(calls, whole.tool_calls):
            try:
                assert json.loads(arguments) == json.loads(call.arguments)
            except json.JSONDecodeError:  # the output ended inside the arguments: both keep the raw text
                assert arguments == call.arguments


def extract(parser: str, text: str) -> tuple[str | None, list[tuple[str, Any]]]:
    """Content and (name, parsed arguments) calls the parser extracts from the whole `text`."""
    result = get_tool_parser(parser)().extract(text)
    return result.content, call_values([{"name": c.name, "arguments": c.arguments} for c in result.tool_calls])
