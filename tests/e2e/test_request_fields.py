"""vLLM's request extras handled in the frontend: request_id, truncate_prompt_tokens, stream_interval,
return_tokens_as_token_ids (on the shared tiny-Llama server)."""
from __future__ import annotations

import threading

import httpx

from tests.server_harness import ConveyorServer

MODEL = "tiny-llama"
PROMPT = "The quick brown fox jumps over the lazy dog because it wanted to see"


def _complete(server: ConveyorServer, **fields: object) -> httpx.Response:
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 6, "temperature": 0, **fields}
    return httpx.post(f"{server.base_url}/v1/completions", json=body, timeout=60)


def test_request_id_is_echoed_in_the_response_id(llama_server: ConveyorServer) -> None:
    assert _complete(llama_server, request_id="my-id-1").json()["id"] == "cmpl-my-id-1"
    chat = llama_server.openai_client().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3, extra_body={"request_id": "abc"})
    assert chat.id == "chatcmpl-abc"
    response = httpx.post(f"{llama_server.base_url}/v1/completions", timeout=60, headers={"X-Request-Id": "hdr-7"},
                          json={"model": MODEL, "prompt": PROMPT, "max_tokens": 2})
    assert response.json()["id"] == "cmpl-hdr-7"


def test_a_request_id_in_use_is_a_400(llama_server: ConveyorServer) -> None:
    started = threading.Event()

    def long_stream() -> None:
        with httpx.stream("POST", f"{llama_server.base_url}/v1/completions", timeout=120, json={
                "model": MODEL, "prompt": PROMPT, "max_tokens": 400, "stream": True, "ignore_eos": True,
                "request_id": "dup"}) as response:
            for _ in response.iter_lines():
                started.set()

    worker = threading.Thread(target=long_stream)
    worker.start()
    try:
        assert started.wait(60)
        response = _complete(llama_server, request_id="dup")
        assert response.status_code == 400, response.text
        assert response.json()["error"]["param"] == "request_id"
    finally:
        worker.join(timeout=120)
    assert _complete(llama_server, request_id="dup").status_code == 200  # free again once the first ended


def test_truncate_prompt_tokens_keeps_the_last_tokens(llama_server: ConveyorServer) -> None:
    ids = httpx.post(f"{llama_server.base_url}/tokenize", json={"model": MODEL, "prompt": PROMPT}).json()["tokens"]
    truncated = _complete(llama_server, truncate_prompt_tokens=5).json()
    assert truncated["usage"]["prompt_tokens"] == 5
    assert truncated["choices"][0]["text"] == _complete(llama_server, prompt=ids[-5:]).json()["choices"][0]["text"]
    assert _complete(llama_server, truncate_prompt_tokens=-1).json()["usage"]["prompt_tokens"] == len(ids)
    too_long = _complete(llama_server, truncate_prompt_tokens=100_000)
    assert too_long.status_code == 400 and too_long.json()["error"]["param"] == "truncate_prompt_tokens"


def test_stream_interval_sends_chunks_of_n_tokens(llama_server: ConveyorServer) -> None:
    client = llama_server.openai_client()
    expected = _complete(llama_server, max_tokens=13, ignore_eos=True).json()["choices"][0]["text"]
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=13, temperature=0, stream=True,
                                            extra_body={"stream_interval": 4, "ignore_eos": True,
                                                        "return_token_ids": True}))
    sizes = [len((chunk.choices[0].model_extra or {}).get("token_ids") or []) for chunk in chunks if chunk.choices]
    assert sizes[:-1] and all(size >= 4 for size in sizes[:-1]), sizes
    assert sum(sizes) == 13
    assert "".join(chunk.choices[0].text for chunk in chunks if chunk.choices) == expected


def test_return_tokens_as_token_ids(llama_server: ConveyorServer) -> None:
    body = _complete(llama_server, logprobs=2, return_tokens_as_token_ids=True, return_token_ids=True).json()
    choice = body["choices"][0]
    assert choice["logprobs"]["tokens"] == [f"token_id:{token_id}" for token_id in choice["token_ids"]]
    assert all(key.startswith("token_id:") for top in choice["logprobs"]["top_logprobs"] for key in top)
    chat = llama_server.openai_client().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3, temperature=0, logprobs=True,
        top_logprobs=1, extra_body={"return_tokens_as_token_ids": True})
    assert chat.choices[0].logprobs is not None
    assert all(item.token.startswith("token_id:") for item in chat.choices[0].logprobs.content)


def test_older_guided_fields_map_to_structured_outputs(llama_server: ConveyorServer) -> None:
    for _ in range(3):
        body = _complete(llama_server, guided_choice=["red", "green", "blue"], temperature=1.0, max_tokens=8).json()
        assert body["choices"][0]["text"] in ("red", "green", "blue"), body
    both = _complete(llama_server, guided_regex="[ab]+", structured_outputs={"regex": "[cd]+"})
    assert both.status_code == 400 and both.json()["error"]["param"] == "structured_outputs"


def test_vllm_fields_conveyor_does_not_implement_are_400(llama_server: ConveyorServer) -> None:
    for field, value in (("prompt_embeds", "AAAA"), ("logits_processors", ["my.module:Processor"])):
        response = _complete(llama_server, **{field: value})
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["param"] == field and field in error["message"]
    assert _complete(llama_server, some_future_openai_field=1).status_code == 200  # unknown: ignored, logged
