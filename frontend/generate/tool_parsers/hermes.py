"""`hermes`: Hermes 2 Pro / Qwen2.5 / Qwen3 style, one JSON object per `<tool_call>...</tool_call>` block.

    I'll look that up.<tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>
"""
from __future__ import annotations

from typing import Any

from frontend.generate.tool_parsers.base import ToolParser, partial_suffix, skip_whitespace
from frontend.generate.tool_parsers.json_calls import JsonCallStream
from frontend.generate.tool_parsers.registry import register_tool_parser


@register_tool_parser("hermes")
class HermesToolParser(ToolParser):
    start_marker = "<tool_call>"
    end_marker = "</tool_call>"

    def __init__(self, tools: list[dict[str, Any]] | None = None) -> None:
        super().__init__(tools)
        self._call: JsonCallStream | None = None  # the open block's call, once its "{" is seen
        self._block_start = -1  # index after the open block's start marker; -1 outside a block
        self._block_invalid = False

    def _advance(self, final: bool) -> None:
        text = self.text
        while True:
            if self._block_start < 0:
                found = text.find(self.start_marker, self._position)
                if found < 0:
                    held = 0 if final else partial_suffix(text, self._position, self.start_marker)
                    self._content(text[self._position:len(text) - held])
                    self._position = len(text) - held
                    return
                self._content(text[self._position:found])
                self._block_start = self._position = found + len(self.start_marker)
                self._call, self._block_invalid = None, False
                continue
            end = text.find(self.end_marker, self._block_start)
            block_end = end if end >= 0 else len(text)
            if self._call is None and not self._block_invalid:
                first = skip_whitespace(text, self._block_start)
                if first < block_end:
                    if text[first] == "{":
                        self._call = JsonCallStream(self, first, require_arguments=False)
                    else:
                        self._block_invalid = True
            if self._call is not None and not self._block_invalid:
                scan = self._call.update(block_end)
                if scan.error and not self._call.named:
                    self._call.processor._call_drop(self._call.record)
                    self._call, self._block_invalid = None, True
            if end < 0 and not final:
                return
            # the block is complete (or the output ended inside it)
            is_call = self._call is not None and self._call.close()
            if not is_call:
                raw = text[self._block_start - len(self.start_marker):block_end]
                self._content(raw + (self.end_marker if end >= 0 else ""))
            self._position = block_end + len(self.end_marker) if end >= 0 else len(text)
            self._block_start, self._call = -1, None
            if end < 0:
                return
