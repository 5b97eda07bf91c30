"""OpenAI conformance of invalid requests: each is a 400 in the OpenAI error shape naming the field (chat,
completions and Responses), the client raises it with its `param`, a stream that fails after its headers ends in
the error shape, and the server still serves afterwards. Each body is validated by the `rec` fixture
(tests/e2e/conftest.py), on the shared `llama_server`.
"""
from __future__ import annotations

import asyncio
from typing import Any

import openai
import pytest

from tests.conformance_validation import Recorder
from tests.e2e.conformance_harness import MESSAGES, MODEL, PROMPT, TOOLS
from tests.server_harness import ConveyorServer

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
