"""Greedy outputs equal transformers token for token; chosen-token logprobs within 1e-3 (float32).

Runs for both tiny checkpoints and for the embedded SmolLM2 (its GGUF served quantized, the default), alone and with
32 requests in flight at once.
"""
from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Iterator

import pytest

from tests.reference import greedy_reference
from tests.server_harness import ConveyorServer

LOGPROB_TOLERANCE = 1e-3
MAX_TOKENS = 12
PROMPTS = [
    "The capital of France is",
    "Hello",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "def fibonacci(n):",
    "1, 2, 3, 4,",
    "Translate to German: The weather is nice today.",
    "Q: What is the boiling point of water?\nA:",
    "Les plus belles choses de la vie sont",
]


@pytest.fixture(scope="module", params=["llama", "qwen2", "smollm2"])
def served(request: pytest.FixtureRequest, tiny_models: Path) -> Iterator[tuple[ConveyorServer, str, str]]:
    """(server, served model name, path the reference loads)."""
    if request.param == "llama":
        server = request.getfixturevalue("llama_server")
        yield server, "tiny-llama", str(tiny_models / "llama")
        return
    if request.param == "qwen2":
        server = ConveyorServer(str(tiny_models / "qwen2"), "--kv-cache-memory", "64MiB", "--max-model-len", "512")
        yield server, str(tiny_models / "qwen2"), str(tiny_models / "qwen2")
    else:
        from conveyor.model_source import default_model_path

        server = ConveyorServer(None, "--kv-cache-memory", "256MiB", "--max-model-len", "1024")
        yield server, "SmolLM2-135M-Instruct", default_model_path()
    server.stop()


def _complete(client, model: str, prompt: str):  # noqa: ANN001
    return client.completions.create(model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                                     logprobs=1, extra_body={"return_token_ids": True})


def _assert_matches_reference(choice, reference_path: str, prompt: str) -> None:  # noqa: ANN001
    expected_ids, expected_logprobs, expected_text = greedy_reference(reference_path, prompt, MAX_TOKENS)
    token_ids = (choice.model_extra or {}).get("token_ids")
    assert token_ids == expected_ids, f"prompt {prompt!r}: {token_ids} != {expected_ids}"
    assert choice.text == expected_text
    got = choice.logprobs.token_logprobs
    assert len(got) == len(expected_logprobs)
    for position, (actual, expected) in enumerate(zip(got, expected_logprobs)):
        assert abs(actual - expected) < LOGPROB_TOLERANCE, f"{prompt!r} position {position}: {actual} vs {expected}"


def test_greedy_matches_transformers(served: tuple[ConveyorServer, str, str]) -> None:
    server, model, reference_path = served
    client = server.openai_client()
    for prompt in PROMPTS:
        _assert_matches_reference(_complete(client, model, prompt).choices[0], reference_path, prompt)


def test_concurrent_requests_give_identical_results(served: tuple[ConveyorServer, str, str]) -> None:
    server, model, _ = served
    client = server.openai_client()
    sequential = {prompt: _complete(client, model, prompt).choices[0] for prompt in PROMPTS}

    async def run_all():
        async_client = server.async_openai_client()
        prompts = PROMPTS * 4  # 32 requests in flight together
        responses = await asyncio.gather(*[
            async_client.completions.create(model=model, prompt=p, max_tokens=MAX_TOKENS, temperature=0, logprobs=1,
                                            extra_body={"return_token_ids": True}) for p in prompts])
        return list(zip(prompts, responses))

    for prompt, response in asyncio.run(run_all()):
        choice, alone = response.choices[0], sequential[prompt]
        assert choice.text == alone.text
        assert (choice.model_extra or {}).get("token_ids") == (alone.model_extra or {}).get("token_ids")
        for a, b in zip(choice.logprobs.token_logprobs, alone.logprobs.token_logprobs):
            assert abs(a - b) < LOGPROB_TOLERANCE
