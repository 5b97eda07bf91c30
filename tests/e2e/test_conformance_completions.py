"""OpenAI conformance of /v1/completions: the official `openai` client (sync and async, streamed and not) with every
request field, OpenAI's and vLLM's, each body validated by the `rec` fixture (tests/e2e/conftest.py), on the shared
`llama_server`.
"""
from __future__ import annotations

import asyncio
from typing import Any

import openai

from tests.conformance_validation import Recorder
from tests.e2e.conformance_harness import MODEL, PROMPT, extra
from tests.server_harness import ConveyorServer

GREEDY: dict[str, Any] = dict(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0)


# --------------------------------------------------------------------------- request fields, one step each


def check_sampling_fields(client: openai.OpenAI, rec: Recorder) -> None:
    """OpenAI's sampling fields, n, seed and user, plus vLLM's sampling knobs."""
    knobs: dict[str, Any] = dict(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0.8, top_p=0.9, n=2,
                                 presence_penalty=0.5, frequency_penalty=0.5, seed=11, user="conformance",
                                 extra_body={"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1,
                                             "cache_salt": "salt", "priority": 1})
    sampled = client.completions.create(**knobs)
    assert [choice.index for choice in sampled.choices] == [0, 1]
    assert [c.text for c in client.completions.create(**knobs).choices] == [c.text for c in sampled.choices]
    assert rec.last("/v1/completions").request["top_k"] == 20


def check_stop_strings(client: openai.OpenAI, text: str) -> None:
    """Stop strings, with and without the stop string in the output."""
    stop = text[len(text) // 2:len(text) // 2 + 3]
    stopped = client.completions.create(**GREEDY, stop=[stop])
    assert stopped.choices[0].finish_reason == "stop" and extra(stopped.choices[0], "stop_reason") == stop
    assert stopped.choices[0].text == text[:text.index(stop)]
    kept = client.completions.create(**GREEDY, stop=stop, extra_body={"include_stop_str_in_output": True})
    assert kept.choices[0].text == text[:text.index(stop) + len(stop)]


def check_echoed_logprobs(client: openai.OpenAI, text: str) -> None:
    """logprobs with echo: the prompt comes first, the lists run in step with the generated tokens."""
    echoed = client.completions.create(**GREEDY, logprobs=3, echo=True, extra_body={"ignore_eos": True})
    logprobs = echoed.choices[0].logprobs
    assert echoed.choices[0].text == PROMPT + text and logprobs is not None and logprobs.tokens is not None
    assert len(logprobs.tokens) == 6 and all(len(top) <= 4 for top in logprobs.top_logprobs or [])


def check_token_controls(client: openai.OpenAI, ids: list[int]) -> None:
    """logit_bias, stop_token_ids, min_tokens, the ban_tokens logits processor."""
    biased = client.completions.create(**GREEDY, logit_bias={str(ids[0]): -100}, extra_body={"return_token_ids": True})
    assert extra(biased.choices[0], "token_ids")[0] != ids[0]
    stop_id = client.completions.create(**GREEDY, extra_body={"stop_token_ids": [ids[1]]})
    assert stop_id.choices[0].finish_reason == "stop" and extra(stop_id.choices[0], "stop_reason") == ids[1]
    at_least = client.completions.create(**GREEDY, extra_body={"stop_token_ids": [ids[0]], "min_tokens": 3})
    assert at_least.usage is not None and at_least.usage.completion_tokens >= 3
    banned = client.completions.create(**GREEDY, extra_body={
        "return_token_ids": True, "vllm_xargs": {"logits_processors": ["ban_tokens"], "banned_token_ids": [ids[0]]}})
    assert ids[0] not in extra(banned.choices[0], "token_ids")


def check_prompt_handling(client: openai.OpenAI, text: str, prompt_ids: list[int]) -> None:
    """truncate_prompt_tokens, add_special_tokens, token-id and batched prompts."""
    truncated = client.completions.create(**GREEDY, extra_body={"truncate_prompt_tokens": 3})
    assert truncated.usage is not None and truncated.usage.prompt_tokens == 3
    client.completions.create(**GREEDY, extra_body={"add_special_tokens": False, "skip_special_tokens": False,
                                                    "ignore_eos": True})
    batch = client.completions.create(model=MODEL, prompt=[PROMPT, "Hello"], max_tokens=3, temperature=0, n=2)
    assert sorted(choice.index for choice in batch.choices) == [0, 1, 2, 3]
    from_ids = client.completions.create(model=MODEL, prompt=prompt_ids, max_tokens=6, temperature=0,
                                         extra_body={"ignore_eos": True})
    assert from_ids.choices[0].text == text


def check_vllm_extras(client: openai.OpenAI, ids: list[int]) -> None:
    """allowed_token_ids, bad_words, prompt_logprobs, request_id, return_tokens_as_token_ids."""
    allowed = client.completions.create(**GREEDY, extra_body={"allowed_token_ids": ids[2:4], "return_token_ids": True})
    assert set(extra(allowed.choices[0], "token_ids")) <= set(ids[2:4])
    client.completions.create(**GREEDY, extra_body={"bad_words": ["fox", " lazy dog"]})
    with_prompt = client.completions.create(**GREEDY, extra_body={"prompt_logprobs": 2, "request_id": "conf-7"})
    assert with_prompt.id == "cmpl-conf-7" and with_prompt.usage is not None
    assert len(extra(with_prompt.choices[0], "prompt_logprobs")) == with_prompt.usage.prompt_tokens
    as_ids = client.completions.create(**GREEDY, logprobs=1, extra_body={"return_tokens_as_token_ids": True})
    assert as_ids.choices[0].logprobs is not None
    assert all(token.startswith("token_id:") for token in as_ids.choices[0].logprobs.tokens or [])


def check_constrained_outputs(client: openai.OpenAI, ids: list[int]) -> None:
    """repetition_detection stops a forced loop; structured_outputs; beam search with length_penalty."""
    looped = client.completions.create(**{**GREEDY, "max_tokens": 30}, extra_body={
        "allowed_token_ids": [ids[0]], "repetition_detection": {"min_pattern_len": 1, "max_pattern_len": 2,
                                                                "min_repeats": 4}})
    assert looped.choices[0].finish_reason == "stop"
    assert extra(looped.choices[0], "stop_reason").startswith("repetition detected")
    chosen = client.completions.create(**GREEDY, extra_body={"structured_outputs": {"choice": ["red", "green"]}})
    assert chosen.choices[0].text in ("red", "green")
    regex = client.completions.create(**{**GREEDY, "max_tokens": 12},
                                      extra_body={"structured_outputs": {"regex": r" \d{3}-\d{4}"}})
    assert regex.choices[0].finish_reason == "stop" and len(regex.choices[0].text) == 9
    beams = client.completions.create(**GREEDY, n=2, extra_body={"use_beam_search": True, "length_penalty": 0.7})
    assert sorted(choice.index for choice in beams.choices) == [0, 1]


# --------------------------------------------------------------------------- the tests


def test_completions_request_fields(llama_server: ConveyorServer, rec: Recorder) -> None:
    client = rec.openai(llama_server)
    base = client.completions.create(**GREEDY, extra_body={"return_token_ids": True, "ignore_eos": True})
    ids, text = extra(base.choices[0], "token_ids"), base.choices[0].text
    assert len(ids) == 6 and base.usage is not None and base.usage.completion_tokens == 6
    assert extra(base.choices[0], "prompt_token_ids")
    check_sampling_fields(client, rec)
    check_stop_strings(client, text)
    check_echoed_logprobs(client, text)
    check_token_controls(client, ids)
    check_prompt_handling(client, text, extra(base.choices[0], "prompt_token_ids"))
    check_vllm_extras(client, ids)
    check_constrained_outputs(client, ids)


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
