"""The one-call decode stack (workers/models/llama_decode.py) gives the same bits as the layer-by-layer modules:
the same kernels in the same order, so greedy output cannot depend on which path a step took."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.workers.harness import make_runner, prompt_ids
from workers.attention import build_attention_metadata
from workers.models.llama_decode import DecodeStack


@pytest.mark.parametrize("kv_cache_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("architecture", ["llama", "qwen2"])  # qwen2: q/k/v biases
def test_decode_stack_equals_layer_by_layer(tiny_models: Path, architecture: str, kv_cache_dtype: str) -> None:
    runner, driver = make_runner(str(tiny_models / architecture), kv_cache_dtype=kv_cache_dtype)
    body = runner.model.model  # type: ignore[attr-defined]
    if not DecodeStack.supports(body._stack_parts()):
        pytest.skip("the decode stack needs the kernel library and blocked (AVX2) float32 projections")
    lengths = [1, 5, 17, 40]  # contexts that end inside, at and past a 16-token block
    for i, length in enumerate(lengths):
        driver.add(f"r{i}", prompt_ids(length, seed=i))
    driver.generate(list(driver.requests), max_new_tokens=1)  # prefill: the decode step below reads this KV

    requests = list(driver.requests.values())
    seq_lens = [len(r.token_ids) for r in requests]
    metadata = build_attention_metadata([1] * len(requests), seq_lens, [r.block_ids for r in requests],
                                        runner.block_size, torch.device("cpu"))
    input_ids = torch.tensor([r.token_ids[-1] for r in requests])
    outputs = {}
    for use_stack in (True, False):
        body.use_decode_stack = use_stack
        with torch.no_grad():
            outputs[use_stack] = body(input_ids, metadata.positions, runner.kv_caches, metadata).clone()
    body.use_decode_stack = True
    assert body._decode_stack is not None and body._decode_stack.applies(outputs[True], runner.kv_caches, metadata)
    assert torch.equal(outputs[True], outputs[False])
