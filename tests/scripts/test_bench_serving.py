"""scripts/bench_serving.py end to end: a real HTTP server, the real CLI, the JSON it writes.

The fast tests run against an in-test fake OpenAI streaming server (FastAPI + uvicorn in a thread) and a
tiny word-level tokenizer; one test drives the naive transformers baseline (scripts/naive_hf_server.py)
on the tiny Llama. No timing thresholds: only fields, counts and sanity (positive, ordered) are checked.
"""
from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from tests.server_harness import REPO_ROOT, wait_until_healthy

BENCH = REPO_ROOT / "scripts" / "bench_serving.py"
NAIVE_SERVER = REPO_ROOT / "scripts" / "naive_hf_server.py"
WORDS = [f"w{i}" for i in range(200)]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def fake_openai_app(send_usage: bool) -> Any:
    """Streams max_tokens one-word chunks, then a finish chunk, usage (if asked and enabled), [DONE]."""
    app = FastAPI()

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": "fake-model", "object": "model"}]}

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        body = await request.json()
        max_tokens = int(body.get("max_tokens", 16))
        if not body.get("stream"):
            return {"choices": [{"index": 0, "text": " x" * max_tokens, "finish_reason": "length"}]}
        include_usage = send_usage and (body.get("stream_options") or {}).get("include_usage")

        async def events() -> AsyncIterator[str]:
            for _ in range(max_tokens):
                await asyncio.sleep(0.002)
                yield "data: " + json.dumps({"choices": [{"index": 0, "text": " x", "finish_reason": None}]}) + "\n\n"
            yield "data: " + json.dumps({"choices": [{"index": 0, "text": "", "finish_reason": "length"}]}) + "\n\n"
            if include_usage:
                usage = {"prompt_tokens": 7, "completion_tokens": max_tokens, "total_tokens": 7 + max_tokens}
                yield "data: " + json.dumps({"choices": [], "usage": usage}) + "\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


@pytest.fixture(params=[True, False], ids=["usage", "no-usage"])
def fake_server(request: pytest.FixtureRequest) -> Iterator[str]:
    import uvicorn

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(fake_openai_app(request.param), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "fake server did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def word_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with a word-level tokenizer.json (decode/encode round-trips exactly)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, **{word: i + 1 for i, word in enumerate(WORDS)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.add_special_tokens(["<unk>"])
    folder = tmp_path_factory.mktemp("word-tokenizer")
    tokenizer.save(str(folder / "tokenizer.json"))
    return folder


def run_bench(tmp_path: Path, *args: str, timeout: float = 120) -> dict[str, Any]:
    out = tmp_path / "result.json"
    md = tmp_path / "result.md"
    proc = subprocess.run([sys.executable, str(BENCH), *args, "--result-json", str(out), "--result-md", str(md),
                           "--no-progress"], capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "| target | conc |" in proc.stdout and md.read_text().startswith("| target | conc |")
    return json.loads(out.read_text())


def check_level(level: dict[str, Any], num_prompts: int, output_len: int) -> None:
    assert level["completed"] == num_prompts and level["failed"] == 0 and level["errors"] == []
    assert level["total_output_tokens"] == num_prompts * output_len
    for key in ("duration_s", "request_throughput", "output_throughput", "total_token_throughput"):
        assert level[key] > 0, key
    assert level["total_token_throughput"] >= level["output_throughput"]
    for metric in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        stats = level[metric]
        assert set(stats) == {"mean", "median", "p99"}
        assert 0 < stats["median"] <= stats["p99"], (metric, stats)
    assert level["ttft_ms"]["mean"] < level["e2e_ms"]["mean"]


def test_random_prompts_against_fake_server(fake_server: str, word_tokenizer: Path, tmp_path: Path) -> None:
    result = run_bench(tmp_path, "--target", f"fake={fake_server}", "--tokenizer", str(word_tokenizer),
                       "--input-len", "12", "--output-len", "6", "--concurrency", "2", "--num-prompts", "4")
    assert result["config"]["targets"] == [{"name": "fake", "base_url": fake_server}]
    (level,) = result["results"]
    assert (level["target"], level["concurrency"], level["num_prompts"]) == ("fake", 2, 4)
    assert level["model"] == "fake-model" and level["ignore_eos"] is True
    check_level(level, num_prompts=4, output_len=6)
    # With usage the server's prompt count (7) is used, without it the tokenizer's (12).
    assert level["total_input_tokens"] in (4 * 7, 4 * 12)


def test_dataset_and_two_targets(fake_server: str, tmp_path: Path) -> None:
    dataset = tmp_path / "prompts.jsonl"
    dataset.write_text("\n".join(json.dumps({"prompt": f"hello {i}", "max_tokens": 3}) for i in range(3)) + "\n")
    result = run_bench(tmp_path, "--target", f"a={fake_server}", "--target", f"b={fake_server}/v1",
                       "--dataset", str(dataset), "--concurrency", "1", "2", "--num-prompts", "4")
    rows = [(r["concurrency"], r["target"]) for r in result["results"]]
    assert rows == [(1, "a"), (1, "b"), (2, "a"), (2, "b")]
    for level in result["results"]:
        check_level(level, num_prompts=4, output_len=3)


def test_bad_target_is_rejected(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(BENCH), "--target", "no-url", "--dataset", "x.jsonl"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "NAME=BASE_URL" in proc.stderr


def test_naive_server_baseline(tiny_models: Path, tmp_path: Path) -> None:
    """The naive transformers baseline on the tiny Llama: bench_serving drives it at concurrency 2."""
    model = tiny_models / "llama"
    port = _free_port()
    proc = subprocess.Popen([sys.executable, str(NAIVE_SERVER), "--model", str(model), "--port", str(port),
                             "--threads", "1"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert wait_until_healthy(f"http://127.0.0.1:{port}", proc, timeout_s=120), "naive server not healthy"
        result = run_bench(tmp_path, "--target", f"naive=http://127.0.0.1:{port}", "--tokenizer", str(model),
                           "--input-len", "16", "--output-len", "8", "--concurrency", "2", "--num-prompts", "4")
        (level,) = result["results"]
        check_level(level, num_prompts=4, output_len=8)
        assert level["ignore_eos"] is True
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_multimodal_mode_against_conveyor_and_generate(tiny_models: Path, tmp_path: Path) -> None:
    """--mode multimodal: chat requests with one image each to a real server on the tiny LLaVA, beside the
    in-process transformers generate() baseline on the same folder; both count the same prompt tokens."""
    from tests.server_harness import ConveyorServer

    server = ConveyorServer(str(tiny_models / "llava"), "--max-model-len", "512", "--kv-cache-memory", "32MiB")
    try:
        result = run_bench(tmp_path, "--mode", "multimodal", "--target", f"conveyor={server.base_url}",
                           "--in-process", str(tiny_models / "llava"), "--image-size", "64", "--output-len", "4",
                           "--concurrency", "1", "2", "--num-prompts", "4", timeout=300)
    finally:
        assert server.stop() == []
    targets = {level["target"] for level in result["results"]}
    assert len(targets) == 2 and "conveyor" in targets
    for level in result["results"]:
        check_level(level, num_prompts=4, output_len=4)
    prompt_tokens = {level["target"]: level["total_input_tokens"] for level in result["results"]}
    assert len(set(prompt_tokens.values())) == 1  # the image's 16 tokens counted alike
