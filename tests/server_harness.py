"""Start a real `conveyor serve` process tree for end-to-end tests and tear it down without leftovers."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

REPO_ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def session_pids(session_id: int) -> list[int]:
    """Live processes in a session (the server's process tree), read from /proc."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        state, session = fields[0], int(fields[3])
        if session == session_id and state != "Z":
            pids.append(int(entry))
    return pids


def wait_until_healthy(base_url: str, process: subprocess.Popen[Any], timeout_s: float) -> bool:
    """Poll `GET /health` until 200 (True) or the timeout (False); raise if the process exits first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited during start-up (code {process.returncode})")
        try:
            if httpx.get(f"{base_url}/health", timeout=2.0).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    return False


class ConveyorServer:
    """`python -m conveyor serve MODEL ARGS...` in its own session, on a free port.

    `subcommand="frontend"` runs `conveyor frontend ARGS...` instead (give no model); `ready_log_line` waits for
    that text in the log instead of a healthy /health (a `--headless` engine has no HTTP).
    """

    def __init__(self, model: str | None, *args: str, api_key: str | None = None,
                 env: dict[str, str] | None = None, startup_timeout_s: float = 300.0, subcommand: str = "serve",
                 ready_log_line: str | None = None) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.api_key = api_key
        command = [sys.executable, "-m", "conveyor", subcommand]
        if model is not None:
            command.append(model)
        command += ["--port", str(self.port), *args]
        if api_key:
            command += ["--api-key", api_key]
        self.log_path = Path(os.environ.get("CONVEYOR_TEST_LOG_DIR", "/tmp")) / f"conveyor-test-{self.port}.log"
        self._log = open(self.log_path, "w")
        process_env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), **(env or {})}
        self.process = subprocess.Popen(command, cwd=REPO_ROOT, env=process_env, stdout=self._log,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        if ready_log_line is None:
            self._wait_healthy(startup_timeout_s)
        else:
            self._wait_for_log_line(ready_log_line, startup_timeout_s)

    def _wait_for_log_line(self, text: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if text in self.log_path.read_text(errors="replace"):
                return
            if self.process.poll() is not None:
                raise RuntimeError(f"process exited during start-up (code {self.process.returncode}):\n"
                                   f"{self.log_tail()}")
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"no {text!r} in the log after {timeout_s} s:\n{self.log_tail()}")

    def _wait_healthy(self, timeout_s: float) -> None:
        try:
            if wait_until_healthy(self.base_url, self.process, timeout_s):
                return
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}:\n{self.log_tail()}") from None
        self.stop()
        raise RuntimeError(f"server not healthy after {timeout_s} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 60) -> str:
        self._log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def openai_client(self, **kwargs):  # noqa: ANN003
        import openai

        return openai.OpenAI(base_url=f"{self.base_url}/v1", api_key=self.api_key or "unused", **kwargs)

    def async_openai_client(self, **kwargs):  # noqa: ANN003
        import openai

        return openai.AsyncOpenAI(base_url=f"{self.base_url}/v1", api_key=self.api_key or "unused", **kwargs)

    def metrics(self) -> dict[str, float]:
        """Prometheus text -> {'name{labels}': value} for simple assertions."""
        text = httpx.get(f"{self.base_url}/metrics", timeout=10.0).text
        values: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                values[name] = float(value)
        return values

    def metric(self, prefix: str) -> float:
        """The value of the first sample whose name starts with `prefix` (labels ignored)."""
        for name, value in self.metrics().items():
            if name.split("{")[0] == prefix:
                return value
        raise KeyError(prefix)

    def stop(self, timeout_s: float = 30.0, ctrl_c: bool = False) -> list[int]:
        """SIGTERM the launcher (or, with `ctrl_c`, SIGINT its whole process group as a terminal's Ctrl-C does);
        return the pids still alive in its session afterwards (should be none)."""
        session = self.process.pid
        if self.process.poll() is None:
            if ctrl_c:
                os.killpg(session, signal.SIGINT)
            else:
                self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
        deadline = time.monotonic() + 10.0
        while session_pids(session) and time.monotonic() < deadline:
            time.sleep(0.2)
        leftovers = session_pids(session)
        for pid in leftovers:  # never leave a mess for the next test, but report it
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self._log.close()
        return leftovers
