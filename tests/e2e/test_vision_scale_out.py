"""Images and video on the scaled-out paths, on the tiny Qwen2-VL (per-image grids, M-RoPE): `-tp 2`, `-dp 2`
and disaggregated prefill/decode through the proxy each give transformers' greedy answers, as one engine does
(tests/e2e/test_vision_qwen2_vl.py)."""
from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.disagg_harness import start_proxy, stop_proxy
from tests.e2e.test_vision_qwen2_vl import CONVERSATIONS, MODEL, NEW_TOKENS, _hf_answer, _user
from tests.e2e.test_vision_chat import _png
from tests.server_harness import ConveyorServer, free_port

SMALL = ("--served-model-name", MODEL, "--max-model-len", "512", "--kv-cache-memory", "64MiB")
CASES = [CONVERSATIONS["one image"], CONVERSATIONS["two images"], CONVERSATIONS["earlier turn"],
         [_user([_png(50, 130, 70)], "And this one?")]]


@pytest.fixture(scope="module")
def model_dir(tiny_models: Path) -> str:
    return str(tiny_models / "qwen2_vl")


@pytest.fixture(scope="module")
def expected(model_dir: str) -> list[str]:
    return [_hf_answer(model_dir, messages)[0] for messages in CASES]


def _answers(base_url: str, conversations: list[list[dict[str, Any]]]) -> list[str]:
    """All conversations at once; answers in order."""
    async def run() -> list[str]:
        async with openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused", timeout=180) as client:
            answers = await asyncio.gather(*(client.chat.completions.create(
                model=MODEL, messages=messages, max_tokens=NEW_TOKENS, temperature=0, extra_body={"ignore_eos": True})
                for messages in conversations))
        return [answer.choices[0].message.content or "" for answer in answers]

    return asyncio.run(run())


@pytest.mark.parametrize("parallel", [("-tp", "2"), ("-dp", "2")], ids=["tp2", "dp2"])
def test_parallel_engines_answer_as_transformers(model_dir: str, expected: list[str],
                                                 parallel: tuple[str, str]) -> None:
    server = ConveyorServer(model_dir, *parallel, *SMALL)
    try:
        assert _answers(server.base_url, CASES * 2) == expected * 2
    finally:
        assert server.stop() == []


def test_disaggregated_prefill_decode_answers_as_transformers(model_dir: str, expected: list[str]) -> None:
    """The decode instance gets the image prompt's KV from the prefill instance (its metrics say so) and still
    needs the items: its M-RoPE positions continue from the image's grid."""
    producer = {"kv_connector": "ZmqPullConnector", "kv_role": "kv_producer", "kv_port": free_port()}
    consumer = {"kv_connector": "ZmqPullConnector", "kv_role": "kv_consumer"}
    prefill = ConveyorServer(model_dir, *SMALL, "--kv-transfer-config", json.dumps(producer))
    decode = ConveyorServer(model_dir, *SMALL, "--kv-transfer-config", json.dumps(consumer))
    proxy, base_url = start_proxy([prefill.base_url], [decode.base_url])
    try:
        assert _answers(base_url, CASES) == expected
        assert decode.metric("conveyor:prompt_tokens_transferred") > 0
    finally:
        assert stop_proxy(proxy) == []
        assert prefill.stop() == [] and decode.stop() == []
