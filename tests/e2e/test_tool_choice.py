"""Forced tool calls on the real tiny Llama: tool_choice "required" / a named function constrain the output with a
JSON schema (structured outputs), so even random weights produce a valid call."""
from __future__ import annotations

import json
from typing import Any

from openai.types.chat import ChatCompletion

from tests.server_harness import ConveyorServer

# Bounded schemas (enums, small integers, no free strings): a random model must finish well within max_tokens.
TOOLS: list[dict[str, Any]] = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "additionalProperties": False, "required": ["city", "days"],
        "properties": {"city": {"type": "string", "enum": ["Paris", "Rome", "Oslo"]},
                       "days": {"type": "integer", "minimum": 1, "maximum": 7}}}}},
    {"type": "function", "function": {"name": "get_time", "parameters": {
        "type": "object", "additionalProperties": False, "required": ["utc"],
        "properties": {"utc": {"type": "boolean"}}}}},
]
MESSAGES = [{"role": "user", "content": "What is the weather in Paris for the next three days?"}]


def check_arguments(name: str, arguments: str) -> None:
    values = json.loads(arguments)
    if name == "get_weather":
        assert set(values) == {"city", "days"} and values["city"] in ("Paris", "Rome", "Oslo")
        assert isinstance(values["days"], int) and 1 <= values["days"] <= 7
    else:
        assert name == "get_time" and set(values) == {"utc"} and isinstance(values["utc"], bool)


def test_forced_tool_choice_gives_valid_calls(llama_server: ConveyorServer) -> None:
    client = llama_server.openai_client()
    for seed in range(3):
        named = client.chat.completions.create(
            model="tiny-llama", messages=MESSAGES, tools=TOOLS, max_tokens=200, seed=seed,  # type: ignore[arg-type]
            tool_choice={"type": "function", "function": {"name": "get_weather"}})
        ChatCompletion.model_validate(named.model_dump())
        calls = named.choices[0].message.tool_calls
        assert named.choices[0].finish_reason == "stop" and calls is not None and len(calls) == 1
        assert calls[0].function.name == "get_weather"  # type: ignore[union-attr]
        check_arguments("get_weather", calls[0].function.arguments)  # type: ignore[union-attr]

        required = client.chat.completions.create(
            model="tiny-llama", messages=MESSAGES, tools=TOOLS, max_tokens=200, seed=seed,  # type: ignore[arg-type]
            tool_choice="required", parallel_tool_calls=False)
        calls = required.choices[0].message.tool_calls
        assert required.choices[0].finish_reason == "tool_calls" and calls is not None and len(calls) == 1
        check_arguments(calls[0].function.name, calls[0].function.arguments)  # type: ignore[union-attr]

    streamed = client.chat.completions.create(
        model="tiny-llama", messages=MESSAGES, tools=TOOLS, max_tokens=200, stream=True,  # type: ignore[arg-type]
        tool_choice={"type": "function", "function": {"name": "get_time"}})
    arguments, names, finish = "", [], None
    for chunk in streamed:
        for choice in chunk.choices:
            for piece in choice.delta.tool_calls or []:
                if piece.function and piece.function.name:
                    names.append(piece.function.name)
                arguments += (piece.function.arguments or "") if piece.function else ""
            finish = choice.finish_reason or finish
    assert names == ["get_time"] and finish == "stop"
    check_arguments("get_time", arguments)
