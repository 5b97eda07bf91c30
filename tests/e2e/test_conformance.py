"""OpenAI conformance: the official `openai` client (sync and async, streamed and not) and plain HTTP through every
route and request field, every raw body and stream chunk validated strictly against the SDK's own types.

All traffic goes through `tests/conformance_validation.Recorder`, whose transport tees each response body and runs
`model_validate(raw, strict=True)` with the matching `openai.types` class (plus a type check of every vLLM extra
field); the `rec` fixture fails the test if any body broke them. Servers: the shared `llama_server`, and one more
with `--enable-auto-tool-choice --tool-call-parser hermes` and the Responses store on. Outputs of the random tiny
Llama are steered where a test needs a particular shape (a hermes tool call is forced with the built-in
`force_tokens` logits processor).
"""
from __future__ import annotations

import asyncio
import copy
import json
from pathlib import Path
from typing import Any, Iterator

import openai
import pytest
from pydantic import ValidationError

from frontend.generate.responses.store import STORE_ENV
from tests.conformance_validation import (Recorder, validate_chat_chunk, validate_completion,
                                          validate_completion_chunk, validate_error)
from tests.server_harness import ConveyorServer

MODEL = "tiny-llama"
PROMPT = "The quick brown fox jumps over the lazy dog because"
MESSAGES: list[Any] = [{"role": "user", "content": "Name three colors."}]
EOS = 2  # <|im_end|>, the tiny Llama's EOS (SmolLM2's tokenizer)
# Bounded schemas (enums, small integers): even random weights finish them well within max_tokens.
CITY_SCHEMA = {"type": "object", "additionalProperties": False, "required": ["city", "days"],
               "properties": {"city": {"type": "string", "enum": ["Paris", "Rome", "Oslo"]},
                              "days": {"type": "integer", "minimum": 1, "maximum": 7}}}
TOOLS: list[Any] = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                      "parameters": CITY_SCHEMA}},
    {"type": "function", "function": {"name": "get_time", "parameters": {
        "type": "object", "additionalProperties": False, "required": ["utc"],
        "properties": {"utc": {"type": "boolean"}}}}},
]
HERMES_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n</tool_call>'
HERMES_TIME = '<tool_call>\n{"name": "get_time", "arguments": {"utc": true}}\n</tool_call>'


@pytest.fixture
def rec() -> Iterator[Recorder]:
    """Every response body of the test, validated; the test fails if any broke the OpenAI types."""
    recorder = Recorder()
    yield recorder
    recorder.assert_clean()


@pytest.fixture(scope="module")
def tools_server(tiny_models: Path) -> Iterator[ConveyorServer]:
    """The tiny Llama with auto tool choice (hermes) and the Responses store on."""
    server = ConveyorServer(str(tiny_models / "llama"), "--served-model-name", MODEL, "--max-model-len", "512",
                            "--kv-cache-memory", "64MiB", "--enable-auto-tool-choice", "--tool-call-parser", "hermes",
                            env={STORE_ENV: "1"})
    yield server
    server.stop()


def extra(obj: Any, name: str) -> Any:
    """A vLLM extra field of a parsed SDK object (present: the recorder already checked its type)."""
    assert obj.model_extra is not None and name in obj.model_extra, f"{name} missing"
    return obj.model_extra[name]


def token_ids(rec: Recorder, server: ConveyorServer, text: str) -> list[int]:
    with rec.http(server) as http:
        return list(http.post("/tokenize", json={"model": MODEL, "prompt": text,
                                                 "add_special_tokens": False}).json()["tokens"])


def names(chat: Any) -> list[str]:
    """The function names of a chat completion's first choice's tool calls."""
    return [call.function.name for call in chat.choices[0].message.tool_calls or []]


def forced(ids: list[int]) -> dict[str, Any]:
    """vllm_xargs making the output start with these tokens (the built-in force_tokens processor)."""
    return {"logits_processors": ["force_tokens"], "forced_token_ids": ids}


# --------------------------------------------------------------------------- the validator itself


def test_the_recorder_rejects_what_the_openai_types_reject(llama_server: ConveyorServer, rec: Recorder) -> None:
    """Real bodies pass; the same bodies with one field missing, mistyped or unknown fail."""
    client = rec.openai(llama_server)
    client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2, logprobs=1)
    completion = rec.last("/v1/completions").json
    list(client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2, stream=True))
    chunk = rec.last("/v1/chat/completions").events[1]
    good = [(validate_completion, completion), (validate_chat_chunk, chunk),
            (validate_completion_chunk, {**completion, "choices": [{**completion["choices"][0],
                                                                    "finish_reason": None}]})]
    for validate, raw in good:
        validate(copy.deepcopy(raw))
    choice = completion["choices"][0]
    bad = [
        (validate_completion, {key: value for key, value in completion.items() if key != "created"}),
        (validate_completion, {**completion, "created": str(completion["created"])}),  # no coercion
        (validate_completion, {**completion, "choices": [{**choice, "finish_reason": None}]}),  # not a stream
        (validate_completion, {**completion, "choices": [{**choice, "stop_reason": [1]}]}),  # bad vLLM extra
        (validate_completion, {**completion, "surprise": 1}),  # unknown field
        (validate_completion, {**completion, "choices": [{**choice, "logprobs": {
            **choice["logprobs"], "token_logprobs": [None]}}]}),
        (validate_chat_chunk, {**chunk, "choices": [{**chunk["choices"][0], "delta": {"content": 5}}]}),
        (validate_chat_chunk, {**chunk, "object": "chat.completion"}),
        (validate_error, {"error": {"message": "x", "type": "BadRequestError", "param": None}}),
    ]
    for validate, raw in bad:
        with pytest.raises((AssertionError, ValidationError)):
            validate(raw)


# --------------------------------------------------------------------------- /v1/models and the plain routes


def test_models_list_sync_and_async(llama_server: ConveyorServer, rec: Recorder) -> None:
    page = rec.openai(llama_server).models.list()
    assert [model.id for model in page.data] == [MODEL] and page.data[0].owned_by == "conveyor"
    assert extra(page.data[0], "max_model_len") == 512

    async def main() -> list[str]:
        async with rec.async_openai(llama_server) as client:
            return [model.id async for model in client.models.list()]

    assert asyncio.run(main()) == [MODEL]
    assert [record.path for record in rec.records] == ["/v1/models", "/v1/models"]


def test_models_retrieve(llama_server: ConveyorServer, rec: Recorder) -> None:
    assert rec.openai(llama_server).models.retrieve(MODEL).id == MODEL

    async def main() -> str:
        async with rec.async_openai(llama_server) as client:
            return (await client.models.retrieve(MODEL)).id

    assert asyncio.run(main()) == MODEL


def test_tokenize_detokenize_health_version_metrics(llama_server: ConveyorServer, rec: Recorder) -> None:
    with rec.http(llama_server) as http:
        plain = http.post("/tokenize", json={"model": MODEL, "prompt": PROMPT, "return_token_strs": True}).json()
        assert plain["count"] > 5 and len(plain["token_strs"]) == plain["count"]
        bare = http.post("/tokenize", json={"prompt": PROMPT, "add_special_tokens": False}).json()
        assert bare["max_model_len"] == 512 and bare["token_strs"] is None
        chat = http.post("/tokenize", json={"model": MODEL, "messages": MESSAGES,
                                            "add_generation_prompt": True}).json()
        assert chat["count"] > bare["count"] // 2
        assert http.post("/detokenize", json={"model": MODEL, "tokens": bare["tokens"]}).json()["prompt"] == PROMPT
        assert http.get("/health").status_code == 200
        assert http.get("/version").json()["version"]
        text = http.get("/metrics").text
    for name in ("conveyor:num_requests_running", "conveyor:prompt_tokens_total",
                 "conveyor:e2e_request_latency_seconds_count"):
        assert name in text, name
    # bad tokenize/detokenize requests are 400s in the OpenAI shape too
    with rec.http(llama_server) as http:
        assert http.post("/detokenize", json={"tokens": [10**8]}).json()["error"]["param"] == "tokens"
        assert http.post("/tokenize", json={"prompt": 5}).json()["error"]["param"] == "prompt"


# --------------------------------------------------------------------------- /v1/completions


def test_completions_request_fields(llama_server: ConveyorServer, rec: Recorder) -> None:
    client = rec.openai(llama_server)
    greedy = dict(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0)
    base = client.completions.create(**greedy, extra_body={"return_token_ids": True, "ignore_eos": True})
    ids, text = extra(base.choices[0], "token_ids"), base.choices[0].text
    assert len(ids) == 6 and base.usage is not None and base.usage.completion_tokens == 6
    assert extra(base.choices[0], "prompt_token_ids")

    # OpenAI's sampling fields, n, seed and user, plus vLLM's sampling knobs
    knobs: dict[str, Any] = dict(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0.8, top_p=0.9, n=2,
                                 presence_penalty=0.5, frequency_penalty=0.5, seed=11, user="conformance",
                                 extra_body={"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1,
                                             "cache_salt": "salt", "priority": 1})
    sampled = client.completions.create(**knobs)
    assert [choice.index for choice in sampled.choices] == [0, 1]
    assert [c.text for c in client.completions.create(**knobs).choices] == [c.text for c in sampled.choices]
    assert rec.last("/v1/completions").request["top_k"] == 20

    # stop strings, with and without the stop string in the output
    stop = text[len(text) // 2:len(text) // 2 + 3]
    stopped = client.completions.create(**greedy, stop=[stop])
    assert stopped.choices[0].finish_reason == "stop" and extra(stopped.choices[0], "stop_reason") == stop
    assert stopped.choices[0].text == text[:text.index(stop)]
    kept = client.completions.create(**greedy, stop=stop, extra_body={"include_stop_str_in_output": True})
    assert kept.choices[0].text == text[:text.index(stop) + len(stop)]

    # logprobs with echo: the prompt comes first, the lists run in step with the generated tokens
    echoed = client.completions.create(**greedy, logprobs=3, echo=True, extra_body={"ignore_eos": True})
    logprobs = echoed.choices[0].logprobs
    assert echoed.choices[0].text == PROMPT + text and logprobs is not None and logprobs.tokens is not None
    assert len(logprobs.tokens) == 6 and all(len(top) <= 4 for top in logprobs.top_logprobs or [])

    # logit_bias, stop_token_ids, min_tokens, the ban_tokens logits processor
    biased = client.completions.create(**greedy, logit_bias={str(ids[0]): -100}, extra_body={"return_token_ids": True})
    assert extra(biased.choices[0], "token_ids")[0] != ids[0]
    stop_id = client.completions.create(**greedy, extra_body={"stop_token_ids": [ids[1]]})
    assert stop_id.choices[0].finish_reason == "stop" and extra(stop_id.choices[0], "stop_reason") == ids[1]
    at_least = client.completions.create(**greedy, extra_body={"stop_token_ids": [ids[0]], "min_tokens": 3})
    assert at_least.usage is not None and at_least.usage.completion_tokens >= 3
    banned = client.completions.create(**greedy, extra_body={
        "return_token_ids": True, "vllm_xargs": {"logits_processors": ["ban_tokens"], "banned_token_ids": [ids[0]]}})
    assert ids[0] not in extra(banned.choices[0], "token_ids")

    # prompt handling: truncate_prompt_tokens, add_special_tokens, token-id and batched prompts
    truncated = client.completions.create(**greedy, extra_body={"truncate_prompt_tokens": 3})
    assert truncated.usage is not None and truncated.usage.prompt_tokens == 3
    client.completions.create(**greedy, extra_body={"add_special_tokens": False, "skip_special_tokens": False,
                                                    "ignore_eos": True})
    batch = client.completions.create(model=MODEL, prompt=[PROMPT, "Hello"], max_tokens=3, temperature=0, n=2)
    assert sorted(choice.index for choice in batch.choices) == [0, 1, 2, 3]
    from_ids = client.completions.create(model=MODEL, prompt=extra(base.choices[0], "prompt_token_ids"),
                                         max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
    assert from_ids.choices[0].text == text

    # vLLM extras: allowed_token_ids, bad_words, prompt_logprobs, request_id, return_tokens_as_token_ids
    allowed = client.completions.create(**greedy, extra_body={"allowed_token_ids": ids[2:4], "return_token_ids": True})
    assert set(extra(allowed.choices[0], "token_ids")) <= set(ids[2:4])
    client.completions.create(**greedy, extra_body={"bad_words": ["fox", " lazy dog"]})
    with_prompt = client.completions.create(**greedy, extra_body={"prompt_logprobs": 2, "request_id": "conf-7"})
    assert with_prompt.id == "cmpl-conf-7" and with_prompt.usage is not None
    assert len(extra(with_prompt.choices[0], "prompt_logprobs")) == with_prompt.usage.prompt_tokens
    as_ids = client.completions.create(**greedy, logprobs=1, extra_body={"return_tokens_as_token_ids": True})
    assert as_ids.choices[0].logprobs is not None
    assert all(token.startswith("token_id:") for token in as_ids.choices[0].logprobs.tokens or [])

    # repetition_detection stops a forced loop; structured_outputs; beam search with length_penalty
    looped = client.completions.create(**{**greedy, "max_tokens": 30}, extra_body={
        "allowed_token_ids": [ids[0]], "repetition_detection": {"min_pattern_len": 1, "max_pattern_len": 2,
                                                                "min_repeats": 4}})
    assert looped.choices[0].finish_reason == "stop"
    assert extra(looped.choices[0], "stop_reason").startswith("repetition detected")
    chosen = client.completions.create(**greedy, extra_body={"structured_outputs": {"choice": ["red", "green"]}})
    assert chosen.choices[0].text in ("red", "green")
    regex = client.completions.create(**{**greedy, "max_tokens": 12},
                                      extra_body={"structured_outputs": {"regex": r" \d{3}-\d{4}"}})
    assert regex.choices[0].finish_reason == "stop" and len(regex.choices[0].text) == 9
    beams = client.completions.create(**greedy, n=2, extra_body={"use_beam_search": True, "length_penalty": 0.7})
    assert sorted(choice.index for choice in beams.choices) == [0, 1]


def test_completions_stream(llama_server: ConveyorServer, rec: Recorder) -> None:
    client = rec.openai(llama_server)
    fields: dict[str, Any] = dict(model=MODEL, prompt=PROMPT, max_tokens=7, temperature=0, n=2, logprobs=2,
                                  echo=True)
    whole = client.completions.create(**fields, extra_body={"ignore_eos": True})
    chunks = list(client.completions.create(
        **fields, stream=True, stream_options={"include_usage": True, "continuous_usage_stats": True},  # type: ignore
        extra_body={"ignore_eos": True, "return_token_ids": True, "stream_interval": 2}))
    sent = rec.last("/v1/completions").request
    assert sent["stream_options"] == {"include_usage": True, "continuous_usage_stats": True}
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 14
    assert all(chunk.usage is not None for chunk in chunks)  # continuous_usage_stats: usage so far on every chunk
    for choice in whole.choices:
        pieces = [c for chunk in chunks for c in chunk.choices if c.index == choice.index]
        assert "".join(piece.text for piece in pieces) == choice.text
        assert sum(len(extra(piece, "token_ids")) for piece in pieces) == 7
        assert all(len(extra(piece, "token_ids")) >= 2 for piece in pieces[:-1])  # stream_interval
        assert pieces[-1].finish_reason == "length"
    plain = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, stream=True,
                                           stream_options={"include_usage": True}))
    assert all(chunk.usage is None for chunk in plain[:-1]) and plain[-1].usage is not None


def test_completions_async(llama_server: ConveyorServer, rec: Recorder) -> None:
    async def main() -> tuple[Any, list[Any]]:
        async with rec.async_openai(llama_server) as client:
            whole = await client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0,
                                                    logprobs=1, extra_body={"ignore_eos": True, "top_k": 5})
            stream = await client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0,
                                                     logprobs=1, stream=True, stream_options={"include_usage": True},
                                                     extra_body={"ignore_eos": True, "top_k": 5})
            return whole, [chunk async for chunk in stream]

    whole, chunks = asyncio.run(main())
    assert "".join(c.text for chunk in chunks for c in chunk.choices) == whole.choices[0].text
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens == 6


# --------------------------------------------------------------------------- /v1/chat/completions


def test_chat_request_fields(llama_server: ConveyorServer, rec: Recorder) -> None:
    client = rec.openai(llama_server)
    greedy: dict[str, Any] = dict(model=MODEL, messages=MESSAGES, temperature=0)
    base = client.chat.completions.create(**greedy, max_completion_tokens=6, extra_body={
        "ignore_eos": True, "return_token_ids": True})
    ids = extra(base.choices[0], "token_ids")
    assert base.choices[0].message.role == "assistant" and len(ids) == 6 and extra(base, "prompt_token_ids")

    sampled = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_completion_tokens=5, temperature=0.9, top_p=0.95, n=2, seed=3,
        presence_penalty=-0.5, frequency_penalty=1.0, logit_bias={str(ids[0]): -50}, user="conformance",
        stop=["\n\n", "###"], extra_body={"top_k": 50, "min_p": 0.02, "repetition_penalty": 1.2})
    assert len(sampled.choices) == 2 and sampled.usage is not None and sampled.usage.completion_tokens <= 10
    limited = client.chat.completions.create(**greedy, max_tokens=3)
    assert limited.usage is not None and limited.usage.completion_tokens <= 3

    with_logprobs = client.chat.completions.create(**greedy, max_completion_tokens=4, logprobs=True, top_logprobs=2,
                                                   extra_body={"ignore_eos": True})
    content = with_logprobs.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and len(content) == 4 and all(len(entry.top_logprobs) == 2 for entry in content)
    as_ids = client.chat.completions.create(**greedy, max_completion_tokens=3, logprobs=True, top_logprobs=1,
                                            extra_body={"return_tokens_as_token_ids": True, "request_id": "conf-c"})
    assert as_ids.id == "chatcmpl-conf-c"
    assert as_ids.choices[0].logprobs is not None
    assert all(entry.token.startswith("token_id:") for entry in as_ids.choices[0].logprobs.content or [])

    # vLLM's sampling extras on chat, all at once
    extras = client.chat.completions.create(**greedy, max_completion_tokens=6, extra_body={
        "stop_token_ids": [ids[3]], "include_stop_str_in_output": True, "ignore_eos": True, "min_tokens": 2,
        "skip_special_tokens": False, "truncate_prompt_tokens": 12, "allowed_token_ids": ids, "bad_words": ["fox"],
        "add_special_tokens": False, "priority": 2, "cache_salt": "chat-salt", "prompt_logprobs": 1,
        "vllm_xargs": {"logits_processors": ["ban_tokens"], "banned_token_ids": [ids[0]]},
        "repetition_detection": {"min_pattern_size": 2, "max_pattern_size": 4, "min_count": 3}})
    assert extras.usage is not None and extras.usage.prompt_tokens == 12
    assert len(extra(extras, "prompt_logprobs")) == 12

    # structured outputs: response_format json_schema / json_object, structured_outputs
    schema = client.chat.completions.create(**greedy, max_completion_tokens=150, response_format={
        "type": "json_schema", "json_schema": {"name": "city", "schema": CITY_SCHEMA, "strict": True}})
    assert schema.choices[0].finish_reason == "stop"
    assert json.loads(schema.choices[0].message.content or "")["city"] in ("Paris", "Rome", "Oslo")
    as_object = client.chat.completions.create(**greedy, max_completion_tokens=12,
                                               response_format={"type": "json_object"})
    assert (as_object.choices[0].message.content or "").lstrip().startswith("{")
    choice = client.chat.completions.create(**greedy, max_completion_tokens=8,
                                            extra_body={"structured_outputs": {"choice": ["blue", "green"]}})
    assert choice.choices[0].message.content in ("blue", "green")

    # forced tool calls need no flag: a named function, or "required" (parallel_tool_calls false: one call)
    named = client.chat.completions.create(**greedy, max_completion_tokens=150, tools=TOOLS,
                                           tool_choice={"type": "function", "function": {"name": "get_weather"}})
    calls = named.choices[0].message.tool_calls or []
    assert named.choices[0].finish_reason == "stop" and names(named) == ["get_weather"]
    assert json.loads(calls[0].function.arguments)["city"] in ("Paris", "Rome", "Oslo")  # type: ignore[union-attr]
    required = client.chat.completions.create(**greedy, max_completion_tokens=150, tools=TOOLS,
                                              tool_choice="required", parallel_tool_calls=False)
    assert required.choices[0].finish_reason == "tool_calls" and len(required.choices[0].message.tool_calls or []) == 1
    client.chat.completions.create(**greedy, max_completion_tokens=3, tools=TOOLS, tool_choice="none")

    # chat template fields: echo + continue_final_message, add_generation_prompt, documents, template kwargs
    partial: list[Any] = [*MESSAGES, {"role": "assistant", "content": "Red, green"}]
    continued = client.chat.completions.create(model=MODEL, messages=partial, temperature=0, max_completion_tokens=4,
                                               extra_body={"continue_final_message": True, "echo": True})
    assert (continued.choices[0].message.content or "").startswith("Red, green")
    client.chat.completions.create(model=MODEL, messages=partial, max_completion_tokens=3,
                                   extra_body={"add_generation_prompt": False})
    client.chat.completions.create(**greedy, max_completion_tokens=3, extra_body={
        "documents": [{"title": "Colors", "text": "Red is a color."}],
        "chat_template_kwargs": {"enable_thinking": False}})

    beams = client.chat.completions.create(**greedy, n=2, max_completion_tokens=4,
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


def test_responses_sync_async_stream(llama_server: ConveyorServer, rec: Recorder) -> None:
    client = rec.openai(llama_server)
    fields: dict[str, Any] = dict(model=MODEL, instructions="Be brief.", input="Name a color.", temperature=0,
                                  top_p=0.9, max_output_tokens=6)
    whole = client.responses.create(**fields, extra_body={"top_k": 10, "seed": 1, "ignore_eos": True})
    assert whole.status == "incomplete" and whole.usage is not None and whole.usage.output_tokens == 6
    events = list(client.responses.create(**fields, stream=True, extra_body={"top_k": 10, "ignore_eos": True}))
    assert "".join(getattr(event, "delta", "") for event in events if event.type == "response.output_text.delta") \
        == whole.output_text
    with_logprobs = client.responses.create(**fields, include=["message.output_text.logprobs"], top_logprobs=2)
    part = with_logprobs.output[0].content[0]  # type: ignore[union-attr]
    assert part.logprobs and all(len(entry.top_logprobs) == 2 for entry in part.logprobs)  # type: ignore[union-attr]
    as_json = client.responses.create(model=MODEL, input="City?", temperature=0, max_output_tokens=150, text={
        "format": {"type": "json_schema", "name": "city", "schema": CITY_SCHEMA, "strict": True}})
    assert json.loads(as_json.output_text)["city"] in ("Paris", "Rome", "Oslo")
    responses_tools: list[Any] = [{"type": "function", "name": "get_weather", "parameters": CITY_SCHEMA}]
    called = client.responses.create(model=MODEL, input="Weather?", temperature=0, max_output_tokens=150,
                                     tools=responses_tools,
                                     tool_choice="required", parallel_tool_calls=False)
    assert called.output[0].type == "function_call" and called.output[0].name == "get_weather"
    with pytest.raises(openai.NotFoundError):  # the store is off on this server
        client.responses.retrieve(whole.id)

    async def main() -> tuple[Any, list[Any]]:
        async with rec.async_openai(llama_server) as async_client:
            done = await async_client.responses.create(**fields)
            stream = await async_client.responses.create(**fields, stream=True)
            return done, [event async for event in stream]

    done, async_events = asyncio.run(main())
    assert async_events[-1].response.output_text == done.output_text


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


# --------------------------------------------------------------------------- invalid requests


COMPLETION: dict[str, Any] = {"model": MODEL, "prompt": "Hello", "max_tokens": 3}
CHAT: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
FUNCTION_TOOLS = TOOLS[:1]

INVALID: list[Any] = [
    # out of range
    ("/v1/completions", {"temperature": -1}, "temperature"),
    ("/v1/chat/completions", {"top_p": 0}, "top_p"),
    ("/v1/completions", {"top_p": 1.5}, "top_p"),
    ("/v1/chat/completions", {"n": 0}, "n"),
    ("/v1/completions", {"logprobs": 21}, "logprobs"),
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("/v1/completions", {"presence_penalty": 3}, "presence_penalty"),
    ("/v1/chat/completions", {"frequency_penalty": -3}, "frequency_penalty"),
    ("/v1/completions", {"max_tokens": 0}, "max_tokens"),
    ("/v1/chat/completions", {"max_completion_tokens": 0}, "max_completion_tokens"),
    ("/v1/completions", {"min_p": 2}, "min_p"),
    ("/v1/chat/completions", {"repetition_penalty": 0}, "repetition_penalty"),
    ("/v1/completions", {"prompt_logprobs": 21}, "prompt_logprobs"),
    ("/v1/chat/completions", {"prompt_logprobs": 21}, "prompt_logprobs"),
    ("/v1/completions", {"stream_interval": 0}, "stream_interval"),
    ("/v1/chat/completions", {"truncate_prompt_tokens": -2}, "truncate_prompt_tokens"),
    ("/v1/completions", {"top_k": -2}, "top_k"),
    ("/v1/completions", {"min_tokens": -1}, "min_tokens"),
    ("/v1/completions", {"n": 129}, "n"),
    # wrong types
    ("/v1/completions", {"temperature": "hot"}, "temperature"),
    ("/v1/chat/completions", {"temperature": "hot"}, "temperature"),
    ("/v1/completions", {"stop": 5}, "stop"),
    ("/v1/chat/completions", {"stop": 5}, "stop"),
    ("/v1/chat/completions", {"messages": "hi"}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
    ("/v1/completions", {"logit_bias": {"x": 1}}, "logit_bias"),
    ("/v1/chat/completions", {"logit_bias": {"x": 1}}, "logit_bias"),
    ("/v1/chat/completions", {"logit_bias": {"5": "up"}}, "logit_bias.5"),
    ("/v1/chat/completions", {"logprobs": 21}, "logprobs"),
    ("/v1/completions", {"stream_options": {"include_usage": "maybe"}, "stream": True},
     "stream_options.include_usage"),
    ("/v1/completions", {"seed": "abc"}, "seed"),
    ("/v1/completions", {"allowed_token_ids": "all"}, "allowed_token_ids"),
    ("/v1/completions", {"bad_words": "fox"}, "bad_words"),
    # contradictory fields
    ("/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs"),
    ("/v1/completions", {"structured_outputs": {"regex": "a+", "choice": ["a"]}}, "structured_outputs.choice"),
    ("/v1/chat/completions", {"structured_outputs": {"json": {"type": "object"}, "grammar": "root ::= \"a\""}},
     "structured_outputs.grammar"),
    ("/v1/completions", {"use_beam_search": True, "stream": True}, "stream"),
    ("/v1/chat/completions", {"use_beam_search": True, "logprobs": True}, "logprobs"),
    ("/v1/completions", {"kv_transfer_params": {"do_remote_decode": True}, "n": 2}, "kv_transfer_params"),
    pytest.param("/v1/chat/completions", {"continue_final_message": True, "add_generation_prompt": True},
                 "continue_final_message", id="continue_final_message+add_generation_prompt"),
    ("/v1/completions", {"stream": True, "prompt_logprobs": 1}, "prompt_logprobs"),
    ("/v1/chat/completions", {"tools": FUNCTION_TOOLS, "tool_choice": "required",
                              "response_format": {"type": "json_object"}}, "tool_choice"),
    # schemas that do not compile, unknown tools, ids outside the vocabulary
    ("/v1/completions", {"structured_outputs": {"json": {"type": "string", "pattern": "(unclosed"}}},
     "structured_outputs.json"),
    ("/v1/chat/completions", {"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "properties": {"a": {"type": "nonsense"}}}}}},
     "response_format.json_schema.schema"),
    ("/v1/chat/completions", {"structured_outputs": {"grammar": "root ::= ("}}, "structured_outputs.grammar"),
    ("/v1/chat/completions", {"tools": FUNCTION_TOOLS, "tool_choice": {"type": "function",
                                                                       "function": {"name": "no_such_tool"}}},
     "tool_choice"),
    ("/v1/chat/completions", {"tool_choice": "required"}, "tool_choice"),
    ("/v1/chat/completions", {"tools": FUNCTION_TOOLS, "tool_choice": "auto"}, "tool_choice"),
    ("/v1/completions", {"allowed_token_ids": [10**7]}, "allowed_token_ids"),
    ("/v1/chat/completions", {"allowed_token_ids": [-1]}, "allowed_token_ids"),
    ("/v1/completions", {"stop_token_ids": [10**7]}, "stop_token_ids"),
    ("/v1/chat/completions", {"stop_token_ids": [10**7]}, "stop_token_ids"),
    ("/v1/completions", {"logit_bias": {str(10**7): 5}}, "logit_bias"),
    ("/v1/completions", {"prompt": [10**7]}, "prompt"),
    ("/v1/completions", {"vllm_xargs": {"logits_processors": ["no_such_processor"]}}, "vllm_xargs"),
    ("/v1/completions", {"repetition_detection": {"min_repeats": 1}}, "repetition_detection"),
    ("/v1/completions", {"bad_words": [" "]}, "bad_words"),
    # the Responses API names its own fields
    ("/v1/responses", {"temperature": -1}, "temperature"),
    ("/v1/responses", {"max_output_tokens": 0}, "max_output_tokens"),
    ("/v1/responses", {"top_logprobs": 21}, "top_logprobs"),
    ("/v1/responses", {"top_k": "x"}, "top_k"),
    ("/v1/responses", {"text": {"format": {"type": "json_schema", "name": "x", "schema": {
        "type": "string", "pattern": "(unclosed"}}}}, "text.format.schema"),
    ("/v1/responses", {"tools": [{"type": "function", "name": "f", "parameters": {"type": "object"}}],
                       "tool_choice": {"type": "function", "name": "g"}}, "tool_choice"),
]


def _invalid_id(case: Any) -> str:
    path, fields, _ = case
    return f"{path.rsplit('/', 1)[1]}-{'+'.join(fields)}"


@pytest.mark.parametrize("path,fields,param", [
    pytest.param(*case, id=_invalid_id(case)) if type(case) is tuple else case for case in INVALID])
def test_invalid_request_is_a_400_naming_the_field(llama_server: ConveyorServer, rec: Recorder, path: str,
                                                   fields: dict[str, Any], param: str) -> None:
    base = {"/v1/completions": COMPLETION, "/v1/chat/completions": CHAT,
            "/v1/responses": {"model": MODEL, "input": "hi", "max_output_tokens": 3}}[path]
    with rec.http(llama_server) as http:
        response = http.post(path, json={**base, **fields})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "BadRequestError" and error["code"] == 400
    assert error["param"] == param, error


def test_the_client_raises_bad_request_with_the_param(llama_server: ConveyorServer, rec: Recorder) -> None:
    client = rec.openai(llama_server)
    with pytest.raises(openai.BadRequestError) as completion_error:
        client.completions.create(model=MODEL, prompt="x", max_tokens=2, top_p=1.5)
    assert completion_error.value.param == "top_p"  # type: ignore[attr-defined]
    with pytest.raises(openai.BadRequestError) as chat_error:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2,
                                       extra_body={"allowed_token_ids": [10**7]})
    assert chat_error.value.param == "allowed_token_ids"  # type: ignore[attr-defined]

    async def main() -> Any:
        async with rec.async_openai(llama_server) as async_client:
            with pytest.raises(openai.BadRequestError) as async_error:
                await async_client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True,
                                                           extra_body={"use_beam_search": True})
            return async_error.value

    assert asyncio.run(main()).param == "stream"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="x")


def test_a_stream_that_fails_after_its_headers(llama_server: ConveyorServer, rec: Recorder) -> None:
    """A request the workers reject (a logits processor's bad arguments) after the stream started: chat and
    completions send the error shape as a data line, then [DONE] (the SDK raises it); Responses sends an `error`
    event, then response.failed."""
    bad_xargs = {"vllm_xargs": {"logits_processors": ["ban_tokens"], "banned_token_ids": "not ids"}}
    client = rec.openai(llama_server)
    with pytest.raises(openai.APIError) as completion_error:
        list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3, stream=True, extra_body=bad_xargs))
    assert completion_error.value.body["param"] == "vllm_xargs"  # type: ignore[index]
    with pytest.raises(openai.APIError) as chat_error:
        list(client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=3, stream=True,
                                            extra_body=bad_xargs))
    assert chat_error.value.body["param"] == "vllm_xargs"  # type: ignore[index]
    with rec.http(llama_server) as http:
        with http.stream("POST", "/v1/chat/completions", json={"model": MODEL, "messages": MESSAGES, "max_tokens": 3,
                                                                "stream": True, **bad_xargs}) as response:
            response.read()
    raw = rec.last("/v1/chat/completions")
    assert raw.complete and raw.text.endswith("data: [DONE]\n\n") and raw.events[-1]["error"]["code"] == 400
    events = list(client.responses.create(model=MODEL, input="hi", max_output_tokens=3, stream=True,
                                          extra_body=bad_xargs))
    assert [event.type for event in events[-2:]] == ["error", "response.failed"]
    assert events[-1].response.error is not None  # type: ignore[union-attr]


def test_the_server_still_serves_after_the_bad_requests(llama_server: ConveyorServer, rec: Recorder) -> None:
    client = rec.openai(llama_server)
    completion = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, extra_body={"ignore_eos": True})
    assert completion.usage is not None and completion.usage.completion_tokens == 4
    chunks = list(client.chat.completions.create(model=MODEL, messages=MESSAGES, max_completion_tokens=4,
                                                 stream=True, extra_body={"ignore_eos": True}))
    assert [c.finish_reason for chunk in chunks for c in chunk.choices if c.finish_reason] == ["length"]
    assert client.responses.create(model=MODEL, input="hi", max_output_tokens=2).status in ("completed", "incomplete")
