"""What the model folder says about generation, read once at start-up: default sampling values from
generation_config.json and the model's EOS ids.

Precedence for each sampling field: the request's value, else the model's generation_config.json value (unless
`--generation-config vllm`), else the engine default in `SamplingParams`.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine_core.config import ModelConfig
from frontend.tokenizer import TokenizerInfo, read_json

logger = logging.getLogger("conveyor.frontend")

# generation_config.json key -> request field
_GENERATION_CONFIG_KEYS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
                           "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_tokens"}



def load_generation_defaults(model_config: ModelConfig) -> dict[str, Any]:
    """Default sampling values from generation_config.json; {} with `--generation-config vllm`."""
    choice = model_config.generation_config
    if choice == "vllm":
        logger.info("generation config: engine defaults (--generation-config vllm)")
        return {}
    folder = Path(model_config.model) if choice == "auto" else Path(choice)
    if choice == "auto" and not folder.is_dir():
        folder = Path(model_config.tokenizer_dir)  # e.g. a .gguf model: look beside its tokenizer
    config = read_json(folder / "generation_config.json")
    defaults = {field: config[key] for key, field in _GENERATION_CONFIG_KEYS.items()
                if isinstance(config.get(key), (int, float)) and not isinstance(config.get(key), bool)}
    if defaults:
        logger.info("default sampling parameters from %s: %s", folder / "generation_config.json", defaults)
    else:
        logger.info("no default sampling parameters in %s; using engine defaults", folder)
    return defaults


@dataclass(frozen=True)
class EosConfig:
    """The request's eos_token_id and the further EOS ids that go into stop_token_ids."""

    eos_token_id: int | None
    extra_stop_token_ids: tuple[int, ...]

    @classmethod
    def from_model(cls, model_config: ModelConfig, tokenizer: TokenizerInfo) -> EosConfig:
        ids = list(model_config.eos_token_ids)
        if not ids and tokenizer.eos_token_id is not None:
            ids = [tokenizer.eos_token_id]
        return cls(ids[0] if ids else None, tuple(ids[1:]))
