"""Pack what a frontend needs of the model into `ModelInfo`, so a frontend on any host can start from it alone.

The engine core answers a frontend's `ClientHello(want_engine_info=True)` with this: no shared filesystem
between the engine's host and the frontends' hosts is needed.
"""
from __future__ import annotations

from pathlib import Path

from engine_core.config import ModelConfig
from engine_core.protocol import ModelInfo

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
                     chat_template=_read_template(config.chat_template), tokenizer_files=files,
                     logits_processors=list(logits_processors or []))


def _generation_config_folder(config: ModelConfig) -> Path:
    """`--generation-config auto` reads the model folder (the tokenizer folder for a .gguf), else the given one."""
    if config.generation_config != "auto":
        return Path(config.generation_config)
    model_path = Path(config.model)
    return model_path if model_path.is_dir() else Path(config.tokenizer_dir)


def _read_template(value: str | None) -> str | None:
    """--chat-template is a file path or the template itself; frontends elsewhere cannot read our files."""
    if value is None:
        return None
    try:
        path = Path(value)
        if path.is_file():
            return path.read_text(encoding="utf-8")
    except OSError:  # a long template is not a valid path
        pass
    return value
