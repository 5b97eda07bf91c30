"""Tensor parallelism (`-tp 2`, gloo on CPU) through the real server.

Greedy outputs of a `-tp 2` server equal transformers' and a `-tp 1` server's token for token, with chosen-token
logprobs within 1e-3 of both, alone and with 16 requests in flight. A killed rank-1 worker makes the whole engine
dead: an open stream ends with an error event (never a hang) and `conveyor serve` exits non-zero so that a supervisor
restarts it; a `-tp 2` server stops on SIGTERM with exit code 0, no leftover processes and no crash in its log.
"""
from __future__ import annotations

import asyncio
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

from tests.e2e.test_parity import LOGPROB_TOLERANCE, MAX_TOKENS, PROMPTS
from tests.reference import greedy_reference
from tests.server_harness import ConveyorServer, session_pids

SERVER_ARGS = ("--kv-cache-memory", "64MiB", "--max-model-len", "512")
CRASH_MARKERS = ("traceback", "terminate called", "abort", "core dumped", "segmentation fault")


@dataclass
class TPServers:
    tp2: ConveyorServer
    tp1: ConveyorServer
    model: str  # the served model name, the same on both servers
    reference_path: str


@dataclass(frozen=True)
class Completion:
    text: str
    token_ids: list[int]
    logprobs: list[float]


def _completion(response: Any) -> Completion:  # an openai Completion
    choice = response.choices[0]
    return Completion(choice.text, (choice.model_extra or {}).get("token_ids"), choice.logprobs.token_logprobs)


def _request_kwargs(model: str, prompt: str) -> dict[str, Any]:
    return {"model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "logprobs": 1,
            "extra_body": {"return_token_ids": True}}


def _complete(server: ConveyorServer, model: str, prompt: str) -> Completion:
    return _completion(server.openai_client(timeout=120.0).completions.create(**_request_kwargs(model, prompt)))


def _assert_close(actual: list[float], expected: list[float], what: str) -> None:
    assert len(actual) == len(expected), what
    for position, (a, b) in enumerate(zip(actual, expected)):
        assert abs(a - b) < LOGPROB_TOLERANCE, f"{what} position {position}: {a} vs {b}"


def _pids_named(server: ConveyorServer, name: str) -> list[int]:
    pids = []
    for pid in session_pids(server.process.pid):
        try:
            if Path(f"/proc/{pid}/comm").read_text().strip() == name:
                pids.append(pid)
        except OSError:
            pass
    return pids


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def servers(request: pytest.FixtureRequest, tiny_models: Path) -> Iterator[TPServers]:
    """A `-tp 2` server and a `-tp 1` server of the same tiny checkpoint (the shared tiny-llama one for llama)."""
    path = str(tiny_models / request.param)
    started: list[ConveyorServer] = []
    try:
        if request.param == "llama":
            model = "tiny-llama"
            tp1 = request.getfixturevalue("llama_server")
        else:
            model = "tiny-qwen2"
            tp1 = ConveyorServer(path, "--served-model-name", model, *SERVER_ARGS)
            started.append(tp1)
        tp2 = ConveyorServer(path, "--served-model-name", model, "-tp", "2", *SERVER_ARGS)
        started.append(tp2)
        yield TPServers(tp2=tp2, tp1=tp1, model=model, reference_path=path)
    finally:
        for server in started:
            server.stop()


def test_tp2_runs_two_worker_processes(servers: TPServers) -> None:
    assert len(_pids_named(servers.tp2, "conveyor-w0")) == 1
    assert len(_pids_named(servers.tp2, "conveyor-w1")) == 1
    assert _pids_named(servers.tp1, "conveyor-w1") == []


def test_tp2_greedy_matches_transformers_and_tp1(servers: TPServers) -> None:
    for prompt in PROMPTS:
        expected_ids, expected_logprobs, expected_text = greedy_reference(servers.reference_path, prompt, MAX_TOKENS)
        tp2 = _complete(servers.tp2, servers.model, prompt)
        tp1 = _complete(servers.tp1, servers.model, prompt)
        assert tp2.token_ids == expected_ids, f"prompt {prompt!r}: tp=2 {tp2.token_ids} != HF {expected_ids}"
        assert tp2.token_ids == tp1.token_ids, f"prompt {prompt!r}: tp=2 {tp2.token_ids} != tp=1 {tp1.token_ids}"
        assert tp2.text == tp1.text == expected_text
        _assert_close(tp2.logprobs, expected_logprobs, f"{prompt!r} tp=2 vs HF")
        _assert_close(tp2.logprobs, tp1.logprobs, f"{prompt!r} tp=2 vs tp=1")


def test_tp2_concurrent_requests_match_sequential(servers: TPServers) -> None:
    alone = {prompt: _complete(servers.tp2, servers.model, prompt) for prompt in PROMPTS}

    async def run_all() -> list[tuple[str, Completion]]:
        client = servers.tp2.async_openai_client(timeout=120.0)
        prompts = PROMPTS * 2  # 16 requests in flight together
        responses = await asyncio.gather(*[
            client.completions.create(**_request_kwargs(servers.model, prompt)) for prompt in prompts])
        return [(prompt, _completion(response)) for prompt, response in zip(prompts, responses)]

    for prompt, together in asyncio.run(run_all()):
        assert together.token_ids == alone[prompt].token_ids, f"prompt {prompt!r}"
        assert together.text == alone[prompt].text
        _assert_close(together.logprobs, alone[prompt].logprobs, f"{prompt!r} concurrent vs alone")


def test_tp2_server_stops_cleanly(servers: TPServers) -> None:
    """Runs last for each checkpoint (definition order): SIGTERM, then every process is gone by itself."""
    server = servers.tp2
    assert server.stop() == []
    assert server.process.returncode == 0
    log = server.log_path.read_text(errors="replace")
    crashes = [line for line in log.splitlines() if any(marker in line.lower() for marker in CRASH_MARKERS)]
    assert crashes == [], "\n".join(crashes)
    for rank in (0, 1):  # each rank left through its own exit path (not killed by the executor's deadline)
        assert f"worker {rank} stopped" in log, server.log_tail()


def _model_name(server: ConveyorServer) -> str:
    return str(httpx.get(f"{server.base_url}/v1/models", timeout=10.0).json()["data"][0]["id"])


def _start_tp2_llama(tiny_models: Path) -> ConveyorServer:
    server = ConveyorServer(str(tiny_models / "llama"), "-tp", "2", "--kv-cache-memory", "32MiB",
                            "--max-model-len", "512")
    response = httpx.post(f"{server.base_url}/v1/completions", timeout=60.0,
                          json={"model": _model_name(server), "prompt": "Hi", "max_tokens": 3})
    assert response.status_code == 200
    return server


def _assert_server_exits_after_engine_death(server: ConveyorServer, killed_at: float) -> None:
    """The dead engine ends `conveyor serve`: exit code non-zero within 10 s of the kill, the reason logged."""
    server.process.wait(timeout=max(0.1, 10.0 - (time.monotonic() - killed_at)))
    assert server.process.returncode not in (0, None)
    assert "stopping the server (exit code 1)" in server.log_tail(200), server.log_tail()


def test_killed_idle_rank1_worker_ends_the_server(tiny_models: Path) -> None:
    server = _start_tp2_llama(tiny_models)
    try:
        victims = _pids_named(server, "conveyor-w1")
        assert len(victims) == 1
        os.kill(victims[0], signal.SIGKILL)
        _assert_server_exits_after_engine_death(server, time.monotonic())
    finally:
        assert server.stop() == []


def test_rank1_worker_killed_mid_generation_ends_the_server(tiny_models: Path) -> None:
    """SIGKILL `conveyor-w1` while a request streams: the stream ends with an error event, the server exits."""
    server = _start_tp2_llama(tiny_models)
    try:
        model = _model_name(server)
        victims = _pids_named(server, "conveyor-w1")
        assert len(victims) == 1
        chunks, errors, killed_at = 0, 0, 0.0
        with httpx.stream("POST", f"{server.base_url}/v1/completions", timeout=30.0, json={
                "model": model, "prompt": "A long story:", "max_tokens": 480, "temperature": 0,
                "ignore_eos": True, "stream": True}) as response:
            for line in response.iter_lines():  # a hang raises httpx.ReadTimeout
                if line.startswith("data:") and '"error"' in line:
                    errors += 1
                elif line.startswith("data:") and line != "data: [DONE]":
                    chunks += 1
                    if chunks == 1:
                        os.kill(victims[0], signal.SIGKILL)
                        killed_at = time.monotonic()
        assert chunks < 480, "the request finished although a rank died during it"
        assert errors == 1, "the stream did not end with an error event"
        _assert_server_exits_after_engine_death(server, killed_at)
    finally:
        assert server.stop() == []
