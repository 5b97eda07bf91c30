"""vLLM's sampling extras end to end on the tiny Llama: allowed_token_ids, bad_words, prompt_logprobs (against
transformers), repetition_detection, and logits processors selected through vllm_xargs (built-in and a plugin
loaded from CONVEYOR_LOGITS_PROCESSORS)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

from tests.server_harness import ConveyorServer

MODEL = "tiny-llama"
HELLO, SPACED_HELLO, SPACED_WORLD = 28120, 33662, 905  # "hello", " hello", " world" in SmolLM2's vocabulary
PROMPT_IDS = [504, 3458, 282, 4649, 314, 253, 1345, 28, 355, 260, 2767, 10950, 690, 260, 9126, 2644, 30, 378]


def complete(server: ConveyorServer, **body: Any) -> httpx.Response:
    payload = {"model": MODEL, "prompt": PROMPT_IDS, "temperature": 0, "max_tokens": 8, "return_token_ids": True,
               **body}
    return httpx.post(f"{server.base_url}/v1/completions", json=payload, timeout=120.0)


def ok(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def bad(response: httpx.Response, param: str) -> str:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param, error
    return str(error["message"])


# --------------------------------------------------------------------------- allowed_token_ids and bad_words


def test_allowed_token_ids(llama_server: ConveyorServer) -> None:
    allowed = [HELLO, SPACED_WORLD, 2644]
    choice = ok(complete(llama_server, allowed_token_ids=allowed, max_tokens=10))["choices"][0]
    assert len(choice["token_ids"]) == 10 and set(choice["token_ids"]) <= set(allowed)
    sampled = ok(complete(llama_server, allowed_token_ids=allowed, temperature=1.0, seed=3, n=3))["choices"]
    assert all(set(c["token_ids"]) <= set(allowed) for c in sampled)
    assert "out of vocabulary" in bad(complete(llama_server, allowed_token_ids=[10**7]), "allowed_token_ids")
    bad(complete(llama_server, allowed_token_ids=[]), "allowed_token_ids")


def test_bad_words(llama_server: ConveyorServer) -> None:
    bias = {str(HELLO): 100, str(SPACED_HELLO): 100}
    assert set(ok(complete(llama_server, logit_bias=bias))["choices"][0]["token_ids"]) <= {HELLO, SPACED_HELLO}
    # both spellings ("hello" at the start, " hello" mid-text) are banned, even against a +100 bias
    token_ids = ok(complete(llama_server, logit_bias=bias, bad_words=["hello"]))["choices"][0]["token_ids"]
    assert HELLO not in token_ids and SPACED_HELLO not in token_ids
    # a two-token word: " world" is banned right after " hello" only
    forced = {"logits_processors": ["force_tokens"], "forced_token_ids": [SPACED_HELLO]}
    world = {str(SPACED_WORLD): 100}
    token_ids = ok(complete(llama_server, logit_bias=world, vllm_xargs=forced, max_tokens=4))["choices"][0]["token_ids"]
    assert token_ids == [SPACED_HELLO, SPACED_WORLD, SPACED_WORLD, SPACED_WORLD]
    token_ids = ok(complete(llama_server, logit_bias=world, vllm_xargs=forced, max_tokens=4,
                            bad_words=["hello world"]))["choices"][0]["token_ids"]
    assert token_ids[0] == SPACED_HELLO and token_ids[1] != SPACED_WORLD and token_ids[2:] == [SPACED_WORLD] * 2
    bad(complete(llama_server, bad_words=[" "]), "bad_words")


# --------------------------------------------------------------------------- prompt_logprobs


@pytest.fixture(scope="module")
def hf_logprobs(tiny_models: Path) -> Any:
    """[len - 1, vocab] log_softmax of transformers' logits at positions 0..len-2 of PROMPT_IDS."""
    import torch

    from tests.reference import load_reference

    model, _ = load_reference(str(tiny_models / "llama"))
    with torch.no_grad():
        logits = model(torch.tensor([PROMPT_IDS])).logits[0, :-1].float()
    return torch.log_softmax(logits, dim=-1)


def check_against_reference(entries: list[Any], hf_logprobs: Any, num_top: int) -> None:
    assert entries[0] is None and len(entries) == len(PROMPT_IDS)
    for position, entry in enumerate(entries[1:]):
        reference = hf_logprobs[position]
        actual = PROMPT_IDS[position + 1]
        top_values, top_ids = reference.topk(num_top)
        expected_keys = [str(actual)] + [str(t) for t in top_ids.tolist() if t != actual]
        assert list(entry) == expected_keys
        assert entry[str(actual)]["logprob"] == pytest.approx(reference[actual].item(), abs=1e-3)
        assert entry[str(actual)]["rank"] == int((reference > reference[actual]).sum()) + 1
        for rank, (token_id, value) in enumerate(zip(top_ids.tolist(), top_values.tolist()), start=1):
            assert entry[str(token_id)]["logprob"] == pytest.approx(value, abs=1e-3)
            if token_id != actual:
                assert entry[str(token_id)]["rank"] == rank
        assert isinstance(entry[str(actual)]["decoded_token"], str)


def test_prompt_logprobs_match_transformers(llama_server: ConveyorServer, hf_logprobs: Any) -> None:
    first = ok(complete(llama_server, prompt_logprobs=3, max_tokens=2))
    check_against_reference(first["choices"][0]["prompt_logprobs"], hf_logprobs, 3)
    # Again: the prompt's blocks are in the prefix cache now, yet it is computed (and scored) in full.
    again = ok(complete(llama_server, prompt_logprobs=3, max_tokens=2))
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert again["choices"][0]["prompt_logprobs"] == first["choices"][0]["prompt_logprobs"]
    assert again["choices"][0]["token_ids"] == first["choices"][0]["token_ids"]
    zero = ok(complete(llama_server, prompt_logprobs=0, max_tokens=1, n=2))
    for choice in zero["choices"]:
        assert all(len(entry) == 1 for entry in choice["prompt_logprobs"][1:])
    assert ok(complete(llama_server))["choices"][0]["prompt_logprobs"] is None


def test_prompt_logprobs_in_chat_and_errors(llama_server: ConveyorServer) -> None:
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "Hi there"}], "max_tokens": 2,
            "temperature": 0, "prompt_logprobs": 1, "return_token_ids": True}
    body = ok(httpx.post(f"{llama_server.base_url}/v1/chat/completions", json=chat, timeout=120.0))
    entries = body["prompt_logprobs"]  # vLLM: on the response, not on each choice
    assert entries[0] is None and len(entries) == len(body["prompt_token_ids"]) == body["usage"]["prompt_tokens"]
    assert all(str(token_id) in entry for token_id, entry in zip(body["prompt_token_ids"][1:], entries[1:]))
    assert "whole vocabulary" in bad(complete(llama_server, prompt_logprobs=-1), "prompt_logprobs")
    bad(complete(llama_server, prompt_logprobs=21), "prompt_logprobs")
    bad(complete(llama_server, prompt_logprobs=2, stream=True), "prompt_logprobs")


# --------------------------------------------------------------------------- repetition_detection


def test_repetition_detection_stops_a_forced_loop(llama_server: ConveyorServer) -> None:
    detection = {"min_pattern_len": 1, "max_pattern_len": 4, "min_repeats": 5}
    choice = ok(complete(llama_server, logit_bias={str(SPACED_HELLO): 100}, max_tokens=40,
                         repetition_detection=detection))["choices"][0]
    assert choice["token_ids"] == [SPACED_HELLO] * 5
    assert choice["finish_reason"] == "stop"
    assert choice["stop_reason"] == "repetition detected: pattern of 1 tokens repeated 5 times"
    # two alternating tokens, as vLLM names the fields
    alternating = {"logits_processors": ["force_tokens"], "forced_token_ids": [SPACED_HELLO, SPACED_WORLD] * 10}
    choice = ok(complete(llama_server, vllm_xargs=alternating, max_tokens=40,
                         repetition_detection={"min_pattern_size": 2, "max_pattern_size": 3,
                                               "min_count": 3}))["choices"][0]
    assert choice["token_ids"] == [SPACED_HELLO, SPACED_WORLD] * 3
    assert choice["stop_reason"] == "repetition detected: pattern of 2 tokens repeated 3 times"
    assert ok(complete(llama_server, vllm_xargs=alternating, max_tokens=8))["choices"][0]["finish_reason"] == "length"
    bad(complete(llama_server, repetition_detection={"min_repeats": 1}), "repetition_detection")
    bad(complete(llama_server, repetition_detection={"min_pattern_len": 4, "max_pattern_len": 2}),
        "repetition_detection")


def test_repetition_detection_in_a_chat_stream(llama_server: ConveyorServer) -> None:
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 30, "temperature": 0,
            "logit_bias": {str(SPACED_HELLO): 100}, "stream": True,
            "repetition_detection": {"max_pattern_len": 2, "min_repeats": 4}}
    with httpx.stream("POST", f"{llama_server.base_url}/v1/chat/completions", json=chat, timeout=120.0) as response:
        events = [json.loads(line[6:]) for line in response.iter_lines()
                  if line.startswith("data: ") and line != "data: [DONE]"]
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])
    last = events[-1]["choices"][0]
    assert text == " hello" * 4
    assert last["finish_reason"] == "stop" and last["stop_reason"].startswith("repetition detected")


# --------------------------------------------------------------------------- logits processors


def test_builtin_logits_processors(llama_server: ConveyorServer) -> None:
    forced = [SPACED_HELLO, SPACED_WORLD, 2644, 2767]
    choice = ok(complete(llama_server, max_tokens=6, temperature=1.0, seed=1,
                         vllm_xargs={"logits_processors": "force_tokens", "forced_token_ids": forced}))["choices"][0]
    assert choice["token_ids"][:4] == forced and len(choice["token_ids"]) == 6
    plain = ok(complete(llama_server))["choices"][0]["token_ids"]
    banned = ok(complete(llama_server, vllm_xargs={"logits_processors": ["ban_tokens"],
                                                  "banned_token_ids": [plain[0]]}))["choices"][0]["token_ids"]
    assert banned[0] != plain[0]


def test_logits_processor_errors_are_400s(llama_server: ConveyorServer) -> None:
    message = bad(complete(llama_server, vllm_xargs={"logits_processors": ["no_such_thing"]}), "vllm_xargs")
    assert "no_such_thing" in message and "force_tokens" in message  # lists the available ones
    # Bad arguments are found by the processor on the worker: still a 400 naming vllm_xargs, and only that
    # request fails.
    message = bad(complete(llama_server, vllm_xargs={"logits_processors": ["ban_tokens"], "banned_token_ids": "x"}),
                  "vllm_xargs")
    assert "banned_token_ids" in message
    assert ok(complete(llama_server))["choices"][0]["finish_reason"] == "length"


@pytest.fixture(scope="module")
def plugin_server(tiny_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ConveyorServer]:
    """The tiny Llama with a user module of logits processors named in CONVEYOR_LOGITS_PROCESSORS."""
    folder = tmp_path_factory.mktemp("plugins")
    (folder / "conveyor_test_plugin.py").write_text(
        "import torch\n"
        "from workers.logits_processors import register_logits_processor\n\n"
        "@register_logits_processor('repeat_last_plus_one')\n"
        "def repeat_last_plus_one(output_token_ids, logits, args):\n"
        "    nxt = (output_token_ids[-1] + 1) if output_token_ids else int(args['start'])\n"
        "    row = torch.full_like(logits, float('-inf'))\n"
        "    row[nxt] = 0.0\n"
        "    return row\n")
    pythonpath = os.pathsep.join(filter(None, [str(folder), os.environ.get("PYTHONPATH")]))
    server = ConveyorServer(str(tiny_models / "llama"), "--served-model-name", MODEL, "--max-model-len", "256",
                            "--kv-cache-memory", "32MiB",
                            env={"CONVEYOR_LOGITS_PROCESSORS": "conveyor_test_plugin", "PYTHONPATH": pythonpath})
    yield server
    server.stop()


def test_plugin_logits_processor(plugin_server: ConveyorServer) -> None:
    xargs = {"logits_processors": ["repeat_last_plus_one"], "start": 1000}
    choice = ok(complete(plugin_server, vllm_xargs=xargs, max_tokens=5))["choices"][0]
    assert choice["token_ids"] == [1000, 1001, 1002, 1003, 1004]
    # built-ins still there, chained in order after the plugin
    chained = {"logits_processors": ["repeat_last_plus_one", "force_tokens"], "start": 7, "forced_token_ids": [7]}
    assert ok(complete(plugin_server, vllm_xargs=chained, max_tokens=3))["choices"][0]["token_ids"] == [7, 8, 9]
