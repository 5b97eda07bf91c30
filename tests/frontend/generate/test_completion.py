"""/v1/completions through a real HTTP server and the `openai` client, against the fake engine core."""
from __future__ import annotations

import json

import httpx
import openai
from openai.types import Completion

from frontend.tokenizer import TokenizerInfo
from tests.frontend.conftest import CANNED_TEXT, SERVED_NAME, FrontendHarness, model_dir
from tests.frontend.fake_core import FakeCore


def canned_text(num_tokens: int) -> str:
    """What the fake core's first `num_tokens` tokens decode to (the tail may be half a character)."""
    tokenizer = TokenizerInfo(str(model_dir("llama")))
    return tokenizer.decode(tokenizer.encode(CANNED_TEXT, False)[:num_tokens])


def sse_payloads(response: httpx.Response) -> list[str]:
    return [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]


def test_basic_completion(client: openai.OpenAI, core: FakeCore) -> None:
    completion = client.completions.create(model=SERVED_NAME, prompt="Once upon", max_tokens=4)
    assert completion.choices[0].text == canned_text(4) == "Hello world! \ufffd"  # cut inside "Ü"
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage is not None and completion.usage.completion_tokens == 4
    request = core.requests[-1]
    assert request.request_id == f"{completion.id}-0" and request.eos_token_id == 2
    assert request.sampling_params.temperature == 0.7  # from generation_config.json
    assert completion.usage.prompt_tokens == len(request.prompt_token_ids)
    assert completion.usage.prompt_tokens_details is not None
    assert completion.usage.prompt_tokens_details.cached_tokens == len(request.prompt_token_ids) // 2


def test_raw_response_validates_and_defaults_to_16_tokens(http: httpx.Client) -> None:
    response = http.post("/v1/completions", json={"model": SERVED_NAME, "prompt": "x"})
    assert response.status_code == 200
    completion = Completion.model_validate(response.json())
    assert completion.usage is not None and completion.usage.completion_tokens == 16
    assert completion.choices[0].text == canned_text(16)


def test_prompt_forms(client: openai.OpenAI, core: FakeCore) -> None:
    tokenizer = TokenizerInfo(str(model_dir("llama")))
    ids_a, ids_b = tokenizer.encode("alpha", True), tokenizer.encode("beta gamma", True)
    for prompt, expected in [("alpha", [ids_a]), (["alpha", "beta gamma"], [ids_a, ids_b]),
                             (ids_a, [ids_a]), ([ids_a, ids_b], [ids_a, ids_b])]:
        before = len(core.requests)
        completion = client.completions.create(model=SERVED_NAME, prompt=prompt, max_tokens=2)
        assert [choice.index for choice in completion.choices] == list(range(len(expected)))
        assert [r.prompt_token_ids for r in core.requests[before:]] == expected
        assert completion.usage is not None
        assert completion.usage.prompt_tokens == sum(len(ids) for ids in expected)


def test_n_fans_out_with_distinct_seeds(client: openai.OpenAI, core: FakeCore) -> None:
    before = len(core.requests)
    completion = client.completions.create(model=SERVED_NAME, prompt="x", max_tokens=3, n=3, seed=5)
    requests = sorted(core.requests[before:], key=lambda r: r.request_id)
    assert [r.request_id for r in requests] == [f"{completion.id}-{i}" for i in range(3)]
    assert [r.sampling_params.seed for r in requests] == [5, 6, 7]
    assert sorted(choice.index for choice in completion.choices) == [0, 1, 2]
    assert completion.usage is not None and completion.usage.completion_tokens == 9


def test_echo(client: openai.OpenAI) -> None:
    completion = client.completions.create(model=SERVED_NAME, prompt="Echo me", max_tokens=2, echo=True)
    assert completion.choices[0].text == "Echo meHello world"


def test_legacy_logprobs_shape(client: openai.OpenAI) -> None:
    completion = client.completions.create(model=SERVED_NAME, prompt="x", max_tokens=5, logprobs=2)
    logprobs = completion.choices[0].logprobs
    assert logprobs is not None and logprobs.tokens is not None and logprobs.top_logprobs is not None
    assert logprobs.tokens[:3] == ["Hello", " world", "!"]
    assert logprobs.token_logprobs == [-0.5] * 5
    assert all(logprobs.tokens[i] in top and top[logprobs.tokens[i]] == -0.5 and 1 <= len(top) <= 2
               for i, top in enumerate(logprobs.top_logprobs))
    assert logprobs.text_offset == [0, 5, 11, 12, 12]  # the 5th token completes the "Ü" begun by the 4th


def test_stop_string_truncates_and_aborts_the_engine_request(client: openai.OpenAI, core: FakeCore) -> None:
    completion = client.completions.create(model=SERVED_NAME, prompt="x", max_tokens=40, stop=["日本", "zzz"])
    choice = completion.choices[0]
    assert choice.text == CANNED_TEXT[:CANNED_TEXT.index("日本")]
    assert choice.finish_reason == "stop" and choice.model_extra["stop_reason"] == "日本"
    assert core.wait_for(lambda: f"{completion.id}-0" in core.aborted)


def test_streaming_matches_non_streaming(client: openai.OpenAI) -> None:
    full = client.completions.create(model=SERVED_NAME, prompt="x", max_tokens=12).choices[0].text
    chunks = list(client.completions.create(model=SERVED_NAME, prompt="x", max_tokens=12, stream=True))
    assert "".join(chunk.choices[0].text for chunk in chunks) == full
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all("\ufffd" not in chunk.choices[0].text for chunk in chunks[:-1])


def test_stream_include_usage_and_done(http: httpx.Client) -> None:
    body = {"model": SERVED_NAME, "prompt": "x", "max_tokens": 3, "n": 2, "stream": True,
            "stream_options": {"include_usage": True}}
    with http.stream("POST", "/v1/completions", json=body) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        payloads = sse_payloads(response)
    assert payloads[-1] == "[DONE]"
    final = json.loads(payloads[-2])
    assert final["choices"] == [] and final["usage"]["completion_tokens"] == 6
    chunks = [json.loads(p) for p in payloads[:-2]]
    assert {c["choices"][0]["index"] for c in chunks} == {0, 1}
    assert sum(c["choices"][0]["finish_reason"] == "length" for c in chunks) == 2


def test_sampling_fields_reach_the_engine(client: openai.OpenAI, core: FakeCore) -> None:
    client.completions.create(
        model=SERVED_NAME, prompt="x", max_tokens=2, temperature=0.0, top_p=0.5, presence_penalty=0.5,
        frequency_penalty=-0.5, logit_bias={"7": 3.0}, user="u",
        extra_body={"top_k": 4, "min_p": 0.1, "repetition_penalty": 1.2, "stop_token_ids": [9], "ignore_eos": True,
                    "min_tokens": 1, "priority": -2, "cache_salt": "salt", "not_a_field": 1})
    request = core.requests[-1]
    params = request.sampling_params
    assert (params.temperature, params.top_p, params.top_k, params.min_p) == (0.0, 0.5, 4, 0.1)
    assert (params.presence_penalty, params.frequency_penalty, params.repetition_penalty) == (0.5, -0.5, 1.2)
    assert params.stop_token_ids == [9] and params.ignore_eos and params.min_tokens == 1
    assert params.logit_bias == {7: 3.0}
    assert (request.priority, request.cache_salt) == (-2, "salt")


def test_multiple_tokens_per_output_and_eos_stop(frontend: FrontendHarness, core: FakeCore) -> None:
    tokenizer = TokenizerInfo(str(model_dir("llama")))
    core.script = lambda request: (tokenizer.encode("Done here", False) + [2], "stop", 2)
    core.tokens_per_output = 2
    try:
        completion = frontend.openai().completions.create(model=SERVED_NAME, prompt="x", max_tokens=10,
                                                          extra_body={"skip_special_tokens": False})
    finally:
        core.script, core.tokens_per_output = None, 1
    choice = completion.choices[0]
    assert choice.text == "Done here" and choice.finish_reason == "stop" and choice.model_extra["stop_reason"] == 2


def test_return_token_ids(client: openai.OpenAI, http: httpx.Client, core: FakeCore) -> None:
    canned = core.canned_token_ids
    completion = client.completions.create(model=SERVED_NAME, prompt="x", max_tokens=5,
                                           extra_body={"return_token_ids": True})
    extra = completion.choices[0].model_extra or {}
    assert extra["token_ids"] == canned[:5] and extra["prompt_token_ids"] == core.requests[-1].prompt_token_ids
    body = {"model": SERVED_NAME, "prompt": "x", "max_tokens": 5, "stream": True, "return_token_ids": True}
    with http.stream("POST", "/v1/completions", json=body) as response:
        chunks = [json.loads(p) for p in sse_payloads(response)[:-1]]
    assert [t for c in chunks for t in c["choices"][0]["token_ids"]] == canned[:5]
    assert "prompt_token_ids" in chunks[0]["choices"][0] and "prompt_token_ids" not in chunks[1]["choices"][0]
