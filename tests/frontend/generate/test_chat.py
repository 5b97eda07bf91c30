"""/v1/chat/completions through a real HTTP server and the `openai` client, against the fake engine core."""
from __future__ import annotations

import json
from typing import Iterator

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from frontend.tokenizer import TokenizerInfo
from tests.frontend.conftest import MAX_MODEL_LEN, SERVED_NAME, FrontendHarness, model_dir
from tests.frontend.fake_core import FakeCore

USER = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def qwen2(core: FakeCore) -> Iterator[FrontendHarness]:
    harness = FrontendHarness(core, model="qwen2")
    yield harness
    harness.stop()


def rendered(tokenizer_name: str, text: str) -> list[int]:
    return TokenizerInfo(str(model_dir(tokenizer_name))).encode(text, add_special_tokens=False)


def test_basic_chat_and_default_max_tokens(client: openai.OpenAI, core: FakeCore) -> None:
    completion = client.chat.completions.create(model=SERVED_NAME, messages=USER)  # type: ignore[arg-type]
    message = completion.choices[0].message
    assert message.role == "assistant" and message.content and message.content.startswith("Hello world!")
    request = core.requests[-1]
    assert request.request_id == f"{completion.id}-0"
    assert request.sampling_params.max_tokens == MAX_MODEL_LEN - len(request.prompt_token_ids)
    system = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    expected = rendered("llama", system + "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    assert request.prompt_token_ids == expected  # no special tokens added a second time


def test_parts_content_for_a_parts_template(qwen2: FrontendHarness, core: FakeCore) -> None:
    messages = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    qwen2.openai().chat.completions.create(model=SERVED_NAME, messages=messages, max_tokens=2)  # type: ignore[arg-type]
    expected = rendered("qwen2", "<|im_start|>user\nab<|im_end|>\n<|im_start|>assistant\n")
    assert core.requests[-1].prompt_token_ids == expected


def test_parts_content_joined_for_a_string_template(client: openai.OpenAI, core: FakeCore) -> None:
    messages = [{"role": "system", "content": "S"},
                {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    client.chat.completions.create(model=SERVED_NAME, messages=messages, max_tokens=2)  # type: ignore[arg-type]
    expected = rendered("llama", "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\na\nb<|im_end|>\n"
                                 "<|im_start|>assistant\n")
    assert core.requests[-1].prompt_token_ids == expected


def test_raw_response_validates(http: httpx.Client) -> None:
    response = http.post("/v1/chat/completions", json={"model": SERVED_NAME, "messages": USER, "max_tokens": 3,
                                                       "n": 2, "logprobs": True, "top_logprobs": 3})
    assert response.status_code == 200
    completion = ChatCompletion.model_validate(response.json())
    assert sorted(choice.index for choice in completion.choices) == [0, 1]
    logprobs = completion.choices[0].logprobs
    assert logprobs is not None and logprobs.content is not None and len(logprobs.content) == 3
    first = logprobs.content[0]
    assert (first.token, first.logprob, first.bytes) == ("Hello", -0.5, list(b"Hello"))
    assert len(first.top_logprobs) == 3 and first.top_logprobs[0].token == "Hello"
    assert completion.usage is not None and completion.usage.completion_tokens == 6


def test_logprob_bytes_of_split_characters(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(model=SERVED_NAME, messages=USER, max_tokens=5,  # type: ignore
                                                logprobs=True)
    content = completion.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None
    assert bytes(content[3].bytes + content[4].bytes) == " Ü".encode()  # type: ignore[operator]
    assert all(entry.top_logprobs == [] for entry in content)


def test_streaming_shape(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(model=SERVED_NAME, messages=USER, max_tokens=6, stream=True,  # type: ignore
                                            stream_options={"include_usage": True})
    chunks: list[ChatCompletionChunk] = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].choices[0].delta.content == ""
    assert chunks[-1].choices == [] and chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 6
    body = chunks[1:-1]
    assert all(chunk.choices[0].delta.role is None for chunk in body)
    assert body[-1].choices[0].finish_reason == "length"
    assert all(chunk.choices[0].finish_reason is None for chunk in body[:-1])
    assert "".join(chunk.choices[0].delta.content or "" for chunk in body) == "Hello world! Ün"


def test_stream_without_usage_and_done_marker(http: httpx.Client) -> None:
    body = {"model": SERVED_NAME, "messages": USER, "max_tokens": 2, "stream": True}
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert all("usage" not in json.loads(line[6:]) for line in lines[:-1])


def test_max_completion_tokens_and_stop(client: openai.OpenAI, core: FakeCore) -> None:
    completion = client.chat.completions.create(model=SERVED_NAME, messages=USER,  # type: ignore[arg-type]
                                                max_completion_tokens=30, stop="!")
    assert core.requests[-1].sampling_params.max_tokens == 30
    assert completion.choices[0].message.content == "Hello world"
    assert completion.choices[0].finish_reason == "stop"


def test_echo_and_continue_final_message(client: openai.OpenAI, core: FakeCore) -> None:
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Sure:"}]
    completion = client.chat.completions.create(
        model=SERVED_NAME, messages=messages, max_tokens=2,  # type: ignore[arg-type]
        extra_body={"echo": True, "add_generation_prompt": False, "continue_final_message": True})
    assert completion.choices[0].message.content == "Sure:Hello world"
    prompt = TokenizerInfo(str(model_dir("llama"))).decode(core.requests[-1].prompt_token_ids, False)
    assert prompt.endswith("<|im_start|>assistant\nSure:")


def test_template_kwargs_tools_and_documents_reach_the_template(core: FakeCore) -> None:
    template = ("{{ messages[0]['content'] }}|{{ tools | length }}|{{ documents | length }}|{{ custom }}"
                "{% if add_generation_prompt %}>{% endif %}")
    harness = FrontendHarness(core, chat_template=template)
    try:
        harness.openai().chat.completions.create(
            model=SERVED_NAME, messages=USER, max_tokens=1,  # type: ignore[arg-type]
            tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}], tool_choice="none",
            extra_body={"documents": [{"text": "d1"}, {"text": "d2"}], "chat_template_kwargs": {"custom": "C"}})
    finally:
        harness.stop()
    assert core.requests[-1].prompt_token_ids == rendered("llama", "hi|1|2|C>")


def test_continuous_usage_stats(http: httpx.Client) -> None:
    body = {"model": SERVED_NAME, "messages": USER, "max_tokens": 3, "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        chunks = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
    completion_tokens = [chunk["usage"]["completion_tokens"] for chunk in chunks]
    assert completion_tokens == sorted(completion_tokens) and completion_tokens[-1] == 3


def test_return_token_ids(client: openai.OpenAI, http: httpx.Client, core: FakeCore) -> None:
    completion = client.chat.completions.create(model=SERVED_NAME, messages=USER, max_tokens=4,  # type: ignore
                                                extra_body={"return_token_ids": True})
    assert (completion.choices[0].model_extra or {})["token_ids"] == core.canned_token_ids[:4]
    assert (completion.model_extra or {})["prompt_token_ids"] == core.requests[-1].prompt_token_ids
    body = {"model": SERVED_NAME, "messages": USER, "max_tokens": 4, "stream": True, "return_token_ids": True}
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        chunks = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
    assert "prompt_token_ids" in chunks[0] and "prompt_token_ids" not in chunks[1]
    assert [t for c in chunks[1:] for t in c["choices"][0]["token_ids"]] == core.canned_token_ids[:4]


def test_streaming_echo_n_and_stop(http: httpx.Client) -> None:
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Sure:"}]
    body = {"model": SERVED_NAME, "messages": messages, "max_tokens": 20, "n": 2, "stream": True, "echo": True,
            "add_generation_prompt": False, "stop": ["!"]}
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        chunks = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
    for index in (0, 1):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == index]
        assert mine[0]["delta"] == {"role": "assistant", "content": ""}
        assert "".join(c["delta"].get("content", "") for c in mine) == "Sure:Hello world"
        assert mine[-1]["finish_reason"] == "stop" and mine[-1]["stop_reason"] == "!"
