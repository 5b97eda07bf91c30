"""Decide how a checkpoint is served (`--runner`, `--convert`) and, for a pooling model, its `PoolerConfig`.

Read from the model folder without torch, in this order (later wins):
- the architecture: `BertModel`-style encoders and `*ForSequenceClassification` heads are pooling models;
  a sentence-transformers folder (`modules.json`) is one too;
- sentence-transformers metadata: `1_Pooling/config.json` (CLS / mean / last-token pooling, the embedding size),
  a `Normalize` module in `modules.json`, `sentence_bert_config.json` (`max_seq_length`);
- config.json: `id2label` / `num_labels`, `problem_type`, `is_matryoshka` / `matryoshka_dimensions`;
- `--pooler-config` JSON (vLLM's keys `pooling_type` and `normalize`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine_core.config import CONVERSIONS, POOLING_TYPES, PoolerConfig

# Encoders: bidirectional attention, no KV cache; the whole prompt must run in one step.
ENCODER_ARCHITECTURES = frozenset({
    "BertModel", "BertForSequenceClassification", "RobertaModel", "RobertaForSequenceClassification",
    "XLMRobertaModel", "XLMRobertaForSequenceClassification"})
# Encoder-decoder speech models: generate text from audio (the encoder runs once per request).
ENCODER_DECODER_ARCHITECTURES = frozenset({"WhisperForConditionalGeneration"})
_ST_POOLING_MODES = {"pooling_mode_cls_token": "CLS", "pooling_mode_mean_tokens": "MEAN",
                     "pooling_mode_lasttoken": "LAST"}
_POOLER_CONFIG_KEYS = {"pooling_type", "normalize"}


@dataclass(frozen=True)
class ServingMode:
    runner: str  # "generate" | "pooling"
    convert: str  # "none" | "embed" | "classify"
    pooler: PoolerConfig | None
    max_seq_length: int | None  # sentence-transformers' limit, a default for --max-model-len
    is_encoder: bool


def resolve_serving_mode(folder: Path | None, hf_config: dict[str, Any], runner: str = "auto",
                         convert: str = "auto", pooler_overrides: dict[str, Any] | None = None) -> ServingMode:
    """`folder` is None for a GGUF file (always a generative model unless --runner pooling)."""
    architecture = (hf_config.get("architectures") or [""])[0]
    is_classifier = architecture.endswith("ForSequenceClassification")
    is_encoder = architecture in ENCODER_ARCHITECTURES
    sentence_transformers = folder is not None and (folder / "modules.json").is_file()
    if runner == "auto":
        pooling_by_checkpoint = is_encoder or is_classifier or sentence_transformers
        runner = "pooling" if pooling_by_checkpoint or convert in ("embed", "classify") else "generate"
    if runner == "generate":
        if convert not in ("auto", "none"):
            raise ValueError(f"--convert {convert} needs --runner pooling")
        if is_encoder:
            raise ValueError(f"{architecture} is an encoder: it cannot generate text (serve it with --runner pooling)")
        return ServingMode("generate", "none", None, None, False)
    if is_encoder or is_classifier:
        convert = "none"  # the checkpoint's own body and head
    elif convert in ("auto", "none"):
        convert = "embed"
    if convert not in CONVERSIONS:
        raise ValueError(f"--convert {convert!r} is not one of {', '.join(CONVERSIONS)}")
    pooler = _pooler_config(folder, hf_config, is_classifier or convert == "classify", is_encoder,
                            dict(pooler_overrides or {}))
    return ServingMode("pooling", convert, pooler, _max_seq_length(folder), is_encoder)


def _pooler_config(folder: Path | None, hf_config: dict[str, Any], is_classifier: bool, is_encoder: bool,
                   overrides: dict[str, Any]) -> PoolerConfig:
    unknown = set(overrides) - _POOLER_CONFIG_KEYS
    if unknown:
        raise ValueError(f"--pooler-config: unknown key(s) {sorted(unknown)}; known: {sorted(_POOLER_CONFIG_KEYS)}")
    text_config = hf_config.get("text_config", hf_config)
    hidden_size = int(text_config.get("hidden_size", 0))
    st_pooling = _read_json(folder / "1_Pooling" / "config.json") if folder is not None else {}
    modules = _read_json_list(folder / "modules.json") if folder is not None else []
    # vLLM's defaults: classifiers pool the first token of an encoder and the last token of a decoder.
    pooling_type = "CLS" if is_encoder else "LAST"
    for key, mode in _ST_POOLING_MODES.items():
        if st_pooling.get(key):
            pooling_type = mode
            break
    pooling_type = str(overrides.get("pooling_type", pooling_type)).upper()
    if pooling_type not in POOLING_TYPES:
        raise ValueError(f"pooling_type {pooling_type!r} is not one of {', '.join(POOLING_TYPES)}")
    if modules:
        normalize = any(str(module.get("type", "")).endswith("Normalize") for module in modules)
    else:
        normalize = True  # vLLM normalizes embeddings unless told otherwise
    normalize = bool(overrides.get("normalize", normalize))
    num_labels, id2label, activation = 0, {}, "softmax"
    if is_classifier:
        raw_labels = hf_config.get("id2label") or {}
        id2label = {int(index): str(label) for index, label in raw_labels.items()}
        num_labels = int(hf_config.get("num_labels") or len(id2label) or 2)
        if not id2label or len(id2label) != num_labels:
            id2label = {index: f"LABEL_{index}" for index in range(num_labels)}
        multi_label = hf_config.get("problem_type") == "multi_label_classification"
        activation = "sigmoid" if num_labels == 1 or multi_label else "softmax"
    dimensions = hf_config.get("matryoshka_dimensions") or []
    return PoolerConfig(
        pooling_type=pooling_type, normalize=normalize,
        embedding_size=int(st_pooling.get("word_embedding_dimension") or hidden_size),
        num_labels=num_labels, id2label=id2label, classifier_activation=activation,
        is_matryoshka=bool(hf_config.get("is_matryoshka") or dimensions),
        matryoshka_dimensions=tuple(int(d) for d in dimensions))


def _max_seq_length(folder: Path | None) -> int | None:
    if folder is None:
        return None
    value = _read_json(folder / "sentence_bert_config.json").get("max_seq_length")
    return int(value) if value else None


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    value = json.loads(path.read_text())
    return value if isinstance(value, dict) else {}


def _read_json_list(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    value = json.loads(path.read_text())
    return [item for item in value if isinstance(item, dict)] if isinstance(value, list) else []
