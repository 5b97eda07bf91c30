"""Continuous batching, prefix caching, preemption and abort, observed through real HTTP and /metrics."""
from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import httpx

from tests.server_harness import ConveyorServer

MODEL = "tiny-llama"
LONG_PROMPT = " ".join(f"word{i}" for i in range(120))  # ~370 tokens: many full 16-token blocks


def _wait_for(condition, timeout_s: float = 15.0) -> bool:  # noqa: ANN001
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


def test_several_requests_share_each_step(llama_server: ConveyorServer) -> None:
    steps_before = llama_server.metric("conveyor:engine_steps")
    scheduled_before = llama_server.metric("conveyor:engine_scheduled_requests")

    async def burst():
        client = llama_server.async_openai_client()
        return await asyncio.gather(*[
            client.completions.create(model=MODEL, prompt=f"Request {i} says", max_tokens=24, temperature=0,
                                      extra_body={"ignore_eos": True}) for i in range(8)])

    responses = asyncio.run(burst())
    assert all(r.usage.completion_tokens == 24 for r in responses)
    steps = llama_server.metric("conveyor:engine_steps") - steps_before
    scheduled = llama_server.metric("conveyor:engine_scheduled_requests") - scheduled_before
    assert scheduled / steps > 2.0, f"{scheduled} request-steps over {steps} steps: not batched"
    assert llama_server.metric("conveyor:max_requests_in_step") >= 4


def test_request_arriving_mid_generation_joins_the_running_batch(llama_server: ConveyorServer) -> None:
    events: dict[str, float] = {}
    long_started = threading.Event()

    def long_request() -> None:
        with httpx.stream("POST", f"{llama_server.base_url}/v1/completions", timeout=120.0, json={
                "model": MODEL, "prompt": "A long story:", "max_tokens": 400, "temperature": 0,
                "ignore_eos": True, "stream": True}) as response:
            for line in response.iter_lines():
                if line.startswith("data:"):
                    long_started.set()
        events["long_done"] = time.monotonic()

    thread = threading.Thread(target=long_request)
    thread.start()
    assert long_started.wait(60)
    client = llama_server.openai_client()
    short = client.completions.create(model=MODEL, prompt="Short:", max_tokens=4, temperature=0,
                                      extra_body={"ignore_eos": True})
    events["short_done"] = time.monotonic()
    thread.join(timeout=120)
    assert short.usage.completion_tokens == 4
    assert events["short_done"] < events["long_done"], "the short request waited for the long one to finish"


def test_prefix_cache_hits_and_cache_salt_isolation(llama_server: ConveyorServer) -> None:
    client = llama_server.openai_client()

    def cached_tokens(**extra) -> int:  # noqa: ANN003
        response = client.completions.create(model=MODEL, prompt=LONG_PROMPT, max_tokens=2, temperature=0,
                                             extra_body=extra or None)
        details = response.usage.prompt_tokens_details
        return details.cached_tokens if details else 0

    cached_tokens()
    assert cached_tokens() >= 112  # all full blocks but the one holding the last prompt token
    assert cached_tokens(cache_salt="tenant-a") == 0
    assert cached_tokens(cache_salt="tenant-a") >= 112
    assert cached_tokens(cache_salt="tenant-b") == 0


def test_preemption_completes_every_request_correctly(tiny_models: Path) -> None:
    server = ConveyorServer(str(tiny_models / "llama"), "--num-gpu-blocks-override", "16", "--block-size", "16",
                            "--max-model-len", "256", "--no-enable-prefix-caching")
    try:
        client = server.openai_client()
        prompts = [f"Story number {i} begins with" for i in range(6)]
        alone = [client.completions.create(model=server_model(tiny_models), prompt=p, max_tokens=60, temperature=0,
                                           extra_body={"ignore_eos": True}).choices[0].text for p in prompts]

        async def together():
            async_client = server.async_openai_client()
            return await asyncio.gather(*[
                async_client.completions.create(model=server_model(tiny_models), prompt=p, max_tokens=60,
                                                temperature=0, extra_body={"ignore_eos": True}) for p in prompts])

        results = asyncio.run(together())  # 6 x ~5 blocks needed, 16 available: some must be preempted
        assert [r.choices[0].text for r in results] == alone
        assert server.metric("conveyor:num_preemptions") > 0
    finally:
        assert server.stop() == []


def server_model(tiny_models: Path) -> str:
    return str(tiny_models / "llama")


def test_client_disconnect_aborts_and_frees_blocks(llama_server: ConveyorServer) -> None:
    with httpx.stream("POST", f"{llama_server.base_url}/v1/completions", timeout=60.0, json={
            "model": MODEL, "prompt": LONG_PROMPT, "max_tokens": 140, "temperature": 0, "ignore_eos": True,
            "stream": True}) as response:
        chunks = 0
        for line in response.iter_lines():
            chunks += line.startswith("data:")
            if chunks >= 3:
                break
        assert llama_server.metric("conveyor:kv_cache_usage_perc") > 0
    # the connection is closed here, long before 140 tokens
    assert _wait_for(lambda: llama_server.metric("conveyor:num_requests_running") == 0
                     and llama_server.metric("conveyor:kv_cache_usage_perc") == 0.0)


def test_priority_policy_serves_the_most_urgent_waiting_request_first(tiny_models: Path) -> None:
    server = ConveyorServer(str(tiny_models / "llama"), "--scheduling-policy", "priority", "--max-num-seqs", "1",
                            "--served-model-name", MODEL, "--kv-cache-memory", "32MiB", "--kv-cache-dtype", "bfloat16",
                            "--enforce-eager")  # a vLLM flag Conveyor accepts (its forward is always eager)
    try:
        # a bfloat16 cache under the float32 model: twice the blocks a float32 cache gets from the same 32 MiB
        blocks_per_32mib = 32 * 2**20 // (2 * 2 * 16 * 2 * 16 * 2)  # k+v, layers, block, kv heads, head_dim, bytes
        assert f"{blocks_per_32mib} KV blocks of 16 tokens (bfloat16)" in server.log_tail(200)
        finished: list[str] = []

        async def run() -> None:
            client = server.async_openai_client()

            async def send(name: str, priority: int, delay_s: float, max_tokens: int = 20) -> None:
                await asyncio.sleep(delay_s)
                await client.completions.create(model=MODEL, prompt=name, max_tokens=max_tokens, temperature=0,
                                                extra_body={"ignore_eos": True, "priority": priority})
                finished.append(name)

            # "first" occupies the only slot; "later" (priority 10) queues before "urgent" (priority -5)
            await asyncio.gather(send("first", 0, 0.0, max_tokens=1500), send("later", 10, 0.5),
                                 send("urgent", -5, 1.0))

        asyncio.run(run())
        assert finished == ["first", "urgent", "later"]
    finally:
        assert server.stop() == []
