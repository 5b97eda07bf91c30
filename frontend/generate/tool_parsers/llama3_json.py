"""`llama3_json`: Llama 3.1/3.2 JSON tool calls, `{"name": ..., "parameters": {...}}`, optionally after
`<|python_tag|>`, several separated by ";". Output that does not start with a call is plain content."""
from __future__ import annotations

from typing import Any

from frontend.generate.tool_parsers.base import ToolParser
from frontend.generate.tool_parsers.json_calls import JsonCallSequence
from frontend.generate.tool_parsers.registry import register_tool_parser


@register_tool_parser("llama3_json")
class Llama3JsonToolParser(JsonCallSequence, ToolParser):
    prefixes = ("<|python_tag|>",)
    separator = ";"
    require_arguments = True  # {"name": ...} alone may be an ordinary JSON answer

    def __init__(self, tools: list[dict[str, Any]] | None = None) -> None:
        JsonCallSequence.__init__(self)
        self.tools = tools or []
