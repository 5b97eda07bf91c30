"""The llama3_json tool parser on its own (a JSON object {"name", "parameters"} after an optional <|python_tag|>,
several separated by ";"): fed in random pieces it gives what it extracts from the whole output, and what it
extracts (and what it leaves as content).
"""
from __future__ import annotations

import pytest

from tests.frontend.generate.tool_outputs import OUTPUTS, check_streaming_matches_the_whole_output, extract

TEXTS = [OUTPUTS["llama3_json"][0], '{"name": "Bob", "age": 3}', 'Hi {"name": "f", "parameters": {}}',
         ' {"name": "f", "arguments": {"x": "a;b"}} and more', "<|python_tag|>print(1)"]


@pytest.mark.parametrize("text", TEXTS)
def test_streaming_matches_the_whole_output(text: str) -> None:
    check_streaming_matches_the_whole_output("llama3_json", text)


def test_parser_results() -> None:
    assert extract("llama3_json", '{"name": "Bob", "age": 3}') == ('{"name": "Bob", "age": 3}', [])
    assert extract("llama3_json", TEXTS[3]) == (" and more", [("f", {"x": "a;b"})])
