"""Process tree: several frontends on one port, clean shutdown, and a dead engine (worker or core) failing the open
requests and ending `conveyor serve` with a non-zero exit code, so a supervisor restarts it."""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx
import pytest

from tests.e2e.streams import open_streams, still_open
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


def test_metrics_of_two_frontends_are_one_view(tiny_models: Path) -> None:
    """--api-server-count 2: after 20 requests spread over both frontends, every scrape (whichever frontend
    answers it) counts all 20 (Prometheus' multiprocess mode), and the engine gauges appear once per engine."""
    server = ConveyorServer(str(tiny_models / "llama"), "--api-server-count", "2", "--kv-cache-memory", "32MiB")
    try:
        with httpx.Client(base_url=server.base_url, timeout=60) as client:
            for _ in range(20):  # a fresh connection each: the kernel spreads them over both frontends
                assert client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2},
                                   headers={"connection": "close"}).status_code == 200
        for _ in range(8):
            metrics = server.metrics()
            finished = sum(value for name, value in metrics.items()
                           if name.startswith("conveyor:request_success_total{"))
            assert finished == 20
            assert len([name for name in metrics if name.startswith("conveyor:num_requests_running{")]) == 1
    finally:
        assert server.stop() == []


def test_ctrl_c_stops_the_whole_process_tree(tiny_models: Path) -> None:
    server = ConveyorServer(str(tiny_models / "llama"), "--api-server-count", "2", "--kv-cache-memory", "32MiB")
    assert _complete(server).status_code == 200
    assert server.stop(ctrl_c=True) == []
    assert server.process.returncode == 0


@pytest.mark.parametrize("victim, args", [("conveyor-w0", ()), ("conveyor-core", ()),
                                          ("conveyor-core1", ("-dp", "2"))])
def test_dead_engine_fails_open_streams_and_ends_the_server(tiny_models: Path, victim: str,
                                                            args: tuple[str, ...]) -> None:
    """kill -9 of a worker (the core notices, tells the frontends, exits 1) or of a core (the launcher notices)
    while streams are open on both frontends: every stream ends with an error event within 5 s, `conveyor serve`
    exits non-zero within 10 s and leaves no process behind. With -dp 2, either engine's death ends the server."""
    server = ConveyorServer(str(tiny_models / "llama"), "--api-server-count", "2", "--kv-cache-memory", "32MiB",
                            "--max-model-len", "2048", *args)
    try:
        streams = still_open(open_streams(server, 6, max_tokens=2000), at_least=3)
        killed_at = time.monotonic()
        os.kill(_pids_named(server, victim)[0], signal.SIGKILL)
        for stream in streams:
            stream.join(timeout=30)
        for stream in streams:
            # With -dp 2 the other engine lives on: a stream it serves may reach its last token before the
            # frontends hear of the death, and ends whole instead.
            ended_whole = "-dp" in args and stream.finished_whole
            assert stream.error is not None or ended_whole, (stream.chunks, stream.exception, server.log_tail())
            assert stream.ended_at - killed_at < 5.0, stream.ended_at - killed_at
        assert any(stream.error is not None for stream in streams)
        server.process.wait(timeout=max(0.1, 10.0 - (time.monotonic() - killed_at)))
        assert server.process.returncode not in (0, None)
        assert "stopping the server (exit code 1)" in server.log_tail(200)
    finally:
        assert server.stop() == []
