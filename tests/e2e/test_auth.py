"""--api-key on real servers: every route the app serves (read from its own /openapi.json, so a route added later
is covered without editing this file) x {no key, wrong key, right key}, on a generative and a pooling server.
Only the open routes answer without the right key; a refusal is a 401 in OpenAI's error shape, sent before the
request body is read; the /v1/realtime WebSocket handshake is refused the same way."""
from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

from tests.server_harness import ConveyorServer

KEYS = ("sk-first", "sk-second")  # two keys: either one opens every route
OPEN_ROUTES = {"/health", "/version", "/metrics", "/openapi.json"}
SERVER_FLAGS = ("--kv-cache-memory", "32MiB", "--max-model-len", "128")

# Minimal valid bodies for the routes that take one; any other POST gets `{}` (a 400 is fine with the right key).
BODIES: dict[str, dict[str, Any]] = {
    "/v1/completions": {"prompt": "hi", "max_tokens": 1},
    "/v1/chat/completions": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1},
    "/v1/responses": {"input": "hi", "max_output_tokens": 1},
    "/v1/embeddings": {"input": "hi"},
    "/tokenize": {"prompt": "hi"},
    "/detokenize": {"tokens": [1, 2]},
    "/pooling": {"input": "hi"},
    "/classify": {"input": "hi"},
    "/score": {"text_1": "a", "text_2": "b"},
    "/v1/score": {"text_1": "a", "text_2": "b"},
    "/rerank": {"query": "a", "documents": ["b"]},
    "/v1/rerank": {"query": "a", "documents": ["b"]},
    "/v2/rerank": {"query": "a", "documents": ["b"]},
}


def _start(model: Path, *flags: str) -> ConveyorServer:
    # The first key through --api-key, the second through a repeated --api-key (vLLM takes several).
    return ConveyorServer(str(model), *SERVER_FLAGS, "--api-key", KEYS[0], *flags, api_key=KEYS[1])


@pytest.fixture(scope="module")
def generative(tiny_models: Path) -> Iterator[ConveyorServer]:
    server = _start(tiny_models / "llama", "--served-model-name", "tiny-llama")
    yield server
    assert server.stop() == []


@pytest.fixture(scope="module")
def pooling(tiny_models: Path) -> Iterator[ConveyorServer]:
    server = _start(tiny_models / "bert-embed", "--served-model-name", "bert-embed")
    yield server
    assert server.stop() == []


def _routes(server: ConveyorServer) -> list[tuple[str, str]]:
    """(method, path) of every HTTP route in the app's own OpenAPI document, path parameters filled in."""
    spec = httpx.get(f"{server.base_url}/openapi.json", timeout=10).json()
    routes = []
    for template, operations in spec["paths"].items():
        path = template.replace("{model_id}", "unused-model").replace("{response_id}", "resp_unknown")
        assert "{" not in path, f"new path parameter in {template}: give it a value here"
        routes += [(method.upper(), path) for method in operations]
    return sorted(routes)


def _call(server: ConveyorServer, method: str, path: str, key: str | None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
    body = BODIES.get(path, {}) if method == "POST" else None
    return httpx.request(method, f"{server.base_url}{path}", json=body, headers=headers, timeout=120)


def _assert_401(response: httpx.Response, where: str) -> None:
    assert response.status_code == 401, (where, response.status_code, response.text)
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, where
    assert error["type"] == "AuthenticationError" and error["code"] == "invalid_api_key", where


@pytest.mark.parametrize("server_name", ["generative", "pooling"])
def test_every_route_needs_the_key_but_the_open_ones(server_name: str, request: pytest.FixtureRequest) -> None:
    server: ConveyorServer = request.getfixturevalue(server_name)
    routes = _routes(server)
    paths = {path for _, path in routes}
    assert {"/v1/completions", "/v1/models", "/tokenize", "/detokenize", "/pooling", "/classify", "/score",
            "/rerank", "/v2/rerank", "/v1/embeddings", "/health", "/metrics"} <= paths
    for method, path in routes:
        where = f"{server_name} {method} {path}"
        for key in (None, "sk-wrong"):
            response = _call(server, method, path, key)
            if path in OPEN_ROUTES:
                assert response.status_code == 200, (where, key, response.status_code)
            else:
                _assert_401(response, f"{where} key={key}")
        for key in KEYS:
            response = _call(server, method, path, key)
            assert response.status_code != 401 and response.status_code < 500, (where, response.status_code,
                                                                               response.text[:300])


def test_unknown_paths_and_other_schemes_are_refused_too(generative: ConveyorServer) -> None:
    """Deny by default: a path no router serves is 401 before it is 404, and only `Bearer` carries a key."""
    _assert_401(httpx.get(f"{generative.base_url}/v1/not-a-route"), "unknown path")
    _assert_401(httpx.get(f"{generative.base_url}/health/../v1/models"), "dot segments")
    _assert_401(httpx.get(f"{generative.base_url}/v1/models", headers={"Authorization": f"Basic {KEYS[0]}"}),
                "Basic scheme")
    assert httpx.get(f"{generative.base_url}/v1/not-a-route",
                     headers={"Authorization": f"Bearer {KEYS[0]}"}).status_code == 404


def test_openai_client_with_either_key(generative: ConveyorServer) -> None:
    import openai

    def client(key: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{generative.base_url}/v1", api_key=key, max_retries=0)

    with pytest.raises(openai.AuthenticationError):
        client("sk-wrong").models.list()
    for key in KEYS:
        assert client(key).completions.create(model="tiny-llama", prompt="hi", max_tokens=2).usage.completion_tokens == 2


def test_401_comes_before_the_body_is_read(generative: ConveyorServer) -> None:
    """Headers announcing 1 MB, then 10 bytes and silence: the 401 arrives although the body never does."""
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Authorization: Bearer sk-wrong\r\nContent-Length: {2**20}\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", generative.port), timeout=10) as connection:
        connection.sendall(head + b'{"prompt":')
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = connection.recv(65536)
            assert chunk, "connection closed without an answer"
            answer += chunk
    status_line = answer.split(b"\r\n", 1)[0]
    assert status_line.startswith(b"HTTP/1.1 401"), answer[:200]


def test_realtime_handshake_needs_the_key(generative: ConveyorServer) -> None:
    """The WebSocket is refused (401, OpenAI's shape) without a key; with one it reaches the route, which refuses a
    text model with a 400 of its own. The key may also come as the `openai-insecure-api-key.` subprotocol."""
    from websockets.asyncio.client import connect
    from websockets.exceptions import InvalidStatus

    url = generative.base_url.replace("http://", "ws://") + "/v1/realtime"

    async def status_of(**kwargs: Any) -> tuple[int, dict[str, Any]]:
        try:
            async with connect(url, open_timeout=30, **kwargs):
                pass
        except InvalidStatus as exc:
            return exc.response.status_code, json.loads(bytes(exc.response.body or b"{}"))
        raise AssertionError("the handshake was accepted")

    status, body = asyncio.run(status_of())
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    status, body = asyncio.run(status_of(additional_headers={"Authorization": "Bearer sk-wrong"}))
    assert status == 401
    status, body = asyncio.run(status_of(additional_headers={"Authorization": f"Bearer {KEYS[1]}"}))
    assert status == 400 and "takes no audio" in body["error"]["message"]
    status, body = asyncio.run(status_of(subprotocols=["realtime", f"openai-insecure-api-key.{KEYS[0]}"]))
    assert status == 400
