"""OpenAI conformance: the official `openai` client (sync and async, streamed and not) and plain HTTP through every
route and request field, every raw body and stream chunk validated strictly against the SDK's own types.

All traffic goes through `tests/conformance_validation.Recorder`, whose transport tees each response body and runs
`model_validate(raw, strict=True)` with the matching `openai.types` class (plus a type check of every vLLM extra
field, tests/schema_validation.py); the `rec` fixture (tests/e2e/conftest.py) fails the test if any body broke
them. This file: the validator itself, /v1/models, the plain routes and /v1/responses on the shared `llama_server`.
The other routes: test_conformance_completions.py, test_conformance_chat.py, test_conformance_tools.py (a server
with auto tool choice and the Responses store) and test_conformance_errors.py (invalid requests).
"""
from __future__ import annotations

import asyncio
import copy
import json
from typing import Any

import openai
import pytest
from pydantic import ValidationError

from tests.conformance_validation import Recorder
from tests.e2e.conformance_harness import CITY_SCHEMA, MESSAGES, MODEL, PROMPT, extra
from tests.schema_validation import validate_chat_chunk, validate_completion, validate_completion_chunk, validate_error
from tests.server_harness import ConveyorServer


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
