"""Weight loading for Conveyor's own model code: Hugging Face folders (safetensors), GGUF files and CTranslate2
Whisper folders (`model.bin`, read by `workers.ctranslate2`).

Both sources come out the same way: `(hugging_face_parameter_name, tensor)` pairs that a model's
`load_weights` consumes one at a time, so a checkpoint never has to sit in memory twice.

GGUF specifics handled here (and only here):
- llama.cpp tensor names are mapped back to Hugging Face names (`blk.3.attn_q.weight` ->
  `model.layers.3.self_attn.q_proj.weight`);
- quantized tensors are dequantized to float32 at load time (`gguf.quants.dequantize`);
- GGUF stores shapes fastest-dimension first; numpy data comes out already in row-major Hugging Face
  order, and we reshape to the reversed GGUF shape to be sure;
- for llama-architecture files, llama.cpp's converter interleaved the rows of q_proj/k_proj (weights and
  biases) for its rotary kernel; `_unpermute_rotary_rows` undoes that exactly.
"""
from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from workers.ctranslate2 import is_ctranslate2_folder

if TYPE_CHECKING:
    import gguf
    from transformers import PretrainedConfig

logger = logging.getLogger("conveyor.loader")

# Log a progress line each time this fraction of the checkpoint's bytes has been read.
_PROGRESS_STEP = 0.1

# llama.cpp per-block tensor names -> Hugging Face names under `model.layers.N.`.
_GGUF_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",  # Qwen3
    "attn_k_norm": "self_attn.k_norm",  # Qwen3
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
# llama.cpp top-level tensor names -> Hugging Face names.
_GGUF_TOP_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
# Tensors llama.cpp stores that are not Hugging Face parameters (precomputed rope factors).
_GGUF_SKIPPED = {"rope_freqs"}
# GGUF architectures whose converter (convert_hf_to_gguf.LlamaModel.permute) interleaved Q/K rows.
_ROTARY_PERMUTED_ARCHS = {"llama"}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.([a-z0-9_]+)\.(weight|bias)$")
_TOP_RE = re.compile(r"^([a-z0-9_]+)\.(weight|bias)$")


# --------------------------------------------------------------------------- config


def is_gguf(model_path: str) -> bool:
    return model_path.endswith(".gguf") and os.path.isfile(model_path)


def load_hf_config(model_path: str) -> PretrainedConfig:
    """The model's Hugging Face config, from a folder's config.json or a `.gguf` file's metadata.

    `architectures` is always set (GGUF carries only a model type, so the causal-LM class of that type is
    used), and a GGUF file without an `output.weight` tensor has `tie_word_embeddings=True`.
    """
    from transformers import AutoConfig

    config: PretrainedConfig
    if is_ctranslate2_folder(model_path):
        from transformers import WhisperConfig

        from workers.ctranslate2 import read_whisper_config

        whisper_config: PretrainedConfig = WhisperConfig(**read_whisper_config(model_path))
        return whisper_config
    if not is_gguf(model_path):
        config = AutoConfig.from_pretrained(model_path)
        return config
    folder, file_name = os.path.split(os.path.abspath(model_path))
    config = AutoConfig.from_pretrained(folder, gguf_file=file_name)
    if not config.architectures:
        config.architectures = [_causal_lm_class_name(config.model_type)]
    return config


def _causal_lm_class_name(model_type: str) -> str:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    name: str | None = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
    if name is None:
        raise ValueError(f"GGUF model type {model_type!r} has no causal-LM class in transformers")
    return name


# --------------------------------------------------------------------------- weights


def iterate_weights(model_path: str) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield `(hugging_face_name, tensor)` for every weight of the checkpoint at `model_path`.

    CTranslate2 Whisper folders: every weight under its Hugging Face name, in the stored dtype.
    Folders: every tensor of the folder's safetensors files (those named by `model.safetensors.index.json`
    when there is one), in the stored dtype. GGUF: every tensor dequantized to float32, renamed and
    reshaped to Hugging Face conventions (see the module docstring). Tensors are on the CPU.
    """
    if is_gguf(model_path):
        yield from _iterate_gguf(model_path)
    elif is_ctranslate2_folder(model_path):
        yield from _iterate_ctranslate2(model_path)
    elif os.path.isdir(model_path):
        yield from _iterate_safetensors(model_path)
    else:
        raise FileNotFoundError(f"{model_path!r} is neither a model folder nor a .gguf file")


def _safetensors_files(folder: str) -> list[str]:
    index_path = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index_path):
        with open(index_path) as index_file:
            weight_map: dict[str, str] = json.load(index_file)["weight_map"]
        names = sorted(set(weight_map.values()))
    else:
        names = sorted(name for name in os.listdir(folder) if name.endswith(".safetensors"))
    if not names:
        raise FileNotFoundError(f"no *.safetensors files in {folder!r}")
    return [os.path.join(folder, name) for name in names]


def _iterate_safetensors(folder: str) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    paths = _safetensors_files(folder)
    progress = _Progress(folder, sum(os.path.getsize(path) for path in paths))
    for path in paths:
        with safe_open(path, framework="pt") as shard:
            for name in shard.keys():  # noqa: SIM118 (safe_open is not a dict)
                tensor = shard.get_tensor(name)
                progress.advance(tensor.numel() * tensor.element_size())
                yield name, tensor
    progress.done()


def _iterate_ctranslate2(folder: str) -> Iterator[tuple[str, torch.Tensor]]:
    from workers.ctranslate2 import iterate_hf_arrays, model_parts

    progress = _Progress(folder, sum(os.path.getsize(path) for path in model_parts(folder)))
    for name, array in iterate_hf_arrays(folder):
        progress.advance(array.nbytes)
        yield name, torch.from_numpy(array)
    progress.done()


def _iterate_gguf(path: str) -> Iterator[tuple[str, torch.Tensor]]:
    import gguf

    reader = gguf.GGUFReader(path)
    arch = _read_field(reader, "general.architecture")
    num_heads = _read_field(reader, f"{arch}.attention.head_count")
    num_kv_heads = _read_field(reader, f"{arch}.attention.head_count_kv", default=num_heads)
    progress = _Progress(path, sum(int(tensor.n_bytes) for tensor in reader.tensors))
    for tensor in reader.tensors:
        progress.advance(int(tensor.n_bytes))
        hf_name = gguf_to_hf_name(tensor.name)
        if hf_name is None:
            continue
        # [*reversed(gguf shape)] = the Hugging Face shape, e.g. [out_features, in_features]
        array = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        array = array.reshape(tuple(int(dim) for dim in reversed(tensor.shape)))
        if arch in _ROTARY_PERMUTED_ARCHS:
            if hf_name.endswith(("q_proj.weight", "q_proj.bias")):
                array = _unpermute_rotary_rows(array, num_heads)
            elif hf_name.endswith(("k_proj.weight", "k_proj.bias")):
                array = _unpermute_rotary_rows(array, num_kv_heads)
        # Own the memory: F32 tensors dequantize to a read-only view of the memory-mapped file.
        yield hf_name, torch.from_numpy(np.array(array, dtype=np.float32, copy=True))
    progress.done()


def gguf_to_hf_name(gguf_name: str) -> str | None:
    """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`; None for tensors we skip.

    Raises ValueError for a tensor we do not know, rather than silently dropping weights.
    """
    if match := _BLOCK_RE.match(gguf_name):
        layer, stem, kind = match.groups()
        if stem in _GGUF_BLOCK_NAMES:
            return f"model.layers.{layer}.{_GGUF_BLOCK_NAMES[stem]}.{kind}"
    elif match := _TOP_RE.match(gguf_name):
        stem, kind = match.groups()
        if stem in _GGUF_SKIPPED:
            return None
        if stem in _GGUF_TOP_NAMES:
            return f"{_GGUF_TOP_NAMES[stem]}.{kind}"
    raise ValueError(f"GGUF tensor {gguf_name!r} has no known Hugging Face name")


def _unpermute_rotary_rows(array: np.ndarray, num_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's `LlamaModel.permute` on a q_proj/k_proj weight or bias.

    Within each head the converter turned Hugging Face's "rotate half" row order [x0..x(d/2-1), y0..] into
    interleaved pairs [x0, y0, x1, y1, ...]: reshape(heads, 2, d/2) -> swap -> reshape. The inverse reads
    the rows as (heads, d/2, 2) and swaps back.
    """
    rows = array.shape[0]
    half_head_dim = rows // num_heads // 2
    # [num_heads, half_head_dim, 2, *rest] -> [num_heads, 2, half_head_dim, *rest]
    pairs = array.reshape(num_heads, half_head_dim, 2, *array.shape[1:])
    return pairs.swapaxes(1, 2).reshape(array.shape)


def _read_field(reader: gguf.GGUFReader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    if field is None:
        if default is None:
            raise ValueError(f"GGUF file lacks metadata key {key!r}")
        return default
    return field.contents()


# --------------------------------------------------------------------------- progress


class _Progress:
    """Logs '<source>: N% of X MiB' each time another `_PROGRESS_STEP` of the bytes has been read."""

    def __init__(self, source: str, total_bytes: int) -> None:
        self.source = os.path.basename(source.rstrip("/")) or source
        self.total_bytes = max(total_bytes, 1)
        self.read_bytes = 0
        self.next_report = _PROGRESS_STEP
        logger.info("loading weights from %s (%.1f MiB)", source, total_bytes / 2**20)

    def advance(self, num_bytes: int) -> None:
        self.read_bytes += num_bytes
        fraction = self.read_bytes / self.total_bytes
        if fraction >= self.next_report and fraction < 1.0:
            logger.info("%s: %d%% of %.1f MiB", self.source, int(fraction * 100), self.total_bytes / 2**20)
            while self.next_report <= fraction:
                self.next_report += _PROGRESS_STEP

    def done(self) -> None:
        logger.info("%s: loaded %.1f MiB", self.source, self.read_bytes / 2**20)
