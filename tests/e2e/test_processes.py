"""Process tree: several frontends on one port, clean shutdown, and 503s (never hangs) when the engine dies."""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx
import pytest

from tests.server_harness import ConveyorServer, session_pids


def _pids_named(server: ConveyorServer, prefix: str) -> list[int]:
    return [pid for pid in session_pids(server.process.pid)
            if Path(f"/proc/{pid}/comm").read_text().strip().startswith(prefix)]


def _complete(server: ConveyorServer) -> httpx.Response:
    return httpx.post(f"{server.base_url}/v1/completions", timeout=60,
                      json={"model": server_model(server), "prompt": "Hi", "max_tokens": 3})


def server_model(server: ConveyorServer) -> str:
    return httpx.get(f"{server.base_url}/v1/models").json()["data"][0]["id"]


def test_two_frontends_share_one_port_and_stop_cleanly(tiny_models: Path) -> None:
    server = ConveyorServer(str(tiny_models / "llama"), "--api-server-count", "2", "--kv-cache-memory", "32MiB")
    try:
        frontends = _pids_named(server, "conveyor-fe")
        assert len(frontends) == 2
        assert all(_complete(server).status_code == 200 for _ in range(6))
        os.kill(frontends[0], signal.SIGKILL)  # the other process alone keeps the port served
        time.sleep(0.5)
        assert all(_complete(server).status_code == 200 for _ in range(6))
    finally:
        assert server.stop() == []


def test_ctrl_c_stops_the_whole_process_tree(tiny_models: Path) -> None:
    server = ConveyorServer(str(tiny_models / "llama"), "--api-server-count", "2", "--kv-cache-memory", "32MiB")
    assert _complete(server).status_code == 200
    assert server.stop(ctrl_c=True) == []
    assert server.process.returncode == 0


def _wait_until_dead(server: ConveyorServer) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and httpx.get(f"{server.base_url}/health").status_code == 200:
        time.sleep(0.2)
    time.sleep(2.0)  # the other frontend's heartbeat clock runs out a moment later
    for _ in range(6):  # new connections: both frontend processes answer
        assert httpx.get(f"{server.base_url}/health").status_code == 503
        response = _complete(server)
        assert response.status_code == 503
        assert set(response.json()["error"]) >= {"message", "type", "param", "code"}


@pytest.mark.parametrize("victim", ["conveyor-w0", "conveyor-core"])
def test_dead_engine_makes_every_frontend_answer_503(tiny_models: Path, victim: str) -> None:
    """A killed worker (the core notices and broadcasts a sentinel) or a killed core (heartbeats stop)."""
    server = ConveyorServer(str(tiny_models / "llama"), "--api-server-count", "2", "--kv-cache-memory", "32MiB")
    try:
        assert _complete(server).status_code == 200
        os.kill(_pids_named(server, victim)[0], signal.SIGKILL)
        _wait_until_dead(server)
    finally:
        assert server.stop() == []
