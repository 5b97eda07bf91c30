"""Qwen2-VL served for pooling (`--runner pooling --convert embed|classify`) in the model runner against
transformers' Qwen2VLForConditionalGeneration on the tiny checkpoint: the last token's last-layer hidden state (in
transformers 5.24 `hidden_states[-1]` is the text model's output after its final norm), normalized, with images of
different grids merged at their placeholders and M-RoPE positions; alone, batched with a text-only prompt, and in
5-token prefill chunks that split every image; a `score` head added to the checkpoint classifies."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from engine_core.config import PoolerConfig
from engine_core.protocol import PoolingParams
from tests.workers.models.test_llava_pooling import _pooled
from tests.workers.models.test_qwen2_vl import _processed, _reference, image

COSINE_MIN = 0.9999
EMBED_POOLER = PoolerConfig(pooling_type="LAST", normalize=True, embedding_size=64)
CLASSIFY_POOLER = PoolerConfig(pooling_type="LAST", num_labels=3, id2label={0: "a", 1: "b", 2: "c"})


def _hf_last_hidden(model_dir: str, inputs: dict[str, Any]) -> torch.Tensor:
    """[hidden]: transformers' last-layer state of the last prompt token (after the text model's norm)."""
    model, _ = _reference(model_dir)
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True)
    assert torch.equal(out.hidden_states[-1], model.model(**inputs).last_hidden_state)  # the normed output
    return out.hidden_states[-1][0, -1]


@pytest.fixture(scope="module")
def qwen2_vl(tiny_models: Path) -> str:
    return str(tiny_models / "qwen2_vl")


@pytest.fixture(scope="module")
def cases() -> dict[str, tuple[str, list[Any]]]:
    return {"one": ("What is in this picture?", [image(1, 80, 60)]),
            "two": ("Compare them.", [image(2, 40, 90), image(3, 200, 120)]),
            "tall": ("And this?", [image(5, 60, 170)]),
            "text": ("Just text, no image.", [])}


def test_image_embeddings_match_transformers_alone_batched_and_chunked(qwen2_vl: str, cases: dict[str, Any]) -> None:
    processed = {name: _processed(qwen2_vl, text, images) for name, (text, images) in cases.items()}
    assert len({item.length for _, items, _ in processed.values() for item in items}) > 1  # several grids
    expected = {name: F.normalize(_hf_last_hidden(qwen2_vl, inputs), dim=-1)
                for name, (_, _, inputs) in processed.items()}
    inputs = {name: (token_ids, items) for name, (token_ids, items, _) in processed.items()}
    runs = [_pooled(qwen2_vl, EMBED_POOLER, "embed", {name: inputs[name]}, PoolingParams(task="embed"))
            for name in inputs]
    alone = {name: result for run in runs for name, result in run.items()}
    batched = _pooled(qwen2_vl, EMBED_POOLER, "embed", inputs, PoolingParams(task="embed"))
    chunked = _pooled(qwen2_vl, EMBED_POOLER, "embed", inputs, PoolingParams(task="embed"), chunk=5)
    cosines = []
    for name in inputs:
        for got in (alone[name], batched[name], chunked[name]):
            cosines.append(F.cosine_similarity(got.double(), expected[name].double(), dim=0).item())
            assert cosines[-1] >= COSINE_MIN, name
            torch.testing.assert_close(got, expected[name], atol=1e-4, rtol=0)
    print(f"min cosine {min(cosines):.15f}")
    assert F.cosine_similarity(expected["one"], expected["text"], dim=0).item() < 0.999  # images matter


def test_classify_with_a_score_head(qwen2_vl: str, cases: dict[str, Any], tmp_path: Path) -> None:
    """`--convert classify`: the checkpoint's `score.weight` applied to the pooled row."""
    from safetensors.torch import save_file

    folder = tmp_path / "qwen2-vl-classify"
    shutil.copytree(qwen2_vl, folder)
    head = torch.randn(3, 64, generator=torch.Generator().manual_seed(0))  # [num_labels, hidden]
    save_file({"score.weight": head}, str(folder / "score.safetensors"))
    token_ids, items, inputs = _processed(qwen2_vl, *cases["two"])
    got = _pooled(str(folder), CLASSIFY_POOLER, "classify", {"two": (token_ids, items)},
                  PoolingParams(task="classify", use_activation=False))["two"]
    expected = head @ _hf_last_hidden(qwen2_vl, inputs)  # [3]
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
