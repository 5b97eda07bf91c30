"""OpenAI conformance on a server with auto tool choice (`--tool-call-parser hermes`) and the Responses store on:
hermes tool calls parsed in chat and in Responses (a call is forced with the built-in `force_tokens` logits
processor), stored responses, previous_response_id, background streams and their resumption. Each body is
validated by the `rec` fixture (tests/e2e/conftest.py).
"""
from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any, Iterator

import pytest

from frontend.generate.responses.store import STORE_ENV
from tests.conformance_validation import Recorder
from tests.e2e.conformance_harness import (CITY_SCHEMA, EOS, HERMES_CALL, HERMES_TIME, MESSAGES, MODEL, TOOLS,
                                           forced, names, token_ids)
from tests.server_harness import ConveyorServer


@pytest.fixture(scope="module")
def tools_server(tiny_models: Path) -> Iterator[ConveyorServer]:
    """The tiny Llama with auto tool choice (hermes) and the Responses store on."""
    server = ConveyorServer(str(tiny_models / "llama"), "--served-model-name", MODEL, "--max-model-len", "512",
                            "--kv-cache-memory", "64MiB", "--enable-auto-tool-choice", "--tool-call-parser", "hermes",
                            env={STORE_ENV: "1"})
    yield server
    server.stop()


# --------------------------------------------------------------------------- /v1/chat/completions


def test_auto_tool_choice_with_the_hermes_parser(tools_server: ConveyorServer, rec: Recorder) -> None:
    client = rec.openai(tools_server)
    call_ids = token_ids(rec, tools_server, HERMES_CALL)
    time_ids = token_ids(rec, tools_server, HERMES_TIME)
    fields: dict[str, Any] = dict(model=MODEL, messages=MESSAGES, tools=TOOLS, max_completion_tokens=80)

    whole = client.chat.completions.create(**fields, extra_body={"vllm_xargs": forced(call_ids + [EOS])})
    calls = whole.choices[0].message.tool_calls or []
    assert whole.choices[0].finish_reason == "tool_calls" and whole.choices[0].message.content is None
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [  # type: ignore[union-attr]
        ("get_weather", {"city": "Paris", "days": 2})]

    chunks = list(client.chat.completions.create(**fields, stream=True, tool_choice="auto",
                                                 extra_body={"vllm_xargs": forced(call_ids + [EOS])}))
    pieces = [call for chunk in chunks for c in chunk.choices for call in c.delta.tool_calls or []]
    assert pieces[0].function.name == "get_weather"  # type: ignore[union-attr]
    arguments = "".join(piece.function.arguments or "" for piece in pieces if piece.function)
    assert json.loads(arguments) == {"city": "Paris", "days": 2}
    assert [c.finish_reason for chunk in chunks for c in chunk.choices if c.finish_reason] == ["tool_calls"]

    both = call_ids + [198] + time_ids + [EOS]  # two calls, one newline apart
    two = client.chat.completions.create(**fields, extra_body={"vllm_xargs": forced(both)})
    assert names(two) == ["get_weather", "get_time"]
    one = client.chat.completions.create(**fields, parallel_tool_calls=False, extra_body={"vllm_xargs": forced(both)})
    assert names(one) == ["get_weather"]

    text = client.chat.completions.create(model=MODEL, messages=MESSAGES, tools=TOOLS, max_tokens=5, temperature=0)
    assert text.choices[0].message.content and not text.choices[0].message.tool_calls

    async def main() -> list[Any]:
        async with rec.async_openai(tools_server) as async_client:
            stream = await async_client.chat.completions.create(
                **fields, stream=True, extra_body={"vllm_xargs": forced(time_ids + [EOS])})
            return [chunk async for chunk in stream]

    async_pieces = [call for chunk in asyncio.run(main()) for c in chunk.choices for call in c.delta.tool_calls or []]
    assert async_pieces[0].function.name == "get_time"  # type: ignore[union-attr]


# --------------------------------------------------------------------------- /v1/responses


def test_responses_store_and_hermes_calls(tools_server: ConveyorServer, rec: Recorder) -> None:
    client = rec.openai(tools_server)
    first = client.responses.create(model=MODEL, input="My name is Ada.", max_output_tokens=4, temperature=0)
    assert client.responses.retrieve(first.id) == first
    second = client.responses.create(model=MODEL, input="And mine?", max_output_tokens=4,
                                     previous_response_id=first.id)
    assert second.previous_response_id == first.id

    events = list(client.responses.create(model=MODEL, input="hi", background=True, stream=True,
                                          max_output_tokens=5, extra_body={"ignore_eos": True}))
    response_id = events[0].response.id  # type: ignore[union-attr]
    resumed = list(client.responses.retrieve(response_id, stream=True, starting_after=2))
    assert [event.sequence_number for event in resumed] == [event.sequence_number for event in events[3:]]

    async def main() -> Any:
        async with rec.async_openai(tools_server) as async_client:
            return await async_client.responses.retrieve(first.id)

    assert asyncio.run(main()) == first

    # an auto tool call parsed by hermes: a function_call output item, whole and streamed
    call_ids = token_ids(rec, tools_server, HERMES_CALL)
    tools: list[Any] = [{"type": "function", "name": "get_weather", "parameters": CITY_SCHEMA}]
    fields: dict[str, Any] = dict(model=MODEL, input="Weather?", tools=tools, max_output_tokens=80,
                                  extra_body={"vllm_xargs": forced(call_ids + [EOS])})
    called = client.responses.create(**fields)
    item = called.output[0]
    assert item.type == "function_call" and item.name == "get_weather"  # type: ignore[union-attr]
    assert json.loads(item.arguments) == {"city": "Paris", "days": 2}  # type: ignore[union-attr]
    kinds = [event.type for event in client.responses.create(**fields, stream=True)]
    assert "response.function_call_arguments.done" in kinds and kinds[-1] == "response.completed"
    with rec.http(tools_server) as http:
        assert http.delete(f"/v1/responses/{called.id}").status_code == 200
