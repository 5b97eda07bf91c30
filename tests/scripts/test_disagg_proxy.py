"""scripts/disagg_proxy.py as a real process in front of fake prefill/decode instances.

The fakes are small FastAPI apps served by uvicorn in threads of the test process; they record every request
they receive and answer the way Conveyor's prefill (a `kv_transfer_params` object) and decode (JSON or SSE)
instances do, so the routing, rewriting, relaying and error handling are checked without an engine.
"""
from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import openai
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from tests.disagg_harness import proxy_log_path, start_proxy, stop_proxy
from tests.server_harness import free_port

API_KEY = "proxy-test-key"


@dataclass
class Received:
    path: str
    body: dict[str, Any]
    headers: dict[str, str]


@dataclass
class FakeInstance:
    """One fake upstream; `role` is "prefill" or "decode". Tests set `error` or `stream_delay_s` and reset()."""

    name: str
    role: str
    received: list[Received] = field(default_factory=list)
    error: tuple[int, dict[str, Any]] | None = None
    stream_delay_s: float = 0.0
    healthy: bool = True
    send_kv_params: bool = True
    streamed: bytearray = field(default_factory=bytearray)
    stream_cut_short: threading.Event = field(default_factory=threading.Event)
    url: str = ""

    def reset(self) -> None:
        self.received.clear()
        self.streamed.clear()
        self.stream_cut_short.clear()
        self.error, self.stream_delay_s, self.healthy, self.send_kv_params = None, 0.0, True, True

    def kv_transfer_params(self, serial: int) -> dict[str, Any]:
        return {"do_remote_prefill": True, "do_remote_decode": False, "remote_engine_id": self.name,
                "remote_request_id": f"{self.name}-req-{serial}", "remote_block_ids": [serial, serial + 1],
                "remote_host": "127.0.0.1", "remote_port": 14579, "remote_num_tokens": 5,
                "remote_blocks_expiry_time": 1e12}

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.get("/health")
        async def health() -> Response:
            return Response(status_code=200 if self.healthy else 503)

        @app.get("/v1/models")
        async def models() -> dict[str, Any]:
            return {"object": "list", "data": [{"id": "fake-model", "object": "model", "owned_by": self.name}]}

        @app.post("/v1/completions")
        async def completions(request: Request) -> Response:
            return await self.generate(request, chat=False)

        @app.post("/v1/chat/completions")
        async def chat(request: Request) -> Response:
            return await self.generate(request, chat=True)

        return app

    async def generate(self, request: Request, chat: bool) -> Response:
        body = await request.json()
        self.received.append(Received(request.url.path, body, dict(request.headers)))
        if self.error is not None:
            return JSONResponse(self.error[1], status_code=self.error[0])
        if self.role == "prefill":
            answer = completion_json(chat, "P", self.name)
            if self.send_kv_params:
                answer["kv_transfer_params"] = self.kv_transfer_params(len(self.received))
            return JSONResponse(answer)
        source = (body.get("kv_transfer_params") or {}).get("remote_engine_id")
        if not body.get("stream"):
            return JSONResponse(completion_json(chat, f"decoded by {self.name} from {source}", self.name))
        num_tokens = body.get("max_completion_tokens") or body.get("max_tokens") or 16
        usage = (body.get("stream_options") or {}).get("include_usage", False)
        return StreamingResponse(self.events(chat, num_tokens, usage), media_type="text/event-stream")

    async def events(self, chat: bool, num_tokens: int, usage: bool) -> AsyncIterator[bytes]:
        finished = False
        try:
            for index in range(num_tokens):
                await asyncio.sleep(self.stream_delay_s)
                yield self.record(chunk_event(chat, f" t{index}", None))
            yield self.record(chunk_event(chat, "", "length"))
            if usage:
                counts = {"prompt_tokens": 5, "completion_tokens": num_tokens, "total_tokens": 5 + num_tokens}
                yield self.record(f"data: {json.dumps({**chunk_base(chat), 'choices': [], 'usage': counts})}\n\n")
            yield self.record("data: [DONE]\n\n")
            finished = True
        finally:
            if not finished:  # cancelled: the proxy closed its connection to us
                self.stream_cut_short.set()

    def record(self, event: str) -> bytes:
        data = event.encode()
        self.streamed += data
        return data


def chunk_base(chat: bool) -> dict[str, Any]:
    kind = "chat.completion.chunk" if chat else "text_completion"
    return {"id": "cmpl-fake", "object": kind, "created": 0, "model": "fake-model"}


def chunk_event(chat: bool, text: str, finish_reason: str | None) -> str:
    choice: dict[str, Any] = {"index": 0, "finish_reason": finish_reason, "logprobs": None}
    choice.update({"delta": {"content": text}} if chat else {"text": text})
    return f"data: {json.dumps({**chunk_base(chat), 'choices': [choice]})}\n\n"


def completion_json(chat: bool, text: str, name: str) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": 0, "finish_reason": "length", "logprobs": None}
    if chat:
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    return {"id": f"cmpl-{name}", "object": "chat.completion" if chat else "text_completion", "created": 0,
            "model": "fake-model", "choices": [choice],
            "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}}


def serve_in_thread(app: FastAPI) -> tuple[str, Any]:
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "fake instance did not start"
        time.sleep(0.02)
    return f"http://127.0.0.1:{port}", server


@dataclass
class Cluster:
    prefill: list[FakeInstance]
    decode: list[FakeInstance]
    proxy_url: str

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.proxy_url}/v1", api_key=API_KEY, max_retries=0)

    def prefill_received(self) -> list[Received]:
        return [item for instance in self.prefill for item in instance.received]

    def decode_received(self) -> list[Received]:
        return [item for instance in self.decode for item in instance.received]


@pytest.fixture(scope="module")
def cluster_module() -> Iterator[Cluster]:
    instances = [FakeInstance(f"{role}{i}", role) for role in ("prefill", "decode") for i in range(2)]
    servers = []
    for instance in instances:
        instance.url, server = serve_in_thread(instance.app())
        servers.append(server)
    prefill, decode = instances[:2], instances[2:]
    # Both spellings the proxy accepts: a base URL, and an OpenAI base URL ending in /v1.
    process, proxy_url = start_proxy([prefill[0].url, f"{prefill[1].url}/v1/"], [d.url for d in decode])
    yield Cluster(prefill, decode, proxy_url)
    leftovers = stop_proxy(process)
    for server in servers:
        server.should_exit = True
    assert leftovers == []


@pytest.fixture
def cluster(cluster_module: Cluster) -> Cluster:
    for instance in (*cluster_module.prefill, *cluster_module.decode):
        instance.reset()
    return cluster_module


def test_completion_goes_prefill_then_decode(cluster: Cluster) -> None:
    original = {"model": "fake-model", "prompt": "Once upon a time", "max_tokens": 12, "n": 2, "temperature": 0.5,
                "top_k": 20, "min_tokens": 3, "stream": False}
    answer = httpx.post(f"{cluster.proxy_url}/v1/completions", json=original,
                        headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30)
    assert answer.status_code == 200, answer.text

    (prefilled,) = cluster.prefill_received()
    assert prefilled.path == "/v1/completions"
    assert prefilled.body == {**{k: v for k, v in original.items() if k != "min_tokens"}, "max_tokens": 1,
                              "stream": False, "kv_transfer_params": {"do_remote_decode": True}}
    assert prefilled.headers["authorization"] == f"Bearer {API_KEY}"

    (decoded,) = cluster.decode_received()
    prefill_instance = next(p for p in cluster.prefill if p.received)
    assert decoded.body == {**original, "kv_transfer_params": prefill_instance.kv_transfer_params(1)}
    assert decoded.headers["authorization"] == f"Bearer {API_KEY}"
    assert decoded.headers["x-request-id"] == prefilled.headers["x-request-id"]  # one id for both halves

    decode_instance = next(d for d in cluster.decode if d.received)
    assert answer.headers["content-type"] == "application/json"
    assert answer.json() == completion_json(False, f"decoded by {decode_instance.name} from "
                                                   f"{prefill_instance.name}", decode_instance.name)


def test_chat_stream_relayed_byte_for_byte(cluster: Cluster) -> None:
    stream = cluster.client().chat.completions.create(model="fake-model", messages=[{"role": "user", "content": "Hi"}],
                                                      max_completion_tokens=6, stream=True,
                                                      stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text == "".join(f" t{i}" for i in range(6))
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 6

    (prefilled,) = cluster.prefill_received()
    assert prefilled.path == "/v1/chat/completions"
    assert prefilled.body["max_tokens"] == 1 and prefilled.body["max_completion_tokens"] == 1
    assert prefilled.body["stream"] is False and "stream_options" not in prefilled.body
    assert prefilled.body["kv_transfer_params"] == {"do_remote_decode": True}
    (decoded,) = cluster.decode_received()
    assert decoded.body["stream"] is True and decoded.body["stream_options"] == {"include_usage": True}
    assert decoded.body["max_completion_tokens"] == 6 and "max_tokens" not in decoded.body
    assert decoded.body["kv_transfer_params"]["do_remote_prefill"] is True

    # The same request through raw HTTP: the proxy's bytes are exactly what the decode instance sent.
    for instance in cluster.decode:
        instance.reset()
    body = {"model": "fake-model", "prompt": "Hi", "max_tokens": 4, "stream": True}
    with httpx.stream("POST", f"{cluster.proxy_url}/v1/completions", json=body, timeout=30) as answer:
        relayed = answer.read()
        assert answer.status_code == 200
        assert answer.headers["content-type"].startswith("text/event-stream")
    (decode_instance,) = [d for d in cluster.decode if d.received]
    assert relayed == bytes(decode_instance.streamed) and relayed.endswith(b"data: [DONE]\n\n")


def test_round_robin_over_two_prefill_and_two_decode(cluster: Cluster) -> None:
    client = cluster.client()
    texts = [client.completions.create(model="fake-model", prompt=f"p{i}", max_tokens=3).choices[0].text
             for i in range(4)]
    assert [len(instance.received) for instance in (*cluster.prefill, *cluster.decode)] == [2, 2, 2, 2]
    # Each decode request carries the parameters the prefill instance of the same request returned.
    sources = sorted(text.rsplit(" from ", 1)[1] for text in texts)
    assert sources == ["prefill0", "prefill0", "prefill1", "prefill1"]
    for decode in cluster.decode:
        for received in decode.received:
            params = received.body["kv_transfer_params"]
            prefill = next(p for p in cluster.prefill if p.name == params["remote_engine_id"])
            serial = int(params["remote_request_id"].rsplit("-", 1)[1])
            assert prefill.received[serial - 1].body["prompt"] == received.body["prompt"]


def test_prefill_error_returned_unchanged(cluster: Cluster) -> None:
    error = {"error": {"message": "prompt too long", "type": "BadRequestError", "param": "prompt", "code": 400}}
    for instance in cluster.prefill:
        instance.error = (400, error)
    with pytest.raises(openai.BadRequestError) as raised:
        cluster.client().completions.create(model="fake-model", prompt="x" * 50, max_tokens=3, stream=True)
    assert raised.value.status_code == 400 and raised.value.body == error["error"]
    assert cluster.decode_received() == []

    answer = httpx.post(f"{cluster.proxy_url}/v1/chat/completions", timeout=30,
                        json={"model": "fake-model", "messages": [{"role": "user", "content": "x"}]})
    assert (answer.status_code, answer.json()) == (400, error)


def test_decode_error_returned_unchanged(cluster: Cluster) -> None:
    error = {"error": {"message": "engine dead", "type": "ServiceUnavailableError", "param": None, "code": 503}}
    for instance in cluster.decode:
        instance.error = (503, error)
    answer = httpx.post(f"{cluster.proxy_url}/v1/completions", timeout=30,
                        json={"model": "fake-model", "prompt": "x", "max_tokens": 3, "stream": True})
    assert (answer.status_code, answer.json()) == (503, error)


def test_prefill_without_kv_params_falls_back_to_recompute(cluster: Cluster) -> None:
    for instance in cluster.prefill:
        instance.send_kv_params = False
    body = {"model": "fake-model", "prompt": "x", "max_tokens": 3, "kv_transfer_params": {"bogus": 1}}
    for _ in range(2):
        answer = httpx.post(f"{cluster.proxy_url}/v1/completions", json=body, timeout=30)
        assert answer.status_code == 200 and answer.json()["choices"][0]["text"].endswith("from None")
    # The decode instance computes the prompt itself: no parameters, not even the client's own.
    assert [received.body for received in cluster.decode_received()] == [
        {key: value for key, value in body.items() if key != "kv_transfer_params"}] * 2
    assert "sent no kv_transfer_params" in proxy_log_path(cluster.proxy_url).read_text()


def test_models_and_health_pass_through(cluster: Cluster) -> None:
    models = cluster.client().models.list()
    assert [model.id for model in models.data] == ["fake-model"]
    assert httpx.get(f"{cluster.proxy_url}/health", timeout=30).status_code == 200
    cluster.decode[1].healthy = False
    answer = httpx.get(f"{cluster.proxy_url}/health", timeout=30)
    assert answer.status_code == 503
    assert answer.json()["upstreams"][cluster.decode[1].url] == "HTTP 503"


def test_invalid_json_is_a_400(cluster: Cluster) -> None:
    answer = httpx.post(f"{cluster.proxy_url}/v1/completions", content=b"{not json", timeout=30,
                        headers={"content-type": "application/json"})
    assert answer.status_code == 400 and set(answer.json()["error"]) == {"message", "type", "param", "code"}
    assert cluster.prefill_received() == []


def test_client_disconnect_closes_the_decode_stream(cluster: Cluster) -> None:
    for instance in cluster.decode:
        instance.stream_delay_s = 0.05  # 400 tokens: 20 s if nobody hung up
    body = {"model": "fake-model", "prompt": "long", "max_tokens": 400, "stream": True}
    with httpx.stream("POST", f"{cluster.proxy_url}/v1/completions", json=body, timeout=30) as answer:
        first = next(answer.iter_lines())
        assert first.startswith("data: ")
    (decode_instance,) = [d for d in cluster.decode if d.received]
    assert decode_instance.stream_cut_short.wait(timeout=10), "the proxy kept the decode stream open"
    assert b"[DONE]" not in decode_instance.streamed
    # The proxy logged the request (debug level) and is still serving.
    assert "decode=" in proxy_log_path(cluster.proxy_url).read_text()
    assert httpx.get(f"{cluster.proxy_url}/health", timeout=30).status_code == 200


def assert_bad_gateway(answer: httpx.Response, dead_url: str) -> None:
    assert answer.status_code == 502
    error = answer.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == 502
    assert dead_url in error["message"]


def test_unreachable_upstreams_give_502() -> None:
    live = FakeInstance("live", "prefill")
    live.url, server = serve_in_thread(live.app())
    dead_url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    body = {"model": "fake-model", "prompt": "x", "max_tokens": 3}
    try:
        process, proxy_url = start_proxy([dead_url], [live.url])
        try:
            assert_bad_gateway(httpx.post(f"{proxy_url}/v1/completions", json=body, timeout=30), dead_url)
            health = httpx.get(f"{proxy_url}/health", timeout=30)
            assert health.status_code == 503 and health.json()["upstreams"][dead_url].startswith("unreachable")
            with pytest.raises(openai.APIStatusError) as raised:
                openai.OpenAI(base_url=f"{proxy_url}/v1", api_key="x", max_retries=0).chat.completions.create(
                    model="fake-model", messages=[{"role": "user", "content": "x"}], stream=True)
            assert raised.value.status_code == 502
        finally:
            assert stop_proxy(process) == []

        # Prefill answers, decode is gone: still a 502, after the prefill did its part.
        process, proxy_url = start_proxy([live.url], [dead_url])
        try:
            assert_bad_gateway(httpx.post(f"{proxy_url}/v1/completions", json=body, timeout=30), dead_url)
            assert len(live.received) == 1
            models = httpx.get(f"{proxy_url}/v1/models", timeout=30)  # falls back to the prefill instance
            assert models.status_code == 200 and models.json()["data"][0]["owned_by"] == "live"
        finally:
            assert stop_proxy(process) == []
    finally:
        server.should_exit = True
