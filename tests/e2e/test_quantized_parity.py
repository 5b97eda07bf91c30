"""Quantized weights served quantized, against transformers on the same weights dequantized.

For every GGUF type the quantized kernels run (Q8_0, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K: test files written by
scripts/quantized_gguf.py from a tiny random Llama) and for `--quantization int8|int4` of a float checkpoint: the
first 16 greedy tokens equal transformers' on at least 15 of 16 prompts, with chosen-token logprobs within 0.02
wherever the tokens agree; 16 concurrent requests give the tokens each gives alone (batch invariance); and the
worker log says the weights stayed quantized.
"""
from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.reference import greedy_of, greedy_reference
from tests.server_harness import REPO_ROOT, ConveyorServer

GGUF_TYPES = ["Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K"]
MAX_TOKENS = 16
LOGPROB_TOLERANCE = 0.02
BATCH_LOGPROB_TOLERANCE = 1e-3  # alone vs batched (the matmuls are batch-invariant; attention tiles are not)
MIN_MATCHING_PROMPTS = 15  # of 16: the 90%
PROMPTS = [
    "The capital of France is",
    "Hello",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "def fibonacci(n):",
    "1, 2, 3, 4,",
    "Translate to German: The weather is nice today.",
    "Q: What is the boiling point of water?\nA:",
    "Les plus belles choses de la vie sont",
    "import numpy as np\n",
    "The quick brown fox",
    "In 1492,",
    "My favourite colour is",
    "SELECT * FROM users WHERE",
    "Dear Sir or Madam,",
    "The mitochondria is",
    "Roses are red,",
]
SERVER_ARGS = ("--max-model-len", "512", "--kv-cache-memory", "64MiB")


@pytest.fixture(scope="module")
def quant_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("quantized-gguf")
    subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "quantized_gguf.py"), "--out", str(out)], check=True,
                   capture_output=True, timeout=600)
    return out


def _complete(client: Any, prompt: str) -> tuple[list[int], list[float]]:
    choice = client.completions.create(model=client.models.list().data[0].id, prompt=prompt, max_tokens=MAX_TOKENS,
                                       temperature=0, logprobs=1, extra_body={"return_token_ids": True}).choices[0]
    return (choice.model_extra or {})["token_ids"], list(choice.logprobs.token_logprobs)


def _served(server: ConveyorServer) -> dict[str, tuple[list[int], list[float]]]:
    """Each prompt alone, then all 16 at once: the same tokens and logprobs (returned once)."""
    client = server.openai_client()
    alone = {prompt: _complete(client, prompt) for prompt in PROMPTS}

    async def together() -> list[tuple[list[int], list[float]]]:
        async_client = server.async_openai_client()
        model = (await async_client.models.list()).data[0].id
        choices = await asyncio.gather(*[
            async_client.completions.create(model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                                            logprobs=1, extra_body={"return_token_ids": True}) for prompt in PROMPTS])
        return [((c.choices[0].model_extra or {})["token_ids"], list(c.choices[0].logprobs.token_logprobs))
                for c in choices]

    for prompt, (tokens, logprobs) in zip(PROMPTS, asyncio.run(together()), strict=True):
        assert tokens == alone[prompt][0], f"{prompt!r}: batched tokens differ from alone"
        assert max(abs(a - b) for a, b in zip(logprobs, alone[prompt][1], strict=True)) < BATCH_LOGPROB_TOLERANCE
    return alone


def _assert_parity(served: dict[str, tuple[list[int], list[float]]],
                   reference: dict[str, tuple[list[int], list[float]]]) -> None:
    matching = 0
    for prompt, (tokens, logprobs) in served.items():
        expected_tokens, expected_logprobs = reference[prompt]
        matching += tokens == expected_tokens
        for position, (token, expected_token) in enumerate(zip(tokens, expected_tokens)):
            if token != expected_token:
                break
            assert abs(logprobs[position] - expected_logprobs[position]) < LOGPROB_TOLERANCE, (prompt, position)
    assert matching >= MIN_MATCHING_PROMPTS, f"only {matching} of {len(PROMPTS)} prompts match transformers"


def _kept_quantized_line(server: ConveyorServer) -> str:
    lines = [line for line in server.log_path.read_text().splitlines() if "kept quantized:" in line]
    assert lines, server.log_tail()
    return lines[0]


@pytest.mark.parametrize("type_name", GGUF_TYPES)
def test_gguf_type_runs_quantized_with_transformers_outputs(quant_files: Path, type_name: str) -> None:
    server = ConveyorServer(str(quant_files / f"quant-test.{type_name}.gguf"), *SERVER_ARGS)
    try:
        assert f" {type_name}" in _kept_quantized_line(server)
        served = _served(server)
    finally:
        server.stop()
    reference_folder = str(quant_files / f"quant-test.{type_name}-dequantized")
    _assert_parity(served, {prompt: greedy_reference(reference_folder, prompt, MAX_TOKENS)[:2] for prompt in PROMPTS})


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_float_checkpoint_quantized_at_load_matches_transformers_on_the_same_weights(tiny_models: Path,
                                                                                     mode: str) -> None:
    """`--quantization int8|int4`: the reference is transformers with each projection replaced by the values
    Conveyor's quantizer gives it (the LM head and embedding stay float)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from workers.layers.quantized import quantize_weight

    folder = str(tiny_models / "llama")
    server = ConveyorServer(folder, "--quantization", mode, *SERVER_ARGS)
    try:
        served = _served(server)
    finally:
        server.stop()
    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    for name, module in model.model.layers.named_modules():
        if isinstance(module, torch.nn.Linear):
            quantized = quantize_weight(module.weight.data, mode)
            assert quantized is not None, name
            module.weight.data.copy_(quantized.dequantize())
    tokenizer = AutoTokenizer.from_pretrained(folder)
    _assert_parity(served, {prompt: greedy_of(model, tokenizer, prompt, MAX_TOKENS)[:2] for prompt in PROMPTS})


def test_quantization_defaults_and_refusals(quant_files: Path, tiny_models: Path) -> None:
    """auto: a .gguf runs quantized, a folder in float; gguf on a folder and int8/int4 on a GGUF are refused."""
    from conveyor.model_source import ModelNotFoundError, resolve_model_config

    gguf_path = str(quant_files / "quant-test.Q4_1.gguf")
    folder = str(tiny_models / "llama")
    assert resolve_model_config(gguf_path)[0].quantization == "gguf"
    assert resolve_model_config(gguf_path, quantization="none")[0].quantization == "none"
    assert resolve_model_config(folder)[0].quantization == "none"
    assert resolve_model_config(folder, quantization="int4")[0].quantization == "int4"
    with pytest.raises(ModelNotFoundError, match="needs a .gguf file"):
        resolve_model_config(folder, quantization="gguf")
    with pytest.raises(ModelNotFoundError, match="already quantized"):
        resolve_model_config(gguf_path, quantization="int8")


def test_tensor_parallel_and_fallbacks_give_the_same_tokens(quant_files: Path) -> None:
    """The Q4_K file under `-tp 2` (rows and group-aligned input columns split across ranks) and with
    `--quantization none` (dequantized at load): the quantized single-rank tokens for every prompt. With
    `--dtype bfloat16` (no quantized kernel for bfloat16 activations: dequantized, and the log says so): the tokens
    of the dequantized folder served in bfloat16."""
    path = str(quant_files / "quant-test.Q4_K.gguf")
    runs: dict[str, dict[str, tuple[list[int], list[float]]]] = {}
    logs: dict[str, str] = {}
    for name, model, args in [("tp1", path, ()), ("tp2", path, ("-tp", "2")), ("none", path, ("--quantization", "none")),
                              ("bf16", path, ("--dtype", "bfloat16")),
                              ("bf16-folder", str(quant_files / "quant-test.Q4_K-dequantized"), ("--dtype", "bfloat16"))]:
        server = ConveyorServer(model, *SERVER_ARGS, *args)
        try:
            client = server.openai_client()
            runs[name] = {prompt: _complete(client, prompt) for prompt in PROMPTS}
            logs[name] = server.log_path.read_text()
        finally:
            server.stop()
    tokens = {name: [run[prompt][0] for prompt in PROMPTS] for name, run in runs.items()}
    assert tokens["tp2"] == tokens["tp1"] and tokens["none"] == tokens["tp1"]
    assert tokens["bf16"] == tokens["bf16-folder"]
    assert "kept quantized:" in logs["tp2"] and "kept quantized:" not in logs["none"]
    assert "Q4_K weights dequantized at load: the quantized kernels take float32 activations" in logs["bf16"]
