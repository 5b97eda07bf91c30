"""The hermes tool parser on its own (<tool_call>{json}</tool_call>, Hermes/Qwen): fed in random pieces it gives
what it extracts from the whole output, and what it extracts (and what it leaves as content).
"""
from __future__ import annotations

import pytest

from tests.frontend.generate.tool_outputs import OUTPUTS, check_streaming_matches_the_whole_output, extract

TEXTS = [OUTPUTS["hermes"][0], "plain < text <tool", "a <tool_call>not json</tool_call> b",
         '<tool_call>{"arguments": {"x": [1, "}"]}, "name": "f"}</tool_call> tail',
         '<tool_call>{"name": "f"}</tool_call>', '<tool_call>{"name": "f", "arguments": {"x": 1']


@pytest.mark.parametrize("text", TEXTS)
def test_streaming_matches_the_whole_output(text: str) -> None:
    check_streaming_matches_the_whole_output("hermes", text)


def test_parser_results() -> None:
    assert extract("hermes", TEXTS[2]) == ("a <tool_call>not json</tool_call> b", [])
    assert extract("hermes", TEXTS[3]) == (" tail", [("f", {"x": [1, "}"]})])
    assert extract("hermes", TEXTS[4]) == (None, [("f", {})])
