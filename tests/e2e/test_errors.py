"""Every bad request gets its status and the OpenAI error shape; the next normal request still succeeds."""
from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.server_harness import ConveyorServer

MODEL = "tiny-llama"
GOOD_COMPLETION = {"model": MODEL, "prompt": "Hello", "max_tokens": 4}

BAD_REQUESTS = [
    ("/v1/completions", {**GOOD_COMPLETION, "temperature": -0.5}, 400, "temperature"),
    ("/v1/completions", {**GOOD_COMPLETION, "top_p": 0.0}, 400, "top_p"),
    ("/v1/completions", {**GOOD_COMPLETION, "top_p": 1.5}, 400, "top_p"),
    ("/v1/completions", {**GOOD_COMPLETION, "n": 0}, 400, "n"),
    ("/v1/completions", {**GOOD_COMPLETION, "max_tokens": "many"}, 400, "max_tokens"),
    ("/v1/completions", {**GOOD_COMPLETION, "max_tokens": 100000}, 400, "512"),
    ("/v1/completions", {**GOOD_COMPLETION, "model": "no-such-model"}, 404, "no-such-model"),
    ("/v1/chat/completions", {"model": MODEL, "messages": "not a list"}, 400, "messages"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                              "temperature": -1}, 400, "temperature"),
    ("/v1/chat/completions", {"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]}, 404,
     "no-such-model"),
    # media parts to a text-only model
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]}, 400, "text-only"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AAAA"}}]}]}, 400, "text-only"),
]


def _assert_error_shape(response: httpx.Response, status: int, mentions: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "param", "code"}
    assert mentions in error["message"] or mentions == error["param"], error


@pytest.mark.parametrize("path,body,status,mentions", BAD_REQUESTS)
def test_bad_request_is_answered_in_openai_shape(llama_server: ConveyorServer, path: str, body: dict, status: int,
                                                 mentions: str) -> None:
    _assert_error_shape(httpx.post(f"{llama_server.base_url}{path}", json=body, timeout=30), status, mentions)
    ok = httpx.post(f"{llama_server.base_url}/v1/completions", json=GOOD_COMPLETION, timeout=30)
    assert ok.status_code == 200 and ok.json()["choices"][0]["text"] is not None


def test_malformed_json_is_400(llama_server: ConveyorServer) -> None:
    response = httpx.post(f"{llama_server.base_url}/v1/completions", content=b"{not json",
                          headers={"content-type": "application/json"}, timeout=30)
    assert response.status_code == 400
    assert "error" in response.json()


def test_bad_request_does_not_disturb_the_batch(llama_server: ConveyorServer) -> None:
    with httpx.stream("POST", f"{llama_server.base_url}/v1/completions", timeout=60, json={
            **GOOD_COMPLETION, "max_tokens": 40, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}) as stream:
        bad = httpx.post(f"{llama_server.base_url}/v1/completions", json={**GOOD_COMPLETION, "top_p": 7}, timeout=30)
        assert bad.status_code == 400
        data = [line for line in stream.iter_lines() if line.startswith("data:")]
    assert data[-1] == "data: [DONE]"
    assert '"completion_tokens":40' in data[-2].replace(" ", "")


def test_api_key_is_required_when_set(tiny_models) -> None:  # noqa: ANN001
    server = ConveyorServer(str(tiny_models / "llama"), "--kv-cache-memory", "32MiB", api_key="sekret")
    try:
        url = f"{server.base_url}/v1/models"
        _assert_error_shape(httpx.get(url), 401, "")
        _assert_error_shape(httpx.get(url, headers={"Authorization": "Bearer wrong"}), 401, "")
        assert httpx.get(url, headers={"Authorization": "Bearer sekret"}).status_code == 200
        assert server.openai_client().models.list().data[0].id == str(tiny_models / "llama")
    finally:
        assert server.stop() == []


def test_a_full_waiting_queue_answers_503_with_retry_after(tiny_models: Path) -> None:
    """--max-waiting-requests 1 with one request running at a time: of eight at once, the ones that find the queue
    full get 503 + Retry-After in OpenAI's shape; the others complete whole."""
    server = ConveyorServer(str(tiny_models / "llama"), "--served-model-name", MODEL, "--max-model-len", "512",
                            "--kv-cache-memory", "32MiB", "--max-num-seqs", "1", "--max-waiting-requests", "1")
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 48, "ignore_eos": True}

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=120) as client:
            return list(await asyncio.gather(*(client.post("/v1/completions", json=body) for _ in range(8))))

    try:
        responses = asyncio.run(burst())
        refused = [response for response in responses if response.status_code == 503]
        served = [response for response in responses if response.status_code == 200]
        assert refused and served and len(refused) + len(served) == 8
        for response in refused:
            _assert_error_shape(response, 503, "--max-waiting-requests")
            assert response.headers["retry-after"] == "1"
        assert all(response.json()["usage"]["completion_tokens"] == 48 for response in served)
    finally:
        assert server.stop() == []


def test_a_body_over_the_limit_is_413_before_it_is_buffered(tiny_models: Path) -> None:
    """--max-request-body-mb 0.05 (~52 kB): a larger body is refused with 413 in OpenAI's shape, whether its
    Content-Length says so or it arrives chunked; a normal request still succeeds."""
    server = ConveyorServer(str(tiny_models / "llama"), "--served-model-name", MODEL, "--max-model-len", "512",
                            "--kv-cache-memory", "32MiB", "--max-request-body-mb", "0.05")
    big = {**GOOD_COMPLETION, "prompt": "x" * 100_000}

    def chunked() -> Iterator[bytes]:
        data = json.dumps(big).encode()
        for start in range(0, len(data), 8192):
            yield data[start:start + 8192]

    try:
        with httpx.Client(base_url=server.base_url, timeout=60) as client:
            _assert_error_shape(client.post("/v1/completions", json=big), 413, "--max-request-body-mb")
            _assert_error_shape(client.post("/v1/completions", content=chunked(),
                                            headers={"content-type": "application/json"}), 413, "--max-request-body-mb")
            assert client.post("/v1/completions", json=GOOD_COMPLETION).status_code == 200
    finally:
        assert server.stop() == []
