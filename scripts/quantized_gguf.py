"""Quantized GGUF test checkpoints: `python scripts/quantized_gguf.py --out DIR [--types Q8_0,Q4_K,...]`.

Tests check that Conveyor serves quantized GGUF weights (Q8_0, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K) with the outputs
transformers gives on the same weights dequantized. For each type this writes, as llama.cpp's converter would,
DIR/quant-test.<TYPE>.gguf (llama architecture, Q/K rows permuted for llama.cpp's rotary kernel, every projection
and the token embedding in <TYPE>, norms in F32, SmolLM2's tokenizer in the metadata), and
DIR/quant-test.<TYPE>-dequantized/, a plain Hugging Face folder holding exactly the dequantized values, which the
reference runs on.

The model (DIR/quant-test) is the tiny random Llama of scripts/make_tiny_models.py widened to 256 hidden units:
K-quants work on 256-value super-blocks, so every row length must be a multiple of 256.

gguf-py quantizes only the simple types; Q4_K, Q5_K and Q6_K get plain numpy quantizers here (per-sub-block
min/max, no search for the optimal scales as llama.cpp does), writing ggml's block layout bit for bit, as
`gguf.quants` decodes it.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np

# scripts/ is on sys.path when this runs as a script; tests put it there before importing this module.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_tiny_models import smollm2_gguf_path, write_model  # noqa: E402

QUANT_TYPES = ("Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K")
MODEL_NAME = "quant-test"
QK_K = 256
# A weight file's tensors are replaced; everything else in the folder (config, tokenizer, generation config) is
# copied to the reference folder unchanged.
_WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json", ".bin", ".bin.index.json", ".pt", ".gguf")
# llama.cpp's `general.file_type` for a file whose tensors are all of one type (the "S" variant for K-quants:
# llama.cpp's "M" variants mix in a wider type for some tensors).
_FILE_TYPES = {"Q8_0": "MOSTLY_Q8_0", "Q4_0": "MOSTLY_Q4_0", "Q4_1": "MOSTLY_Q4_1", "Q4_K": "MOSTLY_Q4_K_S",
               "Q5_K": "MOSTLY_Q5_K_S", "Q6_K": "MOSTLY_Q6_K"}
# Hugging Face names under `model.layers.N.` -> llama.cpp names under `blk.N.`.
_BLOCK_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}
_TOP_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}


def write_quantized_gguf(hf_folder: Path, out_path: Path, qtype: str, reference_folder: Path | None = None) -> None:
    """Write the Llama checkpoint in `hf_folder` as a llama.cpp-style GGUF with its projections in `qtype`.

    The file is what llama.cpp's converter and quantizer would produce, so Conveyor's GGUF path (renaming,
    un-permuting Q/K, dequantizing) is tested on realistic input. With `reference_folder`, also writes there a
    Hugging Face folder whose float32 tensors are exactly the dequantized GGUF values (Hugging Face names and row
    order), so a reference implementation runs on the very weights Conveyor loads.
    """
    import gguf
    import torch
    from safetensors.torch import load_file

    if qtype not in QUANT_TYPES:
        raise ValueError(f"unsupported quantization type {qtype!r}; expected one of {', '.join(QUANT_TYPES)}")
    ggml_type = gguf.GGMLQuantizationType[qtype]
    config = json.loads((hf_folder / "config.json").read_text())
    if config.get("model_type") != "llama":
        raise ValueError(f"{hf_folder} is a {config.get('model_type')!r} model; only llama is supported")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"{hf_folder}: rope type {rope['rope_type']!r} is not supported (only the default rope)")
    heads = int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or config["hidden_size"] // heads)
    tokenizer_fields = _smollm2_tokenizer_fields()
    vocab_size = len(tokenizer_fields["tokenizer.ggml.tokens"][0])
    if int(config["vocab_size"]) != vocab_size:
        raise ValueError(f"{hf_folder} has {config['vocab_size']} embedding rows; the SmolLM2 tokenizer written to "
                         f"the GGUF has {vocab_size} tokens")
    weights = load_file(str(hf_folder / "model.safetensors"))
    block_size, _ = gguf.GGML_QUANT_SIZES[ggml_type]
    for hf_name, tensor in sorted(weights.items()):
        if tensor.ndim == 2 and tensor.shape[1] % block_size:
            raise ValueError(f"{qtype} quantizes rows in blocks of {block_size} values, but {hf_name} in {hf_folder} "
                             f"has rows of {tensor.shape[1]} (in_features must be a multiple of {block_size})")

    out_path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(out_path), "llama")
    writer.add_name(hf_folder.name)
    writer.add_context_length(int(config["max_position_embeddings"]))
    writer.add_embedding_length(int(config["hidden_size"]))
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_block_count(int(config["num_hidden_layers"]))
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(float(rope.get("rope_theta", config.get("rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
    writer.add_vocab_size(vocab_size)
    writer.add_rope_dimension_count(head_dim)
    writer.add_file_type(gguf.LlamaFileType[_FILE_TYPES[qtype]])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for name, (value, value_type, sub_type) in tokenizer_fields.items():
        writer.add_key_value(name, value, value_type, sub_type=sub_type)

    dequantized: dict[str, np.ndarray] = {}
    for hf_name in sorted(weights):
        if hf_name == "lm_head.weight" and config.get("tie_word_embeddings", False):
            continue
        array = weights[hf_name].to(torch.float32).numpy()
        gguf_name = _gguf_name(hf_name)
        if hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            array = _llama_cpp_permute(array, heads)
        elif hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            array = _llama_cpp_permute(array, kv_heads)
        if array.ndim == 2:
            blocks = quantize(array, qtype)
            writer.add_tensor(gguf_name, blocks, raw_dtype=ggml_type)
            stored = gguf.quants.dequantize(blocks, ggml_type).reshape(array.shape)
        else:
            writer.add_tensor(gguf_name, np.ascontiguousarray(array))
            stored = array
        if hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            stored = _unpermute(stored, heads)
        elif hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            stored = _unpermute(stored, kv_heads)
        dequantized[hf_name] = stored
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    if reference_folder is not None:
        _write_reference_folder(hf_folder, reference_folder, dequantized)


def quantize(array: np.ndarray, qtype: str) -> np.ndarray:
    """`array` [rows, columns] as ggml blocks of `qtype`: uint8 [rows, bytes per row], as `gguf.quants` returns.

    gguf-py's own quantizers are used where it has them (Q8_0, Q4_0, Q4_1); K-quants use this module's.
    """
    import gguf

    ggml_type = gguf.GGMLQuantizationType[qtype]
    block_size, _ = gguf.GGML_QUANT_SIZES[ggml_type]
    if array.ndim != 2 or array.shape[1] % block_size:
        raise ValueError(f"{qtype} quantizes rows in blocks of {block_size} values; a tensor of shape "
                         f"{list(array.shape)} has rows of {array.shape[-1]}")
    array = np.ascontiguousarray(array, dtype=np.float32)
    k_quantizers = {"Q4_K": _quantize_q4_k_blocks, "Q5_K": _quantize_q5_k_blocks, "Q6_K": _quantize_q6_k_blocks}
    if qtype in k_quantizers:
        blocks = k_quantizers[qtype](array.reshape(-1, QK_K))
        return blocks.reshape(array.shape[0], -1)
    quantized: np.ndarray = gguf.quants.quantize(array, ggml_type)
    return quantized


def _quantize_min_scale_blocks(blocks: np.ndarray, levels: int) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K / Q5_K super-blocks [n, 256] -> (header [n, 16]: fp16 d, fp16 dmin, 12 bytes of 6-bit scales and
    mins; q [n, 8, 32] in [0, levels]); each 32-value sub-block decodes as d*sc*q - dmin*m.

    Per sub-block the range [min(x, 0), max(x)] is split into `levels` steps; the 8 scales and mins are rounded
    to 6 bits against the super-block's d and dmin, and the values are rounded against those rounded scales
    (the ones the decoder uses), so the rounding of the scales costs no more than one step at the range's ends.
    """
    n_blocks = blocks.shape[0]
    x = blocks.reshape(n_blocks, 8, 32)
    low = np.minimum(x.min(axis=-1), 0)
    scales = (x.max(axis=-1) - low) / levels
    mins = -low
    d = (scales.max(axis=-1, keepdims=True) / 63).astype(np.float16)
    dmin = (mins.max(axis=-1, keepdims=True) / 63).astype(np.float16)
    sc = _round_to_grid(scales, d.astype(np.float32), 0, 63).astype(np.uint8)
    m = _round_to_grid(mins, dmin.astype(np.float32), 0, 63).astype(np.uint8)
    d_eff = (d.astype(np.float32) * sc.astype(np.float32))[..., None]
    m_eff = (dmin.astype(np.float32) * m.astype(np.float32))[..., None]
    q = _round_to_grid(x + m_eff, d_eff, 0, levels).astype(np.uint8)
    packed_scales = np.concatenate([
        sc[:, :4] | ((sc[:, 4:] >> 4) << 6),
        m[:, :4] | ((m[:, 4:] >> 4) << 6),
        (sc[:, 4:] & 0x0F) | ((m[:, 4:] & 0x0F) << 4),
    ], axis=-1)
    header = np.concatenate([d.view(np.uint8), dmin.view(np.uint8), packed_scales], axis=-1)
    return header, q


def _pack_low_nibbles(q: np.ndarray) -> np.ndarray:
    """Q4_K / Q5_K low 4 bits [n, 8, 32] -> [n, 128]: byte 32*c + l holds sub-block 2c (low) and 2c+1 (high)."""
    pairs = (q & 0x0F).reshape(q.shape[0], 4, 2, 32)
    packed: np.ndarray = (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(q.shape[0], 128)
    return packed


def _quantize_q4_k_blocks(blocks: np.ndarray) -> np.ndarray:
    """[n, 256] float32 -> [n, 144] Q4_K blocks: d, dmin, scales, 4-bit values."""
    header, q = _quantize_min_scale_blocks(blocks, 15)
    return np.concatenate([header, _pack_low_nibbles(q)], axis=-1)


def _quantize_q5_k_blocks(blocks: np.ndarray) -> np.ndarray:
    """[n, 256] float32 -> [n, 176] Q5_K blocks: d, dmin, scales, the fifth bits (bit i of byte l: sub-block i,
    value l), the low 4 bits."""
    header, q = _quantize_min_scale_blocks(blocks, 31)
    high_bits = ((q >> 4) & 1) << np.arange(8, dtype=np.uint8)[None, :, None]
    qh = np.bitwise_or.reduce(high_bits, axis=1).astype(np.uint8)
    return np.concatenate([header, qh, _pack_low_nibbles(q)], axis=-1)


def _quantize_q6_k_blocks(blocks: np.ndarray) -> np.ndarray:
    """[n, 256] float32 -> [n, 210] Q6_K blocks: low 4 bits, high 2 bits, 16 int8 scales, fp16 d.

    Each 16-value sub-block decodes as d*sc*(q - 32), q in [0, 63]. As in ggml, a sub-block's largest magnitude
    maps to -32 (the signed range's wider end), unless the largest value of the other sign would then exceed 31
    steps, and the largest sub-block scale to sc = -128.
    """
    n_blocks = blocks.shape[0]
    x = blocks.reshape(n_blocks, 16, 16)
    peak = np.take_along_axis(x, np.abs(x).argmax(axis=-1)[..., None], axis=-1)[..., 0]
    sign = np.where(peak > 0, -1, 1).astype(np.float32)
    other_side = (x * sign[..., None]).max(axis=-1)
    scales = sign * np.maximum(np.abs(peak) / 32, other_side / 31)
    largest = np.take_along_axis(scales, np.abs(scales).argmax(axis=-1)[:, None], axis=-1)
    d = (largest / -128).astype(np.float16)
    sc = _round_to_grid(scales, d.astype(np.float32), -128, 127).astype(np.int8)
    d_eff = (d.astype(np.float32) * sc.astype(np.float32))[..., None]
    q = (_round_to_grid(x, d_eff, -32, 31) + 32).astype(np.uint8).reshape(n_blocks, QK_K)
    low = (q & 0x0F).reshape(n_blocks, 2, 2, 64)
    ql = (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(n_blocks, 128)
    high = (q >> 4).reshape(n_blocks, 2, 4, 32)
    qh = (high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)).reshape(n_blocks, 64)
    return np.concatenate([ql, qh, sc.view(np.uint8), d.view(np.uint8)], axis=-1)


def _round_to_grid(values: np.ndarray, step: np.ndarray, low: int, high: int) -> np.ndarray:
    """round(values / step) clipped to [low, high]; 0 where the step is 0 (an all-zero block)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(step != 0, values / step, 0)
    rounded: np.ndarray = np.clip(np.rint(ratio), low, high)
    return rounded


def _gguf_name(hf_name: str) -> str:
    """`model.layers.3.self_attn.q_proj.weight` -> `blk.3.attn_q.weight`, as llama.cpp names it."""
    stem, kind = hf_name.rsplit(".", 1)
    if stem in _TOP_NAMES:
        return f"{_TOP_NAMES[stem]}.{kind}"
    parts = stem.split(".", 3)
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[3] in _BLOCK_NAMES:
        return f"blk.{parts[2]}.{_BLOCK_NAMES[parts[3]]}.{kind}"
    raise ValueError(f"tensor {hf_name!r} has no llama.cpp name")


def _llama_cpp_permute(array: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp's `LlamaModel.permute` (q/k weights and biases): per head, rows [x0..x(d/2-1), y0..] become
    [x0, y0, x1, y1, ...]."""
    permuted: np.ndarray = (array.reshape(num_heads, 2, array.shape[0] // num_heads // 2, *array.shape[1:])
                            .swapaxes(1, 2).reshape(array.shape))
    return permuted


def _unpermute(array: np.ndarray, num_heads: int) -> np.ndarray:
    """The inverse of `_llama_cpp_permute`: back to Hugging Face's row order."""
    unpermuted: np.ndarray = (array.reshape(num_heads, array.shape[0] // num_heads // 2, 2, *array.shape[1:])
                              .swapaxes(1, 2).reshape(array.shape))
    return unpermuted


@functools.lru_cache(maxsize=1)
def _smollm2_tokenizer_fields() -> dict[str, tuple[Any, Any, Any]]:
    """Every `tokenizer.*` field of the SmolLM2 GGUF: name -> (value, value type, array item type).

    Cached: reading the 49152 tokens and 48900 merges takes seconds, and the CLI writes six files.
    """
    import gguf

    reader = gguf.GGUFReader(smollm2_gguf_path())
    fields = {}
    for field in reader.fields.values():
        if field.name.startswith("tokenizer."):
            value_type = field.types[0]
            sub_type = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
            fields[field.name] = (field.contents(), value_type, sub_type)
    return fields


def _write_reference_folder(hf_folder: Path, folder: Path, tensors: dict[str, np.ndarray]) -> None:
    """`hf_folder` with its weights replaced by `tensors` (float32, one model.safetensors)."""
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    for path in sorted(hf_folder.iterdir()):
        if path.is_file() and not path.name.endswith(_WEIGHT_SUFFIXES):
            shutil.copyfile(path, folder / path.name)
    save_file({name: np.ascontiguousarray(array, dtype=np.float32) for name, array in tensors.items()},
              str(folder / "model.safetensors"), metadata={"format": "pt"})


def write_quant_test_model(out_dir: Path) -> Path:
    """Write the random Llama every quantization type can hold (all row lengths multiples of 256); returns its
    folder, `out_dir/quant-test`.

    As make_tiny_models' `llama` (SmolLM2's tokenizer, tied embeddings, fixed seed, a wide 0.3 init so greedy
    choices have clear margins), but 256 hidden units and 512 in the MLP, as K-quants need.
    """
    from transformers import LlamaConfig, PreTrainedTokenizerFast

    config = LlamaConfig(vocab_size=49152, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, initializer_range=0.3,
                         tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    gguf_path = smollm2_gguf_path()
    # The same tokenizer AutoTokenizer builds from the GGUF (same saved files), without AutoTokenizer first
    # parsing the whole file for a config: 0.5 s rather than 6 s.
    tokenizer = PreTrainedTokenizerFast.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_model(MODEL_NAME, config, tokenizer, out_dir)
    return out_dir / MODEL_NAME


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--types", default=",".join(QUANT_TYPES),
                        help=f"comma-separated quantization types (default: {','.join(QUANT_TYPES)})")
    args = parser.parse_args()
    qtypes = [name.strip() for name in args.types.split(",") if name.strip()]
    unknown = sorted(set(qtypes) - set(QUANT_TYPES))
    if unknown:
        parser.error(f"unsupported types {unknown}; choose from {','.join(QUANT_TYPES)}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model_folder = write_quant_test_model(args.out)
    for qtype in qtypes:
        gguf_path = args.out / f"{MODEL_NAME}.{qtype}.gguf"
        reference = args.out / f"{MODEL_NAME}.{qtype}-dequantized"
        write_quantized_gguf(model_folder, gguf_path, qtype, reference)
        print(f"wrote {gguf_path}", flush=True)
        print(f"wrote {reference}", flush=True)


if __name__ == "__main__":
    main()
