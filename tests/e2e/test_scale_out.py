"""Data parallel engines and frontends on their own: every part a real process, talking over ZeroMQ/HTTP.

- `-dp 2`: two engine cores behind one frontend; 32 concurrent requests spread over both, outputs equal a
  single engine's.
- An engine joining from "another host" (`--headless -dpr 1`) registers with rank 0 and takes work.
- `--headless` + two `conveyor frontend` processes on different ports; stopping one frontend leaves the other's
  in-flight requests alone.
"""
from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from tests.server_harness import ConveyorServer, free_port

SMALL = ("--kv-cache-memory", "64MiB", "--max-model-len", "512")
PROMPTS = [f"Request number {i}: the {word} is" for i, word in
           enumerate(["sky", "sea", "road", "tree", "house", "river", "cat", "song"] * 4)]


def _greedy(server: ConveyorServer, prompts: list[str], max_tokens: int = 8) -> list[str]:
    """All prompts at once (concurrently); the texts in prompt order."""
    async def run() -> list[str]:
        async with server.async_openai_client() as client:
            model = (await client.models.list()).data[0].id
            results = await asyncio.gather(*(client.completions.create(
                model=model, prompt=prompt, max_tokens=max_tokens, temperature=0) for prompt in prompts))
        return [result.choices[0].text for result in results]

    return asyncio.run(run())


def _engine_steps(server: ConveyorServer) -> dict[str, float]:
    """conveyor:engine_steps per engine label."""
    return {name.split('engine="')[1].split('"')[0]: value for name, value in server.metrics().items()
            if name.startswith("conveyor:engine_steps{")}


@pytest.fixture(scope="module")
def single_engine_texts(llama_server: ConveyorServer) -> list[str]:
    return [_greedy(llama_server, [prompt])[0] for prompt in PROMPTS]


def test_two_data_parallel_engines_share_32_concurrent_requests(tiny_models: Path,
                                                                single_engine_texts: list[str]) -> None:
    server = ConveyorServer(str(tiny_models / "llama"), "-dp", "2", *SMALL)
    try:
        assert _greedy(server, PROMPTS) == single_engine_texts
        steps = _engine_steps(server)
        assert set(steps) == {"0", "1"} and all(value > 0 for value in steps.values()), steps
        assert httpx.get(f"{server.base_url}/health").status_code == 200
    finally:
        assert server.stop() == []


def test_an_engine_from_another_host_joins_data_parallel(tiny_models: Path, single_engine_texts: list[str]) -> None:
    """Rank 0 (with the frontend) on one 'host', rank 1 started separately as a headless engine that joins."""
    rpc_port = str(free_port())
    joined = ["-dp", "2", "--data-parallel-address", "127.0.0.1", "--data-parallel-rpc-port", rpc_port]
    head = ConveyorServer(str(tiny_models / "llama"), *joined, "-dpl", "1", *SMALL, ready_log_line="engine core ready")
    other_host = ConveyorServer(str(tiny_models / "llama"), *joined, "--headless", "-dpr", "1", *SMALL,
                                ready_log_line="headless engine serving")
    try:
        head._wait_healthy(120)  # the frontend starts serving once rank 1 has registered
        assert _greedy(head, PROMPTS) == single_engine_texts
        steps = _engine_steps(head)
        assert all(steps[rank] > 0 for rank in ("0", "1")), steps
    finally:
        assert head.stop() == []
        assert other_host.stop() == []


@pytest.fixture(scope="module")
def headless_engine(tiny_models: Path) -> Iterator[str]:
    rpc_port = free_port()
    engine = ConveyorServer(str(tiny_models / "llama"), "--headless", "--data-parallel-rpc-port", str(rpc_port),
                            *SMALL, ready_log_line="headless engine serving")
    yield f"tcp://127.0.0.1:{rpc_port}"
    assert engine.stop() == []


def test_frontends_started_separately_share_a_headless_engine(headless_engine: str,
                                                             single_engine_texts: list[str]) -> None:
    first = ConveyorServer(None, "--engine-address", headless_engine, subcommand="frontend")
    second = ConveyorServer(None, "--engine-address", headless_engine, subcommand="frontend")
    try:
        assert _greedy(first, PROMPTS[:8]) == single_engine_texts[:8]
        assert _greedy(second, PROMPTS[8:16]) == single_engine_texts[8:16]
        # Long requests in flight on the second frontend while the first one stops.
        results: list[str] = []
        worker = threading.Thread(target=lambda: results.extend(_greedy(second, PROMPTS[:8], max_tokens=120)))
        worker.start()
        assert first.stop() == []
        worker.join(timeout=300)
        assert len(results) == 8 and all(results)
        assert _greedy(second, PROMPTS[:4]) == single_engine_texts[:4]
    finally:
        first.stop()
        assert second.stop() == []
