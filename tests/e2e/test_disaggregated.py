"""Disaggregated prefill/decode: a prefill instance, a decode instance and scripts/disagg_proxy.py, all real.

Greedy outputs through the proxy equal a single instance's, streaming and not, with 16 requests at once; the
decode instance's metrics show its prompt KV came from transfer; the prefill instance frees its blocks after the
pull and after the lease; a prefill instance killed before the pull gives the decode instance's
kv_load_failure_policy (recompute: the right answer anyway; fail: a clear error), and nothing hangs.
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx
import openai
import pytest

from tests.disagg_harness import start_proxy, stop_proxy
from tests.server_harness import ConveyorServer, free_port

SMALL = ("--kv-cache-memory", "64MiB", "--max-model-len", "512", "--served-model-name", "tiny-llama")
PROMPTS = [f"Story {i}: once upon a time, in a small village by the sea, there lived a {word} who"
           for i, word in enumerate(["fisherman", "baker", "painter", "sailor", "poet", "farmer", "smith", "queen"] * 2)]
MAX_TOKENS = 10


def _kv_config(connector: str, role: str, **extra: Any) -> str:
    config: dict[str, Any] = {"kv_connector": connector, "kv_role": role}
    if role == "kv_producer":
        config["kv_port"] = free_port()
    for key in ("kv_load_failure_policy",):
        if key in extra:
            config[key] = extra.pop(key)
    config["kv_connector_extra_config"] = extra
    return json.dumps(config)


def _serve(connector: str, role: str, **extra: Any) -> ConveyorServer:
    return ConveyorServer(str(Path(__file__).resolve().parents[2] / ".models" / "llama"),
                          *SMALL, "--kv-transfer-config", _kv_config(connector, role, **extra))


def _engine_gauge(server: ConveyorServer, name: str) -> float:
    return sum(value for key, value in server.metrics().items() if key.startswith(f"conveyor:{name}{{"))


def _wait_for(predicate: Callable[[], bool], timeout_s: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return predicate()


def _completions(base_url: str, prompts: list[str], stream: bool = False) -> list[str]:
    """All prompts at once through the openai client; texts in prompt order."""
    async def one(client: openai.AsyncOpenAI, prompt: str) -> str:
        if not stream:
            result = await client.completions.create(model="tiny-llama", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0)
            return result.choices[0].text
        pieces = []
        async for chunk in await client.completions.create(model="tiny-llama", prompt=prompt, max_tokens=MAX_TOKENS,
                                                           temperature=0, stream=True):
            pieces += [choice.text for choice in chunk.choices]
        return "".join(pieces)

    async def run() -> list[str]:
        async with openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused", timeout=120) as client:
            return list(await asyncio.gather(*(one(client, prompt) for prompt in prompts)))

    return asyncio.run(run())


def _chat_stream(base_url: str, prompts: list[str]) -> list[str]:
    async def one(client: openai.AsyncOpenAI, prompt: str) -> str:
        pieces = []
        async for chunk in await client.chat.completions.create(
                model="tiny-llama", messages=[{"role": "user", "content": prompt}], max_tokens=MAX_TOKENS, temperature=0,
                stream=True):
            pieces += [choice.delta.content or "" for choice in chunk.choices]
        return "".join(pieces)

    async def run() -> list[str]:
        async with openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused", timeout=120) as client:
            return list(await asyncio.gather(*(one(client, prompt) for prompt in prompts)))

    return asyncio.run(run())


@pytest.fixture(scope="module")
def reference(llama_server: ConveyorServer) -> dict[str, list[str]]:
    """One instance, no transfer: what every disaggregated answer must equal."""
    return {"completions": [_completions(llama_server.base_url, [p])[0] for p in PROMPTS],
            "chat": [_chat_stream(llama_server.base_url, [p])[0] for p in PROMPTS[:4]]}


@pytest.fixture(scope="module", params=["ZmqPullConnector", "SharedStorageConnector"])
def cluster(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[tuple[ConveyorServer, ConveyorServer, str, str]]:
    """(prefill, decode, proxy base url, connector)."""
    connector = request.param
    extra = {"shared_storage_path": str(tmp_path_factory.mktemp("kv"))} if connector == "SharedStorageConnector" \
        else {}
    prefill = _serve(connector, "kv_producer", **extra)
    decode = _serve(connector, "kv_consumer", **extra)
    proxy, base_url = start_proxy([prefill.base_url], [decode.base_url])
    yield prefill, decode, base_url, connector
    assert stop_proxy(proxy) == []
    assert prefill.stop() == [] and decode.stop() == []
    if connector == "SharedStorageConnector":  # the decode side consumed every hand-off
        assert list(Path(extra["shared_storage_path"]).glob("*/*.safetensors")) == []


def test_outputs_through_the_proxy_equal_a_single_instance(cluster: tuple[ConveyorServer, ConveyorServer, str, str],
                                                           reference: dict[str, list[str]]) -> None:
    prefill, decode, proxy_url, _ = cluster
    assert _completions(proxy_url, PROMPTS) == reference["completions"]
    assert _completions(proxy_url, PROMPTS, stream=True) == reference["completions"]
    assert _chat_stream(proxy_url, PROMPTS[:4]) == reference["chat"]
    # Every prompt's KV but its last token came over (or, repeated, from the local prefix cache): the decode
    # instance computed one prompt token per request.
    num_requests = 2 * len(PROMPTS) + 4
    transferred = _engine_gauge(decode, "prompt_tokens_transferred")
    computed = _engine_gauge(decode, "prompt_tokens_computed")
    assert computed <= num_requests, (computed, transferred)
    assert transferred >= 20 * len(PROMPTS), (computed, transferred)
    # The prefill instance let go of every block once the decode instance had them.
    assert _wait_for(lambda: _engine_gauge(prefill, "kv_blocks_held_for_transfer") == 0)
    assert _engine_gauge(prefill, "kv_cache_usage_perc") == 0


@pytest.fixture(scope="module")
def short_lease_prefill() -> Iterator[ConveyorServer]:
    server = _serve("ZmqPullConnector", "kv_producer", lease_s=3)
    yield server
    assert server.stop() == []


def _prefill_only(prefill: ConveyorServer, prompt: str) -> dict[str, Any]:
    response = httpx.post(f"{prefill.base_url}/v1/completions", timeout=60, json={
        "prompt": prompt, "max_tokens": 1, "temperature": 0, "kv_transfer_params": {"do_remote_decode": True}})
    assert response.status_code == 200, response.text
    params: dict[str, Any] = response.json()["kv_transfer_params"]
    assert params["do_remote_prefill"] is True and params["remote_num_tokens"] > 16
    assert set(params) >= {"do_remote_decode", "remote_engine_id", "remote_request_id", "remote_block_ids",
                           "remote_host", "remote_port", "remote_blocks_expiry_time"}
    return params


def test_unpulled_blocks_are_freed_when_the_lease_expires(short_lease_prefill: ConveyorServer) -> None:
    _prefill_only(short_lease_prefill, PROMPTS[0])
    assert _wait_for(lambda: _engine_gauge(short_lease_prefill, "kv_blocks_held_for_transfer") > 0, 5)
    assert _wait_for(lambda: _engine_gauge(short_lease_prefill, "kv_blocks_held_for_transfer") == 0, 20)
    assert _engine_gauge(short_lease_prefill, "kv_cache_usage_perc") == 0


@pytest.mark.parametrize("policy", ["recompute", "fail"])
def test_prefill_instance_killed_before_the_pull(policy: str, reference: dict[str, list[str]]) -> None:
    prefill = _serve("ZmqPullConnector", "kv_producer")
    decode = _serve("ZmqPullConnector", "kv_consumer", kv_load_failure_policy=policy, transfer_timeout_s=3)
    try:
        params = _prefill_only(prefill, PROMPTS[1])
        os.killpg(prefill.process.pid, signal.SIGKILL)
        prefill.process.wait(timeout=30)
        response = httpx.post(f"{decode.base_url}/v1/completions", timeout=60, json={
            "prompt": PROMPTS[1], "max_tokens": MAX_TOKENS, "temperature": 0, "kv_transfer_params": params})
        if policy == "recompute":
            assert response.status_code == 200, response.text
            assert response.json()["choices"][0]["text"] == reference["completions"][1]
        else:
            assert response.status_code == 500, response.text
            error = response.json()["error"]
            assert "KV transfer" in error["message"] and "prefill instance" in error["message"], error
        assert _engine_gauge(decode, "kv_transfers_failed") == 1
        # The decode instance keeps serving, and its blocks are all back.
        assert _completions(decode.base_url, PROMPTS[:2]) == reference["completions"][:2]
        assert _wait_for(lambda: _engine_gauge(decode, "kv_cache_usage_perc") == 0)
    finally:
        prefill.stop()
        assert decode.stop() == []
