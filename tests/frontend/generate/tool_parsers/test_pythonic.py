"""The pythonic tool parser on its own ([func(a=1, b="x"), other()], Llama 3.2/4 style, literals only): fed in
random pieces it gives what it extracts from the whole output, and what it extracts (and what it leaves as content).
"""
from __future__ import annotations

import random

import pytest

from frontend.generate.tool_parsers import get_tool_parser
from tests.frontend.generate.tool_outputs import (OUTPUTS, check_streaming_matches_the_whole_output, extract,
                                                  feed_in_pieces)

TEXTS = [OUTPUTS["pythonic"][0], "[1, 2] is a list", "[f(x)]", "[f()] done",
         '<|python_start|>[f(a="x, y)", b=[1, (2, 3)], c={"k": None}, d=-1.5, e=true,)]<|python_end|>',
         "[f(s='''tri\"ple'''), g(a=1, b=x)]"]


@pytest.mark.parametrize("text", TEXTS)
def test_streaming_matches_the_whole_output(text: str) -> None:
    check_streaming_matches_the_whole_output("pythonic", text)


def test_parser_results() -> None:
    assert extract("pythonic", "[f(x)]") == ("[f(x)]", [])  # positional arguments are not calls
    assert extract("pythonic", "[f()] done") == (" done", [("f", {})])
    assert extract("pythonic", TEXTS[4]) == (None, [("f", {
        "a": "x, y)", "b": [1, [2, 3]], "c": {"k": None}, "d": -1.5, "e": True})])
    # pythonic pieces concatenate to exactly the json.dumps text of the whole answer
    whole = get_tool_parser("pythonic")().extract(OUTPUTS["pythonic"][0])
    _, calls = feed_in_pieces(get_tool_parser("pythonic")(), OUTPUTS["pythonic"][0], random.Random(0))
    assert [arguments for _, arguments in calls] == [call.arguments for call in whole.tool_calls]
