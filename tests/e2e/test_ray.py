"""Ray: `--distributed-executor-backend ray` and the Ray Serve application, on a local Ray cluster this module
starts (`ray start --head`, its own temp dir and ports) and stops (`ray stop --force`).

- `conveyor serve --distributed-executor-backend ray` (RAY_ADDRESS = that cluster), `-tp 1` and `-tp 2`: ranks run
  as Ray actors, greedy tokens equal the default (mp) executor's; a killed rank-1 actor makes the engine answer
  503; SIGTERM leaves no actor behind.
- `serve run conveyor.ray_serve:build_app ... num_replicas=2`: two replicas, each with its own engine, answer chat
  completions (plain and streamed) through the official openai client with the mp server's greedy answer.
"""
from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

from tests.e2e.test_parity import MAX_TOKENS, PROMPTS
from tests.server_harness import REPO_ROOT, ConveyorServer, free_port, session_pids

pytest.importorskip("ray", reason="ray is not installed (make install adds the [ray] extra)")

BIN = Path(sys.executable).parent
SERVER_ARGS = ("--served-model-name", "tiny-llama", "--max-model-len", "512", "--kv-cache-memory", "64MiB")
CHAT_MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


class RayCluster:
    """`ray start --head` in its own session; `address` is what RAY_ADDRESS takes."""

    def __init__(self) -> None:
        self.temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # Ray's socket paths must stay short
        # Token authentication off: a token left in ~/.ray by some earlier local `ray.init()` would otherwise turn it
        # on for this cluster only, and clients without RAY_AUTH_MODE=token could not connect.
        self.env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1", "RAY_AUTH_MODE": "disabled"}
        self.env.pop("RAY_ADDRESS", None)
        gcs_port = free_port()
        command = [str(BIN / "ray"), "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(gcs_port),
                   "--num-cpus", "4", "--include-dashboard=false", "--disable-usage-stats",
                   "--temp-dir", self.temp_dir, "--ray-client-server-port", str(free_port()),
                   "--dashboard-agent-listen-port", str(free_port()),  # its default (52365) is a fixed port
                   "--min-worker-port", "0", "--max-worker-port", "0"]
        self.started = subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=180,
                                      start_new_session=True)
        if self.started.returncode != 0:
            self.stop()
            raise RuntimeError(f"ray start failed:\n{self.started.stdout}\n{self.started.stderr}")
        # Ray swaps 127.0.0.1 for the host's own IP: read the address it settled on.
        current = Path(self.temp_dir) / "ray_current_cluster"
        self.address = current.read_text().strip() if current.exists() else f"127.0.0.1:{gcs_port}"
        self.env["RAY_ADDRESS"] = self.address

    def status(self) -> str:
        """`ray status`: nodes and resource usage (placement-group reservations count as used)."""
        return subprocess.run([str(BIN / "ray"), "status"], env=self.env, capture_output=True, text=True,
                              timeout=60).stdout

    def wait_for_cpu_usage(self, cpus: float, timeout_s: float = 60.0) -> None:
        """Until `ray status` shows `cpus` of the cluster's 4 CPUs in use (it reports with a short delay)."""
        deadline = time.monotonic() + timeout_s
        while f" {cpus:.1f}/4.0 CPU" not in (status := self.status()):
            if time.monotonic() > deadline:
                raise AssertionError(f"ray status does not show {cpus:.1f}/4.0 CPU in use:\n{status}")
            time.sleep(1.0)

    def stop(self) -> None:
        subprocess.run([str(BIN / "ray"), "stop", "--force"], env=self.env, capture_output=True, timeout=120)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _pids_with_cmdline(prefix: str) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if cmdline.startswith(prefix):
                pids.append(int(entry))
    return pids


def _children(pid: int) -> list[int]:
    children = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                parent = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if parent == pid:
                children.append(int(entry))
    return children


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _wait_for(condition: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.25)


def _greedy_token_ids(server: ConveyorServer, prompt: str) -> list[int]:
    response = server.openai_client(timeout=120.0).completions.create(
        model="tiny-llama", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
        extra_body={"return_token_ids": True})
    token_ids = (response.choices[0].model_extra or {}).get("token_ids")
    assert token_ids, response
    return list(token_ids)


def _greedy_chat(client: Any) -> str:
    reply = client.chat.completions.create(model="tiny-llama", messages=CHAT_MESSAGES, max_tokens=MAX_TOKENS,
                                           temperature=0)
    return str(reply.choices[0].message.content)


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[RayCluster]:
    cluster = RayCluster()
    try:
        yield cluster
    finally:
        cluster.stop()


def test_serve_app_options_from_strings() -> None:
    """What `serve run ... key=value` hands build_app: strings, mapped onto `conveyor serve` flags."""
    with warnings.catch_warnings():  # ray.serve's own pydantic deprecation warnings
        warnings.simplefilter("ignore")
        from conveyor.ray_serve import deployment_options, engine_argv

    assert engine_argv({"model": "/m", "tensor_parallel_size": "2", "enable_prefix_caching": "false",
                        "served_model_name": "a b", "distributed_executor_backend": "ray"}) == [
        "/m", "--tensor-parallel-size", "2", "--no-enable-prefix-caching", "--served-model-name", "a", "b",
        "--distributed-executor-backend", "ray"]
    with pytest.raises(ValueError, match="unknown option"):
        engine_argv({"tensor_parallel": "2"})
    with pytest.raises(ValueError, match="Serve proxy"):
        engine_argv({"port": "8000"})
    autoscaled = deployment_options({"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 8.0})
    assert autoscaled["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 8.0}
    assert autoscaled["max_ongoing_requests"] >= 16
    assert deployment_options({"num_replicas": 2})["num_replicas"] == 2
    with pytest.raises(ValueError):
        deployment_options({"num_replicas": 2, "max_replicas": 3})


@pytest.mark.parametrize("tp", [1, 2])
def test_ray_executor_matches_mp_executor(tp: int, ray_cluster: RayCluster, llama_server: ConveyorServer,
                                          tiny_models: Path) -> None:
    server = ConveyorServer(str(tiny_models / "llama"), *SERVER_ARGS, "--distributed-executor-backend", "ray",
                            "-tp", str(tp), env={"RAY_ADDRESS": ray_cluster.address, "RAY_AUTH_MODE": "disabled"})
    try:
        log = server.log_path.read_text(errors="replace")
        assert f"joined the Ray cluster at {ray_cluster.address}" in log, server.log_tail()
        actors = _pids_with_cmdline("ray::RayWorker")
        assert sorted(_comm(pid) for pid in actors) == [f"conveyor-w{rank}" for rank in range(tp)]
        assert not [pid for pid in session_pids(server.process.pid) if _comm(pid).startswith("conveyor-w")], \
            "with Ray the ranks are actors, not children of the server"
        ray_cluster.wait_for_cpu_usage(float(tp))  # one placement-group bundle of 1 CPU per rank
        for prompt in PROMPTS:
            assert _greedy_token_ids(server, prompt) == _greedy_token_ids(llama_server, prompt), prompt
        if tp == 2:  # a dead rank makes the whole engine report dead: 503s, never a hang
            os.kill(next(pid for pid in actors if _comm(pid) == "conveyor-w1"), signal.SIGKILL)
            _wait_for(lambda: httpx.get(f"{server.base_url}/health", timeout=5.0).status_code == 503, 60,
                      "/health to answer 503")
            response = httpx.post(f"{server.base_url}/v1/completions", timeout=30.0,
                                  json={"model": "tiny-llama", "prompt": "Hello", "max_tokens": 4})
            assert response.status_code == 503, response.text
            assert "Ray worker actor of rank 1" in server.log_path.read_text(errors="replace")
    finally:
        assert server.stop() == []
    _wait_for(lambda: not _pids_with_cmdline("ray::RayWorker"), 30, "the Ray worker actors to go")
    ray_cluster.wait_for_cpu_usage(0.0)  # the placement group is gone


def test_ray_serve_app_with_two_replicas(ray_cluster: RayCluster, llama_server: ConveyorServer,
                                         tiny_models: Path) -> None:
    http_port = free_port()
    subprocess.run([str(BIN / "serve"), "start", "--http-host", "127.0.0.1", "--http-port", str(http_port)],
                   env=ray_cluster.env, cwd=REPO_ROOT, check=True, capture_output=True, timeout=180)
    log_path = Path(os.environ.get("CONVEYOR_TEST_LOG_DIR", "/tmp")) / f"conveyor-test-serve-{http_port}.log"
    with open(log_path, "w") as log:
        run = subprocess.run(
            [str(BIN / "serve"), "run", "--non-blocking", "conveyor.ray_serve:build_app",
             f"model={tiny_models / 'llama'}", "served_model_name=tiny-llama", "max_model_len=512",
             "kv_cache_memory=64MiB", "num_replicas=2", "num_cpus=1"],
            env=ray_cluster.env, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, timeout=420)
    output = log_path.read_text(errors="replace")
    assert run.returncode == 0 and "is ready at" in output, output[-5000:]

    replicas = _pids_with_cmdline("ray::ServeReplica:default:Conveyor")
    assert len(replicas) == 2, output[-5000:]
    cores = [child for replica in replicas for child in _children(replica) if _comm(child) == "conveyor-core"]
    assert len(cores) == 2, "each replica runs its own engine core"

    base_url = f"http://127.0.0.1:{http_port}"
    import openai

    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", timeout=120.0)
    assert [model.id for model in client.models.list().data] == ["tiny-llama"]
    expected = _greedy_chat(llama_server.openai_client(timeout=120.0))
    assert _greedy_chat(client) == expected

    async def several() -> list[str]:
        async_client = openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused", timeout=120.0)
        replies = await asyncio.gather(*[
            async_client.chat.completions.create(model="tiny-llama", messages=CHAT_MESSAGES,
                                                 max_tokens=MAX_TOKENS, temperature=0) for _ in range(8)])
        return [str(reply.choices[0].message.content) for reply in replies]

    assert asyncio.run(several()) == [expected] * 8
    stream = client.chat.completions.create(model="tiny-llama", messages=CHAT_MESSAGES, max_tokens=MAX_TOKENS,
                                            temperature=0, stream=True)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices) == expected
    assert httpx.get(f"{base_url}/health", timeout=10.0).status_code == 200
    assert "vllm:num_requests_running" in httpx.get(f"{base_url}/metrics", timeout=10.0).text

    ray_cluster.stop()  # replicas go with the cluster; their engines follow (parent-death signal)
    _wait_for(lambda: not any(Path(f"/proc/{pid}").exists() and _comm(pid) == "conveyor-core" for pid in cores),
              30, "the replicas' engine cores to exit")
