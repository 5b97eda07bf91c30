"""Start `scripts/disagg_proxy.py` as a real process for tests, and stop it without leftovers.

    process, base_url = start_proxy(["http://127.0.0.1:8100"], ["http://127.0.0.1:8200"])
    ...  # openai.OpenAI(base_url=f"{base_url}/v1", api_key=...)
    assert stop_proxy(process) == []
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import httpx

from tests.server_harness import REPO_ROOT, free_port, session_pids

PROXY_SCRIPT = REPO_ROOT / "scripts" / "disagg_proxy.py"


def proxy_log_path(base_url: str) -> Path:
    """Where `start_proxy` wrote the proxy's output (debug level: one line per request)."""
    port = base_url.rsplit(":", 1)[1]
    return Path(os.environ.get("CONVEYOR_TEST_LOG_DIR", "/tmp")) / f"conveyor-proxy-{port}.log"


def start_proxy(prefill_urls: Sequence[str], decode_urls: Sequence[str], *args: str,
                timeout_s: float = 60.0) -> tuple[subprocess.Popen[bytes], str]:
    """`python scripts/disagg_proxy.py` on a free port, in its own session; returns once it answers HTTP.

    Readiness is "/health answers at all", not "answers 200": the proxy's health is its upstreams' health, and
    tests of unreachable upstreams need a proxy whose /health is 503."""
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    command = [sys.executable, str(PROXY_SCRIPT), "--host", "127.0.0.1", "--port", str(port),
               "--prefill", *prefill_urls, "--decode", *decode_urls, "--log-level", "debug", *args]
    with open(proxy_log_path(base_url), "wb") as log:
        process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"proxy exited during start-up (code {process.returncode}):\n"
                               f"{proxy_log_path(base_url).read_text(errors='replace')}")
        try:
            httpx.get(f"{base_url}/health", timeout=10.0)
            return process, base_url
        except httpx.HTTPError:
            time.sleep(0.1)
    stop_proxy(process)
    raise RuntimeError(f"proxy not answering after {timeout_s} s")


def stop_proxy(process: subprocess.Popen[bytes], timeout_s: float = 20.0) -> list[int]:
    """SIGTERM the proxy; return the pids still alive in its session afterwards (should be none)."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    leftovers = session_pids(process.pid)
    for pid in leftovers:  # never leave a mess for the next test, but report it
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return leftovers
