"""The process entry point: two `run_frontend` processes share one port and exit cleanly on SIGTERM."""
from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import time

import httpx

from engine_core.config import FrontendConfig
from tests.frontend.conftest import SERVED_NAME, canned_token_ids, model_config
from tests.frontend.fake_core import FakeCore
from tests.server_harness import free_port


def test_frontend_imports_no_torch() -> None:
    code = "import sys, frontend.server; assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=os.path.dirname(os.path.dirname(
        os.path.dirname(os.path.abspath(__file__)))))


def test_two_frontends_share_a_port_and_stop_on_sigterm() -> None:
    from frontend.server import run_frontend

    core = FakeCore(canned_token_ids(), model_config=model_config())
    port = free_port()
    context = multiprocessing.get_context("spawn")
    frontend_config = FrontendConfig(host="127.0.0.1", port=port, api_server_count=2)
    processes = [context.Process(target=run_frontend, args=(frontend_config, core.address, index, index))
                 for index in range(2)]
    try:
        for process in processes:
            process.start()
        assert core.wait_for(lambda: sorted(core.hellos) == [0, 1], timeout_s=30)
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "frontends did not come up"
            time.sleep(0.1)
        for _ in range(8):  # new connections each time: the kernel spreads them over both processes
            response = httpx.post(f"http://127.0.0.1:{port}/v1/completions",
                                  json={"model": SERVED_NAME, "prompt": "x", "max_tokens": 2}, timeout=10)
            assert response.status_code == 200
        assert {request.client_index for request in core.requests} <= {0, 1}
        for process in processes:
            os.kill(process.pid, signal.SIGTERM)
        for process in processes:
            process.join(timeout=15)
            assert process.exitcode == 0
    finally:
        for process in processes:
            if process.is_alive():
                process.kill()
        core.close()
