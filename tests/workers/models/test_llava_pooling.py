"""LLaVA served for pooling (`--runner pooling --convert embed|classify`) in the model runner against transformers'
LlavaForConditionalGeneration on the tiny checkpoint: the last token's final hidden state (after the language
model's norm), normalized, with images merged at their placeholders; alone, batched with text-only prompts, and
in 5-token prefill chunks that split every image; a `score` head added to the checkpoint classifies."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import msgspec
import pytest
import torch
import torch.nn.functional as F

from engine_core.config import PoolerConfig
from engine_core.protocol import ModelRunnerOutput, MultiModalItem, PoolingParams, SchedulerOutput
from tests.workers.models.test_llava import _image, _processed, _reference
from tests.workers.models.test_pooling_models import make_runner

COSINE_MIN = 0.9999
EMBED_POOLER = PoolerConfig(pooling_type="LAST", normalize=True, embedding_size=64)
CLASSIFY_POOLER = PoolerConfig(pooling_type="LAST", num_labels=3, id2label={0: "a", 1: "b", 2: "c"})


class _WithImages:
    """Stands in for the runner under `PoolingDriver`: adds each request's images to its NewRequestData."""

    def __init__(self, runner: Any, mm_items: dict[str, list[MultiModalItem]]) -> None:
        self.runner, self.mm_items = runner, mm_items
        self.tp_rank, self.block_size = runner.tp_rank, runner.block_size

    def execute(self, step: SchedulerOutput) -> ModelRunnerOutput:
        new = [msgspec.structs.replace(request, mm_items=self.mm_items.get(request.request_id, []))
               for request in step.new_requests]
        return self.runner.execute(msgspec.structs.replace(step, new_requests=new))  # type: ignore[no-any-return]


def _hf_last_hidden(model_dir: str, inputs: Any) -> torch.Tensor:
    """[hidden]: transformers' last-layer state of the last prompt token (LlamaModel's output is after its norm)."""
    model, _ = _reference(model_dir)
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True)
    return out.hidden_states[-1][0, -1]  # type: ignore[no-any-return]


def _pooled(model_dir: str, pooler: PoolerConfig, convert: str, cases: dict[str, tuple[list[int], list[Any]]],
            params: PoolingParams, chunk: int | None = None) -> dict[str, torch.Tensor]:
    runner, driver = make_runner(model_dir, pooler, convert=convert, num_blocks=64)
    images = {name: items for name, (_, items) in cases.items()}
    driver.runner = _WithImages(runner, images)  # type: ignore[assignment]
    for name, (token_ids, _) in cases.items():
        driver.add(name, token_ids, params)
    results = driver.run(chunk)
    assert not driver.errors, driver.errors
    return {name: torch.tensor(result.to_list()) for name, result in results.items()}


@pytest.fixture(scope="module")
def llava(tiny_models: Path) -> str:
    return str(tiny_models / "llava")


@pytest.fixture(scope="module")
def cases(llava: str) -> dict[str, tuple[str, list[Any]]]:
    return {"one": ("What is in this picture?", [_image(1, 80, 60)]),
            "two": ("Compare them.", [_image(2, 40, 90), _image(3, 200, 120)]),
            "text": ("Just text, no image.", [])}


def test_image_embeddings_match_transformers_alone_batched_and_chunked(llava: str, cases: dict[str, Any]) -> None:
    processed = {name: _processed(llava, text, images) for name, (text, images) in cases.items()}
    expected = {name: F.normalize(_hf_last_hidden(llava, inputs), dim=-1)
                for name, (_, _, inputs) in processed.items()}
    inputs = {name: (token_ids, items) for name, (token_ids, items, _) in processed.items()}
    runs = [_pooled(llava, EMBED_POOLER, "embed", {name: inputs[name]}, PoolingParams(task="embed"))
            for name in inputs]
    alone = {name: result for run in runs for name, result in run.items()}
    batched = _pooled(llava, EMBED_POOLER, "embed", inputs, PoolingParams(task="embed"))
    chunked = _pooled(llava, EMBED_POOLER, "embed", inputs, PoolingParams(task="embed"), chunk=5)
    for name in inputs:
        for got in (alone[name], batched[name], chunked[name]):
            assert F.cosine_similarity(got, expected[name], dim=0).item() >= COSINE_MIN, name
            torch.testing.assert_close(got, expected[name], atol=1e-4, rtol=0)
    assert F.cosine_similarity(expected["one"], expected["text"], dim=0).item() < 0.999  # images matter


def test_classify_with_a_score_head(llava: str, cases: dict[str, Any], tmp_path: Path) -> None:
    """`--convert classify`: the checkpoint's `score.weight` applied to the pooled row."""
    from safetensors.torch import save_file

    folder = tmp_path / "llava-classify"
    shutil.copytree(llava, folder)
    head = torch.randn(3, 64, generator=torch.Generator().manual_seed(0))  # [num_labels, hidden]
    save_file({"score.weight": head}, str(folder / "score.safetensors"))
    token_ids, items, inputs = _processed(llava, *cases["one"])
    got = _pooled(str(folder), CLASSIFY_POOLER, "classify", {"one": (token_ids, items)},
                  PoolingParams(task="classify", use_activation=False))["one"]
    expected = head @ _hf_last_hidden(llava, inputs)  # [3]
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
