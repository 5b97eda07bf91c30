"""Graceful drain and reconnects, with real processes.

- SIGTERM to `conveyor serve --shutdown-timeout 120` during 8 streams: /health and a new request answer 503 (OpenAI
  error shape; the listeners stay open while the drain runs), all 8 streams finish whole, exit code 0, nothing left.
- `--shutdown-timeout 1` with long streams: they end with an error event after ~1 s, the server exits 0 in time.
- `conveyor frontend` against a `--headless` engine: 503 (and a failing /health) while the engine is down, serving
  again once an engine with the same model answers at that address; one with another model is refused (logged)
  and /health stays 503. The headless engine itself exits non-zero when its core is killed.
(Kills of cores and workers under load, for `conveyor serve`: tests/e2e/test_processes.py.)
"""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx

from tests.e2e.streams import open_streams, still_open
from tests.server_harness import ConveyorServer, free_port, session_pids

SMALL = ("--kv-cache-memory", "64MiB", "--max-model-len", "2048")


def _status(server: ConveyorServer, method: str, path: str) -> httpx.Response:
    """One request on a new connection; retried if it met a frontend just closing its listener."""
    for attempt in range(3):
        try:
            return httpx.request(method, f"{server.base_url}{path}", timeout=10.0,
                                 json={"prompt": "Hi", "max_tokens": 3} if method == "POST" else None)
        except httpx.ConnectError:
            if attempt == 2:
                raise
            time.sleep(0.1)
    raise AssertionError("unreachable")


def _assert_503(response: httpx.Response) -> None:
    assert response.status_code == 503, response.text
    assert set(response.json()["error"]) >= {"message", "type", "param", "code"}


def test_sigterm_drains_open_streams_then_exits_0(tiny_models: Path) -> None:
    server = ConveyorServer(str(tiny_models / "llama"), "--api-server-count", "2", "--shutdown-timeout", "120",
                            *SMALL)
    try:
        streams = open_streams(server, 8, max_tokens=400)
        signalled_at = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        _assert_503(_status(server, "GET", "/health"))
        _assert_503(_status(server, "POST", "/v1/completions"))
        assert not all(stream.ended_at for stream in streams), "the streams ended before the 503 checks"
        for stream in streams:
            stream.join(timeout=150)
        assert all(stream.finished_whole and stream.completion_tokens == 400 for stream in streams), \
            [(s.completion_tokens, s.finish_reason, s.error, s.exception) for s in streams]
        server.process.wait(timeout=max(1.0, 130 - (time.monotonic() - signalled_at)))
        assert server.process.returncode == 0, server.log_tail()
    finally:
        assert server.stop() == []


def test_shutdown_timeout_aborts_long_streams_with_an_error(tiny_models: Path) -> None:
    server = ConveyorServer(str(tiny_models / "llama"), "--api-server-count", "2", "--shutdown-timeout", "1",
                            *SMALL)
    try:
        streams = still_open(open_streams(server, 4, max_tokens=2000), at_least=2)
        signalled_at = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        for stream in streams:
            stream.join(timeout=30)
        for stream in streams:
            assert stream.error is not None and "shutting down" in stream.error["message"], \
                (stream.chunks, stream.error, stream.exception)
            assert 0.9 < stream.ended_at - signalled_at < 6.0, stream.ended_at - signalled_at
        server.process.wait(timeout=max(1.0, 15 - (time.monotonic() - signalled_at)))  # 1 s + the way out
        assert server.process.returncode == 0, server.log_tail()
    finally:
        assert server.stop() == []


def _headless(tiny_models: Path, rpc_port: int, *args: str) -> ConveyorServer:
    return ConveyorServer(str(tiny_models / "llama"), "--headless", "--data-parallel-rpc-port", str(rpc_port),
                          *SMALL, *args, ready_log_line="headless engine serving")


def _wait_for_health(server: ConveyorServer, status: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while _status(server, "GET", "/health").status_code != status:
        assert time.monotonic() < deadline, f"/health is not {status} after {timeout_s} s:\n{server.log_tail()}"
        time.sleep(0.2)


def _complete(server: ConveyorServer) -> httpx.Response:
    return httpx.post(f"{server.base_url}/v1/completions", timeout=60.0,
                      json={"prompt": "Hi", "max_tokens": 3, "temperature": 0})


def test_remote_frontend_waits_for_its_engine_and_refuses_another_model(tiny_models: Path) -> None:
    rpc_port = free_port()
    engine = _headless(tiny_models, rpc_port)
    frontend = ConveyorServer(None, "--engine-address", f"tcp://127.0.0.1:{rpc_port}", subcommand="frontend")
    engines = [engine]
    try:
        assert _complete(frontend).status_code == 200
        core = _session_pids_named(engine, "conveyor-core")[0]
        killed_at = time.monotonic()
        os.kill(core, signal.SIGKILL)
        engine.process.wait(timeout=10)  # a headless engine is supervised like `conveyor serve`
        assert engine.process.returncode not in (0, None) and time.monotonic() - killed_at < 10
        assert engine.stop() == []
        _wait_for_health(frontend, 503, timeout_s=15)  # the heartbeats stopped: 5 s
        _assert_503(_complete(frontend))

        engines.append(engine := _headless(tiny_models, rpc_port))  # the same model at the same address
        _wait_for_health(frontend, 200, timeout_s=30)
        assert _complete(frontend).status_code == 200
        assert "is back" in frontend.log_tail(200)

        engine.process.send_signal(signal.SIGTERM)
        engine.process.wait(timeout=30)
        assert engine.process.returncode == 0 and engine.stop() == []
        _wait_for_health(frontend, 503, timeout_s=15)
        engines.append(engine := _headless(tiny_models, rpc_port, "--served-model-name", "another-model"))
        deadline = time.monotonic() + 30
        while "refusing the engine" not in frontend.log_tail(400):
            assert time.monotonic() < deadline, frontend.log_tail()
            time.sleep(0.2)
        time.sleep(2.0)
        _assert_503(_status(frontend, "GET", "/health"))
        _assert_503(_complete(frontend))
    finally:
        assert frontend.stop() == []
        for started in engines:
            started.stop()


def _session_pids_named(server: ConveyorServer, name: str) -> list[int]:
    return [pid for pid in session_pids(server.process.pid)
            if Path(f"/proc/{pid}/comm").read_text().strip() == name]
