"""Pack what a frontend needs of the model into `ModelInfo`, so a frontend on any host can start from it alone.

The engine core answers a frontend's `ClientHello(want_engine_info=True)` with this: no shared filesystem
between the engine's host and the frontends' hosts is needed.
"""
from __future__ import annotations

from pathlib import Path

from engine_core.config import ModelConfig, PoolerConfig, read_text_or_file
from engine_core.protocol import ModelInfo, PoolerInfo

# Tokenizer folders hold tokenizer.json, tokenizer_config.json, special_tokens_map.json, chat_template.jinja,
# vocab/merges files, ...; weights never have these suffixes.
_TOKENIZER_FILE_SUFFIXES = (".json", ".jinja", ".txt", ".model")
_MAX_FILE_BYTES = 64 * 2**20


def describe_model(config: ModelConfig, logits_processors: list[str] | None = None) -> ModelInfo:
    files: dict[str, bytes] = {}
    for path in sorted(Path(config.tokenizer_dir).iterdir()):
        if path.is_file() and path.suffix in _TOKENIZER_FILE_SUFFIXES and path.stat().st_size <= _MAX_FILE_BYTES:
            files[path.name] = path.read_bytes()
    use_generation_config = config.generation_config != "vllm"
    files.pop("generation_config.json", None)
    if use_generation_config:
        generation_config = _generation_config_folder(config) / "generation_config.json"
        if generation_config.is_file():
            files["generation_config.json"] = generation_config.read_bytes()
    return ModelInfo(model=config.model, served_model_name=config.served_model_name,
                     architecture=config.architecture, dtype=config.dtype, max_model_len=config.max_model_len,
                     seed=config.seed, eos_token_ids=list(config.eos_token_ids),
                     use_generation_config=use_generation_config,
                     chat_template=read_text_or_file(config.chat_template), tokenizer_files=files,
                     logits_processors=list(logits_processors or []), runner=config.runner,
                     convert=config.convert, pooler=None if config.pooler is None else pooler_info(config.pooler),
                     score_template=config.score_template)


def pooler_info(pooler: PoolerConfig) -> PoolerInfo:
    return PoolerInfo(pooling_type=pooler.pooling_type, normalize=pooler.normalize,
                      embedding_size=pooler.embedding_size, num_labels=pooler.num_labels,
                      id2label=dict(pooler.id2label), classifier_activation=pooler.classifier_activation,
                      is_matryoshka=pooler.is_matryoshka, matryoshka_dimensions=list(pooler.matryoshka_dimensions))


def pooler_config(info: PoolerInfo) -> PoolerConfig:
    """The inverse of `pooler_info`, for frontends rebuilding the model config from the engine's answer."""
    return PoolerConfig(pooling_type=info.pooling_type, normalize=info.normalize,
                        embedding_size=info.embedding_size, num_labels=info.num_labels, id2label=dict(info.id2label),
                        classifier_activation=info.classifier_activation, is_matryoshka=info.is_matryoshka,
                        matryoshka_dimensions=tuple(info.matryoshka_dimensions))


def _generation_config_folder(config: ModelConfig) -> Path:
    """`--generation-config auto` reads the model folder (the tokenizer folder for a .gguf), else the given one."""
    if config.generation_config != "auto":
        return Path(config.generation_config)
    model_path = Path(config.model)
    return model_path if model_path.is_dir() else Path(config.tokenizer_dir)

