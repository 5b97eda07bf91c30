"""Images on the pooling routes, through the real server: the tiny LLaVA served with `--runner pooling --convert
embed` (its config marked matryoshka). Embeddings of image+text messages equal transformers'
LlavaForConditionalGeneration (last layer, last token, after the final norm, normalized), alone and in a
concurrent batch with text-only inputs; /pooling, matryoshka `dimensions`; image documents on /score and the rerank
routes scored by the cosines transformers gives; bad images and images to a text-only model answer 400s naming the
field, and the server keeps serving."""
from __future__ import annotations

import asyncio
import base64
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

from tests.e2e.test_vision_chat import _data_url, _messages, _png, _reference
from tests.server_harness import ConveyorServer

MODEL = "tiny-llava-embed"
COSINE_MIN = 0.9999
SCORE_TOLERANCE = 1e-4
QUERY = "Which picture is the cat?"


# --------------------------------------------------------------------------- references (transformers)


def _hf_embedding(model_dir: str, pngs: list[bytes], text: str | None, as_chat: bool = True) -> np.ndarray:
    """[hidden] normalized: the last token's last-layer state of the chat-rendered message (no generation prompt;
    images first, then `text` unless None), or of the plain text (`as_chat` False, the tokenizer's special tokens,
    as `input` does)."""
    from PIL import Image

    model, processor = _reference(model_dir)
    if as_chat:
        content = [{"type": "image"}] * len(pngs) + ([{"type": "text", "text": text}] if text is not None else [])
        text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=False)
    images = [Image.open(io.BytesIO(png)).convert("RGB") for png in pngs] or None
    inputs = processor(images=images, text=[text], return_tensors="pt")
    with torch.no_grad():
        hidden = model(**inputs, output_hidden_states=True).hidden_states[-1][0, -1]  # [hidden]
    return torch.nn.functional.normalize(hidden, dim=-1).numpy()


def _num_tokens(model_dir: str, pngs: list[bytes], text: str) -> int:
    from PIL import Image

    _, processor = _reference(model_dir)
    content = [{"type": "image"}] * len(pngs) + [{"type": "text", "text": text}]
    prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=False)
    images = [Image.open(io.BytesIO(png)).convert("RGB") for png in pngs]
    return int(processor(images=images, text=[prompt], return_tensors="pt")["input_ids"].shape[1])


def _cosine(a: Any, b: Any) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


# --------------------------------------------------------------------------- servers and helpers


@pytest.fixture(scope="module")
def llava_dir(tiny_models: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The tiny LLaVA with `is_matryoshka` in its config (for `dimensions`); the other files linked."""
    folder = tmp_path_factory.mktemp("llava-embed")
    for path in (tiny_models / "llava").iterdir():
        os.symlink(path, folder / path.name)
    config = json.loads((tiny_models / "llava" / "config.json").read_text())
    (folder / "config.json").unlink()
    (folder / "config.json").write_text(json.dumps({**config, "is_matryoshka": True}))
    return str(folder)


@pytest.fixture(scope="module")
def server(llava_dir: str) -> Iterator[ConveyorServer]:
    server = ConveyorServer(llava_dir, "--served-model-name", MODEL, "--runner", "pooling", "--convert", "embed",
                            "--max-model-len", "512", "--kv-cache-memory", "64MiB")
    yield server
    server.stop()


def _post(server: ConveyorServer, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{server.base_url}{path}", json={"model": MODEL, **body}, timeout=120)


def _expect_400(response: httpx.Response, param: str, *words: str) -> None:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param, error
    for word in words:
        assert word in error["message"], error


def _embed(server: ConveyorServer, messages: list[dict[str, Any]], **extra: Any) -> Any:
    """Through the openai client: `messages` travel in extra_body (the client insists on an `input`)."""
    return server.openai_client().embeddings.create(model=MODEL, input="", encoding_format="float",
                                                    extra_body={"messages": messages, **extra})


def _image_doc(png: bytes, text: str) -> dict[str, Any]:
    return {"content": [{"type": "image_url", "image_url": {"url": _data_url(png)}}, {"type": "text", "text": text}]}


# --------------------------------------------------------------------------- embeddings


def test_image_embedding_matches_transformers(server: ConveyorServer, llava_dir: str) -> None:
    png = _png(1, 80, 60)
    expected = _hf_embedding(llava_dir, [png], "A photo.")
    response = _embed(server, _messages([_data_url(png)], "A photo."))
    got = response.data[0].embedding
    assert _cosine(got, expected) >= COSINE_MIN
    np.testing.assert_allclose(got, expected, atol=1e-4)
    assert response.usage.prompt_tokens == _num_tokens(llava_dir, [png], "A photo.")  # 16 image tokens counted
    two = [_png(2, 40, 90), _png(3, 200, 120)]
    both = _post(server, "/v1/embeddings", {"messages": _messages([_data_url(p) for p in two], "Two.")}).json()
    assert _cosine(both["data"][0]["embedding"], _hf_embedding(llava_dir, two, "Two.")) >= COSINE_MIN
    pooled = _post(server, "/pooling", {"task": "embed", "messages": _messages([_data_url(png)], "A photo.")})
    assert _cosine(pooled.json()["data"][0]["data"], expected) >= COSINE_MIN


def test_concurrent_image_and_text_inputs_each_get_their_own_embedding(server: ConveyorServer,
                                                                       llava_dir: str) -> None:
    pngs = [_png(10 + i, 50 + 10 * i, 70) for i in range(3)]
    expected = [_hf_embedding(llava_dir, [png], f"Picture {i}.") for i, png in enumerate(pngs)]
    expected += [_hf_embedding(llava_dir, [], "Only words here."),
                 _hf_embedding(llava_dir, [], "Plain input text.", as_chat=False)]

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
    assert min(cosines) >= COSINE_MIN, cosines


def test_matryoshka_dimensions_with_an_image(server: ConveyorServer, llava_dir: str) -> None:
    png = _png(4, 64, 64)
    full = _hf_embedding(llava_dir, [png], "Small.")
    response = _embed(server, _messages([_data_url(png)], "Small."), dimensions=16)
    got = np.asarray(response.data[0].embedding)
    assert got.shape == (16,)
    np.testing.assert_allclose(got, full[:16] / np.linalg.norm(full[:16]), atol=1e-4)
    as_base64 = _post(server, "/v1/embeddings", {"messages": _messages([_data_url(png)], "Small."),
                                                 "dimensions": 16, "encoding_format": "base64"}).json()
    decoded = np.frombuffer(base64.b64decode(as_base64["data"][0]["embedding"]), dtype=np.float32)
    np.testing.assert_allclose(decoded, got, atol=1e-6)


# --------------------------------------------------------------------------- score and rerank


def test_image_rerank_orders_documents_as_transformers(server: ConveyorServer, llava_dir: str) -> None:
    pngs = [_png(20 + i, 60 + 7 * i, 50 + 5 * i) for i in range(4)]
    texts = [f"Document {i}." for i in range(4)]
    documents: list[Any] = [_image_doc(png, text) for png, text in zip(pngs, texts)] + ["A text document."]
    query = _hf_embedding(llava_dir, [], QUERY, as_chat=False)  # a text input is embedded as a plain text
    expected = [_cosine(query, _hf_embedding(llava_dir, [png], text)) for png, text in zip(pngs, texts)]
    expected.append(_cosine(query, _hf_embedding(llava_dir, [], "A text document.", as_chat=False)))
    order = sorted(range(len(expected)), key=lambda index: -expected[index])
    assert min(abs(expected[a] - expected[b]) for a, b in zip(order, order[1:])) > 10 * SCORE_TOLERANCE

    jina = _post(server, "/v1/rerank", {"query": QUERY, "documents": documents}).json()
    assert [result["index"] for result in jina["results"]] == order
    for result in jina["results"]:
        assert abs(result["relevance_score"] - expected[result["index"]]) <= SCORE_TOLERANCE
    image_result = next(result for result in jina["results"] if result["index"] == 0)
    assert image_result["document"] == {"multi_modal": documents[0]["content"]}
    cohere = _post(server, "/v2/rerank", {"query": QUERY, "documents": documents, "top_n": 2}).json()
    assert [result["index"] for result in cohere["results"]] == order[:2]
    assert cohere["meta"]["tokens"]["input_tokens"] == jina["usage"]["prompt_tokens"]
    scores = _post(server, "/score", {"data_1": QUERY, "data_2": documents}).json()
    assert [abs(item["score"] - expected[item["index"]]) <= SCORE_TOLERANCE for item in scores["data"]] == [True] * 5


def test_a_lone_content_side_scores_each_part(server: ConveyorServer, llava_dir: str) -> None:
    """vLLM's shape: `{"content": [a, b]}` given as a whole side is two inputs, one part each."""
    pngs = [_png(30, 70, 70), _png(31, 90, 40)]
    side = {"content": [{"type": "image_url", "image_url": {"url": _data_url(png)}} for png in pngs]}
    query = _hf_embedding(llava_dir, [], QUERY, as_chat=False)
    expected = [_cosine(query, _hf_embedding(llava_dir, [png], None)) for png in pngs]
    for path, body in (("/v1/score", {"text_1": QUERY, "text_2": side}),
                       ("/rerank", {"query": QUERY, "documents": side})):
        data = _post(server, path, body).json()
        items = data.get("data") or data["results"]
        by_index = {item["index"]: item.get("score", item.get("relevance_score")) for item in items}
        assert abs(by_index[0] - expected[0]) <= SCORE_TOLERANCE and abs(by_index[1] - expected[1]) <= SCORE_TOLERANCE


# --------------------------------------------------------------------------- refusals


def test_bad_images_answer_400_naming_the_field_and_the_server_keeps_serving(server: ConveyorServer) -> None:
    garbage = "data:image/png;base64," + base64.b64encode(b"not an image at all").decode()
    _expect_400(_post(server, "/v1/embeddings", {"messages": _messages([garbage])}), "messages")
    _expect_400(_post(server, "/classify", {"messages": _messages([garbage])}), "model")  # an embedding model
    _expect_400(_post(server, "/v1/rerank", {"query": QUERY, "documents": [_image_doc(b"", "x")]}), "documents")
    bad_side = {"content": [{"type": "image_url", "image_url": {"url": garbage}}]}
    _expect_400(_post(server, "/score", {"text_1": bad_side, "text_2": "a"}), "text_1")
    _expect_400(_post(server, "/rerank", {"query": QUERY, "documents": [{"content": []}]}), "documents", "no content")
    _expect_400(_post(server, "/v1/embeddings", {"messages": _messages([_data_url(_png(5, 20, 20))]),
                                                 "truncate_prompt_tokens": 8}), "truncate_prompt_tokens")
    _expect_400(_post(server, "/rerank", {"query": QUERY, "documents": [_image_doc(_png(5, 20, 20), "x")],
                                          "max_tokens_per_doc": 4}), "max_tokens_per_doc")
    ok = _post(server, "/v1/embeddings", {"messages": _messages([_data_url(_png(6, 30, 30))])})
    assert ok.status_code == 200 and len(ok.json()["data"][0]["embedding"]) == 64


def test_image_parts_to_a_text_only_pooling_model_answer_400(tiny_models: Path) -> None:
    text_only = ConveyorServer(str(tiny_models / "bert-embed"), "--served-model-name", MODEL, "--max-model-len", "64",
                               "--kv-cache-memory", "64MiB")
    try:
        url = _data_url(_png(7, 20, 20))
        _expect_400(_post(text_only, "/v1/embeddings", {"messages": _messages([url])}), "messages", "text-only")
        _expect_400(_post(text_only, "/v1/rerank", {"query": "q", "documents": [_image_doc(_png(7, 20, 20), "x")]}),
                    "documents", "text-only")
        assert _post(text_only, "/v1/embeddings", {"input": "still serving"}).status_code == 200
    finally:
        text_only.stop()
