"""Qwen2-VL on the pooling routes, through the real server: the tiny Qwen2-VL served with `--runner pooling` (the
default `--convert embed`; its config marked matryoshka), as multimodal embedders like dse-qwen2-2b-mrl are.
Embeddings of messages with images of different sizes (different grids and token counts, M-RoPE positions) equal
transformers' Qwen2VLForConditionalGeneration (last layer, last token, after the final norm, normalized), alone and
in a concurrent burst with text-only inputs; matryoshka `dimensions`; image documents on the rerank routes ordered
and scored by the cosines transformers gives."""
from __future__ import annotations

import asyncio
import io
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch

from tests.e2e.test_vision_chat import _data_url, _messages, _png
from tests.e2e.test_vision_pooling import _cosine, _image_doc
from tests.server_harness import ConveyorServer
from tests.workers.models.test_qwen2_vl import _image_processor, _reference

MODEL = "tiny-qwen2-vl-embed"
COSINE_MIN = 0.9999
SCORE_TOLERANCE = 1e-4
QUERY = "Which picture is the cat?"


# --------------------------------------------------------------------------- references (transformers)


def _hf_inputs(model_dir: str, pngs: list[bytes], text: str | None, as_chat: bool) -> dict[str, Any]:
    """transformers' model inputs for one chat-rendered user message (no generation prompt; images first, then
    `text` unless None), or for the plain text (`as_chat` False, as `input` is tokenized); each <|image_pad|>
    expanded to its image's token count as Qwen2VLProcessor does."""
    from PIL import Image

    model, tokenizer = _reference(model_dir)
    prompt = text or ""
    if as_chat:
        content = [{"type": "image"}] * len(pngs) + ([{"type": "text", "text": text}] if text is not None else [])
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=False,
                                               tokenize=False)
    token_ids = tokenizer(prompt, add_special_tokens=not as_chat)["input_ids"]
    inputs: dict[str, Any] = {}
    counts: list[int] = []
    if pngs:
        images = [Image.open(io.BytesIO(png)).convert("RGB") for png in pngs]
        features = _image_processor(model_dir)(images=images, return_tensors="pt")
        inputs = {"pixel_values": features["pixel_values"], "image_grid_thw": features["image_grid_thw"]}
        counts = [int(t * h * w) // 4 for t, h, w in features["image_grid_thw"].tolist()]
    pad, expanded = model.config.image_token_id, []
    for token_id in token_ids:
        expanded.extend([pad] * counts.pop(0) if token_id == pad else [token_id])
    input_ids = torch.tensor([expanded])
    return {**inputs, "input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
            "mm_token_type_ids": (input_ids == pad).int()}


def _hf_embedding(model_dir: str, pngs: list[bytes], text: str | None, as_chat: bool = True) -> np.ndarray:
    """[hidden] normalized: the last token's last-layer state (after the final norm)."""
    model, _ = _reference(model_dir)
    with torch.no_grad():
        out = model(**_hf_inputs(model_dir, pngs, text, as_chat), output_hidden_states=True)
    return torch.nn.functional.normalize(out.hidden_states[-1][0, -1], dim=-1).numpy()  # [hidden]


# --------------------------------------------------------------------------- server and helpers


@pytest.fixture(scope="module")
def model_dir(tiny_models: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The tiny Qwen2-VL with `is_matryoshka` in its config (for `dimensions`); the other files linked."""
    folder = tmp_path_factory.mktemp("qwen2-vl-embed")
    for path in (tiny_models / "qwen2_vl").iterdir():
        os.symlink(path, folder / path.name)
    config = json.loads((tiny_models / "qwen2_vl" / "config.json").read_text())
    (folder / "config.json").unlink()
    (folder / "config.json").write_text(json.dumps({**config, "is_matryoshka": True}))
    return str(folder)


@pytest.fixture(scope="module")
def server(model_dir: str) -> Iterator[ConveyorServer]:
    server = ConveyorServer(model_dir, "--served-model-name", MODEL, "--runner", "pooling", "--max-model-len", "512",
                            "--kv-cache-memory", "64MiB")
    yield server
    assert server.stop() == []


def _post(server: ConveyorServer, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{server.base_url}{path}", json={"model": MODEL, **body}, timeout=120)


def _embed(server: ConveyorServer, messages: list[dict[str, Any]], **extra: Any) -> Any:
    """Through the openai client: `messages` travel in extra_body (the client insists on an `input`)."""
    return server.openai_client().embeddings.create(model=MODEL, input="", encoding_format="float",
                                                    extra_body={"messages": messages, **extra})


# --------------------------------------------------------------------------- embeddings


def test_image_embeddings_of_different_sizes_match_transformers(server: ConveyorServer, model_dir: str) -> None:
    cosines = []
    for pngs, text in (([_png(1, 80, 60)], "A photo."), ([_png(5, 60, 170)], "A tall one."),
                       ([_png(2, 40, 90), _png(3, 200, 120)], "Two.")):
        expected = _hf_embedding(model_dir, pngs, text)
        response = _embed(server, _messages([_data_url(png) for png in pngs], text))
        got = response.data[0].embedding
        cosines.append(_cosine(got, expected))
        np.testing.assert_allclose(got, expected, atol=1e-4)
        assert response.usage.prompt_tokens == _hf_inputs(model_dir, pngs, text, True)["input_ids"].shape[1]
    print(f"embedding cosines {cosines}")
    assert min(cosines) >= COSINE_MIN, cosines
    png = _png(1, 80, 60)
    pooled = _post(server, "/pooling", {"task": "embed", "messages": _messages([_data_url(png)], "A photo.")})
    assert _cosine(pooled.json()["data"][0]["data"], _hf_embedding(model_dir, [png], "A photo.")) >= COSINE_MIN


def test_concurrent_image_and_text_inputs_each_get_their_own_embedding(server: ConveyorServer,
                                                                       model_dir: str) -> None:
    pngs = [_png(10 + i, 50 + 30 * i, 70 + 20 * i) for i in range(3)]  # three grids
    expected = [_hf_embedding(model_dir, [png], f"Picture {i}.") for i, png in enumerate(pngs)]
    expected += [_hf_embedding(model_dir, [], "Only words here."),
                 _hf_embedding(model_dir, [], "Plain input text.", as_chat=False)]

    async def burst() -> list[Any]:
        client = server.async_openai_client()
        calls = [client.embeddings.create(model=MODEL, input="", encoding_format="float",
                                          extra_body={"messages": _messages([_data_url(png)], f"Picture {i}.")})
                 for i, png in enumerate(pngs)]
        calls.append(client.embeddings.create(model=MODEL, input="", encoding_format="float", extra_body={
            "messages": [{"role": "user", "content": "Only words here."}]}))
        calls.append(client.embeddings.create(model=MODEL, input="Plain input text.", encoding_format="float"))
        return list(await asyncio.gather(*calls))

    answers = asyncio.run(burst())
    cosines = [_cosine(answer.data[0].embedding, reference) for answer, reference in zip(answers, expected)]
    print(f"concurrent cosines {cosines}")
    assert min(cosines) >= COSINE_MIN, cosines


def test_matryoshka_dimensions_with_an_image(server: ConveyorServer, model_dir: str) -> None:
    png = _png(4, 64, 64)
    full = _hf_embedding(model_dir, [png], "Small.")
    got = np.asarray(_embed(server, _messages([_data_url(png)], "Small."), dimensions=16).data[0].embedding)
    assert got.shape == (16,)
    np.testing.assert_allclose(got, full[:16] / np.linalg.norm(full[:16]), atol=1e-4)


# --------------------------------------------------------------------------- rerank


def test_image_rerank_orders_documents_as_transformers(server: ConveyorServer, model_dir: str) -> None:
    pngs = [_png(20 + i, 60 + 25 * i, 50 + 15 * i) for i in range(4)]
    texts = [f"Document {i}." for i in range(4)]
    documents: list[Any] = [_image_doc(png, text) for png, text in zip(pngs, texts)] + ["A text document."]
    query = _hf_embedding(model_dir, [], QUERY, as_chat=False)  # a text input is embedded as a plain text
    expected = [_cosine(query, _hf_embedding(model_dir, [png], text)) for png, text in zip(pngs, texts)]
    expected.append(_cosine(query, _hf_embedding(model_dir, [], "A text document.", as_chat=False)))
    order = sorted(range(len(expected)), key=lambda index: -expected[index])
    assert min(abs(expected[a] - expected[b]) for a, b in zip(order, order[1:])) > 10 * SCORE_TOLERANCE

    jina = _post(server, "/v1/rerank", {"query": QUERY, "documents": documents}).json()
    assert [result["index"] for result in jina["results"]] == order
    errors = [abs(result["relevance_score"] - expected[result["index"]]) for result in jina["results"]]
    print(f"rerank score errors {errors}")
    assert max(errors) <= SCORE_TOLERANCE, errors
    assert next(r for r in jina["results"] if r["index"] == 0)["document"] == {"multi_modal": documents[0]["content"]}
    cohere = _post(server, "/v2/rerank", {"query": QUERY, "documents": documents, "top_n": 2}).json()
    assert [result["index"] for result in cohere["results"]] == order[:2]
    scores = _post(server, "/score", {"data_1": QUERY, "data_2": documents}).json()
    assert max(abs(item["score"] - expected[item["index"]]) for item in scores["data"]) <= SCORE_TOLERANCE
