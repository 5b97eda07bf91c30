"""Tool-call parsers: model output text -> content + OpenAI tool calls, whole or streamed.

Registered parsers (`--tool-call-parser NAME`): `hermes` (<tool_call>{json}</tool_call>, Hermes/Qwen),
`llama3_json` (a JSON object {"name", "parameters"} after an optional <|python_tag|>, several separated by ";"),
`pythonic` ([func(a=1, b="x"), other()], Llama 3.2/4 style, literals only).
"""
from __future__ import annotations

from frontend.generate.tool_parsers import hermes, llama3_json, pythonic  # noqa: F401  (they register themselves)
from frontend.generate.tool_parsers.base import (DeltaToolCall, ExtractedToolCalls, StreamDelta, ToolCall,
                                        ToolOutputProcessor, ToolParser, make_tool_call_id)
from frontend.generate.tool_parsers.registry import get_tool_parser, register_tool_parser, tool_parser_names

__all__ = ["DeltaToolCall", "ExtractedToolCalls", "StreamDelta", "ToolCall", "ToolOutputProcessor", "ToolParser",
           "get_tool_parser", "make_tool_call_id", "register_tool_parser", "tool_parser_names"]
