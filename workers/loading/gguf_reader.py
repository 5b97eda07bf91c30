"""GGUF files (llama.cpp) read as Hugging Face checkpoints.

Handled here (and only here):
- llama.cpp tensor names are mapped back to Hugging Face names (`blk.3.attn_q.weight` ->
  `model.layers.3.self_attn.q_proj.weight`);
- quantized tensors of the types the quantized kernels run (Q8_0, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K) come out as
  `QuantizedTensor`s when the caller keeps them quantized (gguf_quants.py); every other tensor is dequantized to
  float32 at load time (`gguf.quants.dequantize`), and the types that had to be are named in one log line;
- GGUF stores shapes fastest-dimension first; numpy data comes out already in row-major Hugging Face
  order, and we reshape to the reversed GGUF shape to be sure;
- for llama-architecture files, llama.cpp's converter interleaved the rows of q_proj/k_proj (weights and
  biases) for its rotary kernel; `_unpermute_rotary_rows` undoes that exactly.
"""
from __future__ import annotations

import logging
import os
import re
from collections import Counter
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from workers.layers.quantized import QuantizedTensor
from workers.loading import gguf_quants
from workers.loading.progress import LoadProgress

if TYPE_CHECKING:
    import gguf

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
logger = logging.getLogger("conveyor.loader")
_FLOAT_TYPES = {"F32", "F16", "BF16", "F64"}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.([a-z0-9_]+)\.(weight|bias)$")
_TOP_RE = re.compile(r"^([a-z0-9_]+)\.(weight|bias)$")


def is_gguf(model_path: str) -> bool:
    return model_path.endswith(".gguf") and os.path.isfile(model_path)


def causal_lm_class_name(model_type: str) -> str:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    name: str | None = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
    if name is None:
        raise ValueError(f"GGUF model type {model_type!r} has no causal-LM class in transformers")
    return name


def iterate_gguf(path: str, keep_quantized: bool = False) -> Iterator[tuple[str, torch.Tensor | QuantizedTensor]]:
    """Every tensor under its Hugging Face name and shape; 2-D quantized ones of the kernels' types stay quantized
    when `keep_quantized`."""
    import gguf

    reader = gguf.GGUFReader(path)
    arch = _read_field(reader, "general.architecture")
    num_heads = _read_field(reader, f"{arch}.attention.head_count")
    num_kv_heads = _read_field(reader, f"{arch}.attention.head_count_kv", default=num_heads)
    progress = LoadProgress(path, sum(int(tensor.n_bytes) for tensor in reader.tensors))
    kept: Counter[str] = Counter()
    dequantized: Counter[str] = Counter()
    for tensor in reader.tensors:
        progress.advance(int(tensor.n_bytes))
        hf_name = gguf_to_hf_name(tensor.name)
        if hf_name is None:
            continue
        shape = tuple(int(dim) for dim in reversed(tensor.shape))  # the Hugging Face shape, e.g. [out, in]
        type_name = tensor.tensor_type.name
        rows_permuted_for = _rotary_heads(arch, hf_name, num_heads, num_kv_heads)
        if keep_quantized and len(shape) == 2 and type_name in gguf_quants.kept_type_names():
            kept[type_name] += 1
            quantized = gguf_quants.decode(tensor.data, type_name, *shape)
            if rows_permuted_for:
                quantized = quantized.map_rows(lambda rows: _unpermute_rotary_rows(rows, rows_permuted_for))
            yield hf_name, quantized
            continue
        if type_name not in _FLOAT_TYPES:
            dequantized[type_name] += 1
        array = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(shape)
        if rows_permuted_for:
            array = _unpermute_rotary_rows(array, rows_permuted_for)
        # Own the memory: F32 tensors dequantize to a read-only view of the memory-mapped file.
        yield hf_name, torch.from_numpy(np.array(array, dtype=np.float32, copy=True))
    progress.done()
    if kept:
        logger.info("kept quantized: %s", _counts(kept))
    if dequantized:
        logger.info("dequantized to float32 at load (%s): %s",
                    "no quantized kernel for these types" if keep_quantized else "--quantization none",
                    _counts(dequantized))


def _counts(counter: Counter[str]) -> str:
    return ", ".join(f"{count} {name}" for name, count in sorted(counter.items()))


def _rotary_heads(arch: str, hf_name: str, num_heads: int, num_kv_heads: int) -> int:
    """The head count whose rows llama.cpp's converter interleaved in this tensor (0: none)."""
    if arch not in _ROTARY_PERMUTED_ARCHS:
        return 0
    if hf_name.endswith(("q_proj.weight", "q_proj.bias")):
        return num_heads
    if hf_name.endswith(("k_proj.weight", "k_proj.bias")):
        return num_kv_heads
    return 0


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
