"""OpenAI conformance of /v1/chat/completions: the official `openai` client (sync and async, streamed and not)
with every request field, OpenAI's and vLLM's, each body validated by the `rec` fixture (tests/e2e/conftest.py), on
the shared `llama_server`.
"""
from __future__ import annotations

import asyncio
import json
from typing import Any

import openai

from tests.conformance_validation import Recorder
from tests.e2e.conformance_harness import CITY_SCHEMA, MESSAGES, MODEL, TOOLS, extra, names
from tests.server_harness import ConveyorServer

GREEDY: dict[str, Any] = dict(model=MODEL, messages=MESSAGES, temperature=0)


# --------------------------------------------------------------------------- request fields, one step each


def check_sampling_fields(client: openai.OpenAI, ids: list[int]) -> None:
    """OpenAI's sampling fields, n, seed, logit_bias, user, stop and max_tokens, plus vLLM's sampling knobs."""
    sampled = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_completion_tokens=5, temperature=0.9, top_p=0.95, n=2, seed=3,
        presence_penalty=-0.5, frequency_penalty=1.0, logit_bias={str(ids[0]): -50}, user="conformance",
        stop=["\n\n", "###"], extra_body={"top_k": 50, "min_p": 0.02, "repetition_penalty": 1.2})
    assert len(sampled.choices) == 2 and sampled.usage is not None and sampled.usage.completion_tokens <= 10
    limited = client.chat.completions.create(**GREEDY, max_tokens=3)
    assert limited.usage is not None and limited.usage.completion_tokens <= 3


def check_logprobs(client: openai.OpenAI) -> None:
    """logprobs with top_logprobs, also as token ids, and a request_id that names the completion."""
    with_logprobs = client.chat.completions.create(**GREEDY, max_completion_tokens=4, logprobs=True, top_logprobs=2,
                                                   extra_body={"ignore_eos": True})
    content = with_logprobs.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and len(content) == 4 and all(len(entry.top_logprobs) == 2 for entry in content)
    as_ids = client.chat.completions.create(**GREEDY, max_completion_tokens=3, logprobs=True, top_logprobs=1,
                                            extra_body={"return_tokens_as_token_ids": True, "request_id": "conf-c"})
    assert as_ids.id == "chatcmpl-conf-c"
    assert as_ids.choices[0].logprobs is not None
    assert all(entry.token.startswith("token_id:") for entry in as_ids.choices[0].logprobs.content or [])


def check_vllm_extras(client: openai.OpenAI, ids: list[int]) -> None:
    """vLLM's sampling extras on chat, all at once."""
    extras = client.chat.completions.create(**GREEDY, max_completion_tokens=6, extra_body={
        "stop_token_ids": [ids[3]], "include_stop_str_in_output": True, "ignore_eos": True, "min_tokens": 2,
        "skip_special_tokens": False, "truncate_prompt_tokens": 12, "allowed_token_ids": ids, "bad_words": ["fox"],
        "add_special_tokens": False, "priority": 2, "cache_salt": "chat-salt", "prompt_logprobs": 1,
        "vllm_xargs": {"logits_processors": ["ban_tokens"], "banned_token_ids": [ids[0]]},
        "repetition_detection": {"min_pattern_size": 2, "max_pattern_size": 4, "min_count": 3}})
    assert extras.usage is not None and extras.usage.prompt_tokens == 12
    assert len(extra(extras, "prompt_logprobs")) == 12


def check_structured_outputs(client: openai.OpenAI) -> None:
    """response_format json_schema / json_object, structured_outputs."""
    schema = client.chat.completions.create(**GREEDY, max_completion_tokens=150, response_format={
        "type": "json_schema", "json_schema": {"name": "city", "schema": CITY_SCHEMA, "strict": True}})
    assert schema.choices[0].finish_reason == "stop"
    assert json.loads(schema.choices[0].message.content or "")["city"] in ("Paris", "Rome", "Oslo")
    as_object = client.chat.completions.create(**GREEDY, max_completion_tokens=12,
                                               response_format={"type": "json_object"})
    assert (as_object.choices[0].message.content or "").lstrip().startswith("{")
    choice = client.chat.completions.create(**GREEDY, max_completion_tokens=8,
                                            extra_body={"structured_outputs": {"choice": ["blue", "green"]}})
    assert choice.choices[0].message.content in ("blue", "green")


def check_forced_tool_calls(client: openai.OpenAI) -> None:
    """Forced tool calls need no flag: a named function, or "required" (parallel_tool_calls false: one call)."""
    named = client.chat.completions.create(**GREEDY, max_completion_tokens=150, tools=TOOLS,
                                           tool_choice={"type": "function", "function": {"name": "get_weather"}})
    calls = named.choices[0].message.tool_calls or []
    assert named.choices[0].finish_reason == "stop" and names(named) == ["get_weather"]
    assert json.loads(calls[0].function.arguments)["city"] in ("Paris", "Rome", "Oslo")  # type: ignore[union-attr]
    required = client.chat.completions.create(**GREEDY, max_completion_tokens=150, tools=TOOLS,
                                              tool_choice="required", parallel_tool_calls=False)
    assert required.choices[0].finish_reason == "tool_calls" and len(required.choices[0].message.tool_calls or []) == 1
    client.chat.completions.create(**GREEDY, max_completion_tokens=3, tools=TOOLS, tool_choice="none")


def check_template_fields(client: openai.OpenAI) -> None:
    """echo + continue_final_message, add_generation_prompt, documents, template kwargs."""
    partial: list[Any] = [*MESSAGES, {"role": "assistant", "content": "Red, green"}]
    continued = client.chat.completions.create(model=MODEL, messages=partial, temperature=0, max_completion_tokens=4,
                                               extra_body={"continue_final_message": True, "echo": True})
    assert (continued.choices[0].message.content or "").startswith("Red, green")
    client.chat.completions.create(model=MODEL, messages=partial, max_completion_tokens=3,
                                   extra_body={"add_generation_prompt": False})
    client.chat.completions.create(**GREEDY, max_completion_tokens=3, extra_body={
        "documents": [{"title": "Colors", "text": "Red is a color."}],
        "chat_template_kwargs": {"enable_thinking": False}})


# --------------------------------------------------------------------------- the tests


def test_chat_request_fields(llama_server: ConveyorServer, rec: Recorder) -> None:
    client = rec.openai(llama_server)
    base = client.chat.completions.create(**GREEDY, max_completion_tokens=6, extra_body={
        "ignore_eos": True, "return_token_ids": True})
    ids = extra(base.choices[0], "token_ids")
    assert base.choices[0].message.role == "assistant" and len(ids) == 6 and extra(base, "prompt_token_ids")
    check_sampling_fields(client, ids)
    check_logprobs(client)
    check_vllm_extras(client, ids)
    check_structured_outputs(client)
    check_forced_tool_calls(client)
    check_template_fields(client)
    beams = client.chat.completions.create(**GREEDY, n=2, max_completion_tokens=4,
                                           extra_body={"use_beam_search": True, "length_penalty": 1.3})
    assert [c.index for c in beams.choices] == [0, 1] and all(c.message.role == "assistant" for c in beams.choices)


def test_chat_without_generation_prompt_answers_as_assistant(llama_server: ConveyorServer) -> None:
    recorder = Recorder()
    recorder.openai(llama_server).chat.completions.create(model=MODEL, messages=MESSAGES, max_completion_tokens=2,
                                                          extra_body={"add_generation_prompt": False})
    recorder.assert_clean()


def test_chat_stream(llama_server: ConveyorServer, rec: Recorder) -> None:
    client = rec.openai(llama_server)
    fields: dict[str, Any] = dict(model=MODEL, messages=MESSAGES, temperature=0, max_completion_tokens=7, n=2,
                                  logprobs=True, top_logprobs=1)
    whole = client.chat.completions.create(**fields, extra_body={"ignore_eos": True})
    chunks = list(client.chat.completions.create(
        **fields, stream=True, stream_options={"include_usage": True, "continuous_usage_stats": True},  # type: ignore
        extra_body={"ignore_eos": True, "return_token_ids": True, "stream_interval": 3}))
    assert rec.last("/v1/chat/completions").request["stream_options"]["continuous_usage_stats"] is True
    assert chunks[-1].choices == [] and chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 14
    assert all(chunk.usage is not None for chunk in chunks)  # continuous_usage_stats: usage so far on every chunk
    assert extra(chunks[0], "prompt_token_ids")
    for choice in whole.choices:
        pieces = [c for chunk in chunks for c in chunk.choices if c.index == choice.index]
        assert pieces[0].delta.role == "assistant"
        assert "".join(piece.delta.content or "" for piece in pieces) == choice.message.content
        assert sum(len(piece.logprobs.content or []) for piece in pieces if piece.logprobs) == 7
        assert pieces[-1].finish_reason == "length"

    # a streamed forced call: id, type and name first, then argument pieces that join to JSON
    streamed = list(client.chat.completions.create(model=MODEL, messages=MESSAGES, tools=TOOLS, stream=True,
                                                   temperature=0, max_completion_tokens=150, tool_choice={
                                                       "type": "function", "function": {"name": "get_time"}}))
    arguments = "".join(call.function.arguments or "" for chunk in streamed for c in chunk.choices
                        for call in c.delta.tool_calls or [] if call.function)
    assert json.loads(arguments).keys() == {"utc"}

    # echo of a continued assistant message is its own chunk, after the role
    partial: list[Any] = [*MESSAGES, {"role": "assistant", "content": "Blue"}]
    echoed = list(client.chat.completions.create(model=MODEL, messages=partial, max_completion_tokens=3, stream=True,
                                                 extra_body={"continue_final_message": True, "echo": True}))
    assert "".join(c.delta.content or "" for chunk in echoed for c in chunk.choices).startswith("Blue")


def test_chat_async(llama_server: ConveyorServer, rec: Recorder) -> None:
    async def main() -> tuple[Any, list[Any]]:
        async with rec.async_openai(llama_server) as client:
            whole = await client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0,
                                                         max_completion_tokens=6, seed=1, extra_body={"min_p": 0.1})
            stream = await client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0,
                                                          max_completion_tokens=6, seed=1, stream=True,
                                                          stream_options={"include_usage": True},
                                                          extra_body={"min_p": 0.1})
            return whole, [chunk async for chunk in stream]

    whole, chunks = asyncio.run(main())
    assert "".join(c.delta.content or "" for chunk in chunks for c in chunk.choices) == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
