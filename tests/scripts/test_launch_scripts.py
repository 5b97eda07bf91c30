"""scripts/launch_node.sh for real on the tiny Llama, and scripts/launch_disagg.sh's command lines (--dry-run).

launch_disagg.sh's argument handling is checked through the exact commands it prints, including that
`conveyor serve` accepts them; one real run on the tiny Llama checks that the KV really travels from its prefill
instance to its decode instance and that SIGTERM leaves nothing behind.
"""
from __future__ import annotations

import json
import os
import queue
import re
import shlex
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import IO, Any

import httpx
import openai
import pytest

from tests.server_harness import REPO_ROOT, free_port, session_pids

LAUNCH_NODE = REPO_ROOT / "scripts" / "launch_node.sh"
LAUNCH_DISAGG = REPO_ROOT / "scripts" / "launch_disagg.sh"
ENV_WORD = re.compile(r"^[A-Z_]+=")


def script_env(**overrides: str) -> dict[str, str]:
    """The test environment without the variables the scripts read, so that only `overrides` steer them."""
    env = {key: value for key, value in os.environ.items()
           if key not in {"PORT", "HOST", "TP", "API_SERVERS", "KV_CONNECTOR", "KV_IP", "CUDA_VISIBLE_DEVICES",
                          "PREFILL_PORT", "DECODE_PORT", "PREFILL_KV_PORT", "PREFILL_GPUS", "DECODE_GPUS",
                          "KV_SHARED_PATH", "KV_EXTRA_CONFIG", "LOG_DIR", "LOG_FILE", "DRY_RUN"}}
    env["CUDA_VISIBLE_DEVICES"] = ""  # CPU, whatever this machine has: the tiny model is not sharded over GPUs
    return {**env, **overrides}


def parse_command(line: str) -> tuple[dict[str, str], list[str]]:
    """`NAME=value ... program args` as the scripts print it -> (environment, argv)."""
    words = shlex.split(line)
    env: dict[str, str] = {}
    while words and ENV_WORD.match(words[0]):
        name, _, value = words.pop(0).partition("=")
        env[name] = value
    return env, words


def flag_value(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


@pytest.mark.parametrize("script", [LAUNCH_NODE, LAUNCH_DISAGG], ids=lambda path: path.name)
def test_scripts_are_valid_bash(script: Path) -> None:
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert os.access(script, os.X_OK), f"{script} is not executable"


# ---------------------------------------------------------------------------------------------- launch_node.sh

def node_dry_run(*args: str, **env: str) -> tuple[dict[str, str], list[str]]:
    result = subprocess.run([str(LAUNCH_NODE), *args], env=script_env(DRY_RUN="1", **env), capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    (line,) = [line for line in result.stdout.splitlines() if line.startswith("+ ")]
    return parse_command(line[2:])


def test_launch_node_sizes_the_node() -> None:
    env, argv = node_dry_run("/models/m", "--max-model-len", "512", CUDA_VISIBLE_DEVICES="0,1,3",
                             OMP_NUM_THREADS="")
    assert argv[1:5] == ["-m", "conveyor", "serve", "/models/m"]
    assert (flag_value(argv, "-tp"), flag_value(argv, "--host"), flag_value(argv, "--port")) == ("3", "0.0.0.0",
                                                                                                  "8000")
    assert argv[-2:] == ["--max-model-len", "512"]
    assert env["TOKENIZERS_PARALLELISM"] == "false" and "OMP_NUM_THREADS" not in env  # GPUs: no CPU threads

    cores = len(os.sched_getaffinity(0))
    env, argv = node_dry_run("--port", "9001", TP="2", API_SERVERS="3", HOST="127.0.0.1",
                             OMP_NUM_THREADS="")  # empty: the script picks the per-worker share
    assert argv[4] == "--host"  # no MODEL: the embedded default
    assert (flag_value(argv, "-tp"), flag_value(argv, "--api-server-count")) == ("2", "3")
    assert env["OMP_NUM_THREADS"] == str(max(1, cores // 2))
    env, argv = node_dry_run()
    assert flag_value(argv, "--api-server-count") == str(max(1, cores // 4))


def test_launch_node_reports_a_server_that_dies(tmp_path: Path) -> None:
    result = subprocess.run([str(LAUNCH_NODE), str(tmp_path / "no-such-model")], capture_output=True, text=True,
                            env=script_env(PORT=str(free_port()), HOST="127.0.0.1",
                                           LOG_FILE=str(tmp_path / "server.log")), timeout=300)
    assert result.returncode == 1
    assert "exited during start-up" in result.stderr and "ready at" not in result.stdout


class LineReader:
    """Collects a process's output lines on a thread, so waiting for one can time out."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        assert process.stdout is not None
        threading.Thread(target=self._read, args=(process.stdout,), daemon=True).start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            self.lines.put(line)

    def wait_for(self, needle: str, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.5)
            except queue.Empty:
                continue
            self.seen.append(line)
            if needle in line:
                return line
        raise AssertionError(f"no {needle!r} within {timeout_s} s:\n{''.join(self.seen)}")


def test_launch_node_serves_the_tiny_model_and_stops_cleanly(tiny_models: Path, tmp_path: Path) -> None:
    port = free_port()
    log_file = tmp_path / "server.log"
    process = subprocess.Popen(
        [str(LAUNCH_NODE), str(tiny_models / "llama"), "--served-model-name", "tiny", "--kv-cache-memory", "64MiB",
         "--max-model-len", "512"],
        env=script_env(PORT=str(port), HOST="127.0.0.1", LOG_FILE=str(log_file), API_SERVERS="1",
                       OMP_NUM_THREADS="1"),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        reader = LineReader(process)
        ready = reader.wait_for("ready at", timeout_s=300)
        assert f"http://127.0.0.1:{port}/v1" in ready
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        completion = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=5,
                                               temperature=0)
        assert completion.usage is not None and completion.usage.completion_tokens == 5
        assert len(session_pids(process.pid)) >= 3  # the script, the launcher and at least a worker

        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 143
        deadline = time.monotonic() + 10
        while session_pids(process.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert session_pids(process.pid) == [], "the script left processes behind"
    finally:
        for pid in session_pids(process.pid):  # never leave a mess for the next test
            os.kill(pid, signal.SIGKILL)


# -------------------------------------------------------------------------------------------- launch_disagg.sh

def disagg_dry_run(*args: str, **env: str) -> dict[str, Any]:
    """Run `launch_disagg.sh --dry-run ARGS` -> {role: (env, argv)} for its commands, and {"serve:ROLE": ...}
    for the `conveyor serve` command launch_node.sh would run for that role."""
    result = subprocess.run([str(LAUNCH_DISAGG), "--dry-run", *args], env=script_env(**env), capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    commands: dict[str, Any] = {}
    for line in result.stdout.splitlines():
        if match := re.match(r"^\+ \[(\w+)\] (.*)$", line):
            commands[match[1]] = parse_command(match[2])
        elif match := re.match(r"^  \[(\w+)\] \+ (.*)$", line):
            commands[f"serve:{match[1]}"] = parse_command(match[2])
    return commands


def kv_config(argv: list[str]) -> dict[str, Any]:
    config = json.loads(flag_value(argv, "--kv-transfer-config"))
    assert isinstance(config, dict)
    return config


def assert_conveyor_accepts(argv: list[str]) -> None:
    """The printed `python -m conveyor serve ...` parses with the real command line (flags, kv config JSON)."""
    from conveyor.flags import build_parser

    assert argv[1:4] == ["-m", "conveyor", "serve"]
    args = build_parser().parse_args(argv[3:])
    assert args.kv_transfer_config is not None


def test_disagg_one_machine_commands(tiny_models: Path) -> None:
    model = str(tiny_models / "llama")
    commands = disagg_dry_run(model, "--max-model-len", "512")
    assert set(commands) == {"prefill", "decode", "proxy", "serve:prefill", "serve:decode"}
    prefill_env, prefill = commands["prefill"]
    decode_env, decode = commands["decode"]
    assert (prefill_env["PORT"], prefill_env["HOST"], decode_env["PORT"]) == ("8100", "127.0.0.1", "8200")
    assert prefill[0].endswith("scripts/launch_node.sh") and prefill[1] == model
    assert kv_config(prefill) == {"kv_connector": "ZmqPullConnector", "kv_role": "kv_producer",
                                  "kv_ip": "127.0.0.1", "kv_port": 14579}
    assert kv_config(decode) == {"kv_connector": "ZmqPullConnector", "kv_role": "kv_consumer"}
    assert prefill[-2:] == decode[-2:] == ["--max-model-len", "512"]
    _, proxy = commands["proxy"]
    assert proxy[1].endswith("scripts/disagg_proxy.py")
    assert proxy[2:] == ["--host", "127.0.0.1", "--port", "8000", "--prefill", "http://127.0.0.1:8100",
                         "--decode", "http://127.0.0.1:8200"]
    for role, port in (("prefill", "8100"), ("decode", "8200")):
        _, serve = commands[f"serve:{role}"]
        assert flag_value(serve, "--port") == port and serve[4] == model
        assert_conveyor_accepts(serve)


def test_disagg_ports_connector_and_gpu_split_from_environment() -> None:
    commands = disagg_dry_run("m", PREFILL_PORT="9100", DECODE_PORT="9200", PORT="9000", PREFILL_KV_PORT="15000",
                              KV_CONNECTOR="SharedStorageConnector", KV_SHARED_PATH="/shared/kv dir",
                              KV_EXTRA_CONFIG='{"lease_s": 300}', CUDA_VISIBLE_DEVICES="4,5,6")
    prefill_env, prefill = commands["prefill"]
    decode_env, decode = commands["decode"]
    extra = {"shared_storage_path": "/shared/kv dir", "lease_s": 300}
    assert kv_config(prefill) == {"kv_connector": "SharedStorageConnector", "kv_role": "kv_producer",
                                  "kv_ip": "127.0.0.1", "kv_port": 15000, "kv_connector_extra_config": extra}
    assert kv_config(decode) == {"kv_connector": "SharedStorageConnector", "kv_role": "kv_consumer",
                                 "kv_connector_extra_config": extra}
    assert (prefill_env["CUDA_VISIBLE_DEVICES"], decode_env["CUDA_VISIBLE_DEVICES"]) == ("4", "5,6")
    assert flag_value(commands["serve:decode"][1], "-tp") == "2"
    assert commands["proxy"][1][-4:] == ["--prefill", "http://127.0.0.1:9100", "--decode", "http://127.0.0.1:9200"]

    one_gpu = disagg_dry_run("m", CUDA_VISIBLE_DEVICES="7")  # both share it, each with part of its memory
    for role in ("prefill", "decode"):
        assert one_gpu[role][0]["CUDA_VISIBLE_DEVICES"] == "7"
        assert flag_value(one_gpu[role][1], "--gpu-memory-utilization") == "0.4"


def test_disagg_cluster_roles() -> None:
    commands = disagg_dry_run("--role", "prefill", "--kv-ip", "10.0.0.5", "m", "--max-model-len", "512")
    assert set(commands) == {"prefill", "serve:prefill"}
    env, prefill = commands["prefill"]
    assert env["HOST"] == "0.0.0.0" and "CUDA_VISIBLE_DEVICES" not in env  # the whole host is this instance's
    assert kv_config(prefill)["kv_ip"] == "10.0.0.5" and kv_config(prefill)["kv_role"] == "kv_producer"
    assert_conveyor_accepts(commands["serve:prefill"][1])

    commands = disagg_dry_run("--role=decode", "m")
    assert set(commands) == {"decode", "serve:decode"} and kv_config(commands["decode"][1])["kv_role"] == "kv_consumer"

    commands = disagg_dry_run("--role", "proxy", "--prefill-hosts", "h1:8100,http://h2:8100",
                              "--decode-hosts=h3:8200", PORT="8080")
    assert set(commands) == {"proxy"}
    assert commands["proxy"][1][2:] == ["--host", "0.0.0.0", "--port", "8080", "--prefill", "http://h1:8100",
                                        "http://h2:8100", "--decode", "http://h3:8200"]


@pytest.mark.parametrize("args, message", [
    (["--role", "proxy", "--prefill-hosts", "h1:8100"], "needs --prefill-hosts and --decode-hosts"),
    (["--role", "bogus"], "--role must be"),
    (["--role"], "--role needs a value"),
    (["--decode-hosts", "h3:8200"], "are for --role proxy"),
    (["--role", "proxy", "--prefill-hosts", "a:1", "--decode-hosts", "b:2", "m"], "takes no model"),
])
def test_disagg_rejects_bad_arguments(args: list[str], message: str) -> None:
    result = subprocess.run([str(LAUNCH_DISAGG), "--dry-run", *args], env=script_env(), capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert result.stdout == ""


def test_disagg_stops_everything_when_an_instance_fails(tmp_path: Path) -> None:
    """A model that cannot load: both instances die during start-up, the script says so and leaves nothing."""
    process = subprocess.Popen(
        [str(LAUNCH_DISAGG), str(tmp_path / "no-such-model")],
        env=script_env(PREFILL_PORT=str(free_port()), DECODE_PORT=str(free_port()), PORT=str(free_port()),
                       PREFILL_KV_PORT=str(free_port()), LOG_DIR=str(tmp_path), OMP_NUM_THREADS="1"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=300)
        assert process.returncode == 1, stdout + stderr
        assert "did not come up" in stderr and "ready at" not in stdout
        assert session_pids(process.pid) == []
    finally:
        for pid in session_pids(process.pid):
            os.kill(pid, signal.SIGKILL)


def _metric_sum(base_url: str, name: str) -> float:
    """Sum over label sets of a Prometheus sample `name{...}` (or `name`) at base_url/metrics."""
    text = httpx.get(f"{base_url}/metrics", timeout=10.0).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(f"{name}{{") or line.startswith(f"{name} "):
            total += float(line.rpartition(" ")[2])
    return total


def test_disagg_serves_through_the_proxy_with_transferred_kv(tiny_models: Path, tmp_path: Path) -> None:
    """The whole one-machine set-up for real: the decode instance takes the prompt KV from the prefill instance
    (its prompt_tokens_transferred grows), SIGTERM stops all of it."""
    port, prefill_port, decode_port = free_port(), free_port(), free_port()
    process = subprocess.Popen(
        [str(LAUNCH_DISAGG), str(tiny_models / "llama"), "--served-model-name", "tiny", "--kv-cache-memory",
         "64MiB", "--max-model-len", "512"],
        env=script_env(PORT=str(port), PREFILL_PORT=str(prefill_port), DECODE_PORT=str(decode_port),
                       PREFILL_KV_PORT=str(free_port()), LOG_DIR=str(tmp_path), API_SERVERS="1",
                       OMP_NUM_THREADS="1", HEALTH_TIMEOUT="300"),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    proxy_url, decode_url = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{decode_port}"
    try:
        reader = LineReader(process)
        ready = reader.wait_for("launch_disagg: ready at", timeout_s=600)  # the instances print their own
        assert f"http://127.0.0.1:{port}/v1" in ready
        assert httpx.get(f"{proxy_url}/health", timeout=10.0).status_code == 200
        before = _metric_sum(decode_url, "conveyor:prompt_tokens_transferred")
        client = openai.OpenAI(base_url=f"{proxy_url}/v1", api_key="unused", max_retries=0, timeout=120)
        completion = client.completions.create(
            model="tiny", prompt="Once upon a time, in a small village by the sea, there lived a fisherman who",
            max_tokens=6, temperature=0)
        assert completion.usage is not None and completion.usage.completion_tokens == 6
        assert completion.choices[0].finish_reason == "length"
        # The engine publishes its stats with each heartbeat (1 s): wait for the decode instance's to show it.
        deadline = time.monotonic() + 30
        while (transferred := _metric_sum(decode_url, "conveyor:prompt_tokens_transferred")) <= before:
            assert time.monotonic() < deadline, "the decode instance computed the prompt itself"
            time.sleep(0.25)
        assert transferred - before >= completion.usage.prompt_tokens - 1
        assert len(session_pids(process.pid)) >= 5  # the script, two instances' trees and the proxy

        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=90) == 143
        deadline = time.monotonic() + 15
        while session_pids(process.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert session_pids(process.pid) == [], "the script left processes behind"
    finally:
        for pid in session_pids(process.pid):  # never leave a mess for the next test
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
