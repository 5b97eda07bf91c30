"""The OpenAI surface end to end on real processes: chat, streaming, n, stop strings, tokenize, metrics."""
from __future__ import annotations

from typing import Iterator

import httpx
import pytest

from tests.server_harness import ConveyorServer

MODEL = "tiny-llama"


@pytest.fixture(scope="module")
def smollm2_server() -> Iterator[ConveyorServer]:
    server = ConveyorServer(None, "--kv-cache-memory", "256MiB", "--max-model-len", "2048")
    yield server
    server.stop()


def test_default_model_answers_a_chat_question(smollm2_server: ConveyorServer) -> None:
    client = smollm2_server.openai_client()
    assert [m.id for m in client.models.list().data] == ["SmolLM2-135M-Instruct"]
    response = client.chat.completions.create(
        model="SmolLM2-135M-Instruct", temperature=0, max_tokens=20,
        messages=[{"role": "user", "content": "What is the capital of France?"}])
    assert "Paris" in response.choices[0].message.content
    assert response.choices[0].message.role == "assistant"
    assert response.usage.prompt_tokens > 10


def test_chat_streaming_joins_to_the_non_streamed_answer(smollm2_server: ConveyorServer) -> None:
    client = smollm2_server.openai_client()
    messages = [{"role": "user", "content": [{"type": "text", "text": "Name three colors."}]}]
    whole = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=messages, temperature=0,
                                           max_tokens=24)
    chunks = list(client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=messages, temperature=0,
                                                 max_tokens=24, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_completion_n_and_stop_strings(llama_server: ConveyorServer) -> None:
    client = llama_server.openai_client()
    full = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=12,
                                     temperature=0).choices[0].text
    stop = full[len(full) // 2:len(full) // 2 + 3]
    stopped = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=12,
                                        temperature=0, stop=[stop])
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].text == full[:full.index(stop)]
    sampled = client.completions.create(model=MODEL, prompt="Once", max_tokens=8, temperature=1.0, n=3, seed=7)
    assert sorted(c.index for c in sampled.choices) == [0, 1, 2]
    again = client.completions.create(model=MODEL, prompt="Once", max_tokens=8, temperature=1.0, n=3, seed=7)
    assert [c.text for c in sampled.choices] == [c.text for c in again.choices]


def test_prompt_forms_and_echo(llama_server: ConveyorServer) -> None:
    client = llama_server.openai_client()
    ids = httpx.post(f"{llama_server.base_url}/tokenize", json={"model": MODEL, "prompt": "Hello world"}).json()
    assert ids["count"] == len(ids["tokens"]) > 0
    from_text = client.completions.create(model=MODEL, prompt="Hello world", max_tokens=5, temperature=0)
    from_ids = client.completions.create(model=MODEL, prompt=ids["tokens"], max_tokens=5, temperature=0)
    assert from_text.choices[0].text == from_ids.choices[0].text
    batch = client.completions.create(model=MODEL, prompt=["Hello world", "Bye"], max_tokens=5, temperature=0)
    assert batch.choices[0].text == from_text.choices[0].text and len(batch.choices) == 2
    echoed = client.completions.create(model=MODEL, prompt="Hello world", max_tokens=5, temperature=0, echo=True)
    assert echoed.choices[0].text == "Hello world" + from_text.choices[0].text
    detok = httpx.post(f"{llama_server.base_url}/detokenize", json={"model": MODEL, "tokens": ids["tokens"]}).json()
    assert detok["prompt"] == "Hello world"


def test_metrics_and_version(llama_server: ConveyorServer) -> None:
    llama_server.openai_client().completions.create(model=MODEL, prompt="Hi", max_tokens=2)
    metrics = llama_server.metrics()
    for name in ["conveyor:num_requests_running", "conveyor:num_requests_waiting", "conveyor:kv_cache_usage_perc",
                 "conveyor:prompt_tokens_total", "conveyor:generation_tokens_total",
                 "conveyor:time_to_first_token_seconds_count", "conveyor:time_per_output_token_seconds_count",
                 "conveyor:e2e_request_latency_seconds_count"]:
        assert any(key.split("{")[0] == name for key in metrics), name
    assert httpx.get(f"{llama_server.base_url}/version").json()["version"]
