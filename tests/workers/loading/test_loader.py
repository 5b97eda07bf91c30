"""Loader: configs and weights from safetensors folders and GGUF files, checked against references."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

if TYPE_CHECKING:
    from transformers import PretrainedConfig

from conveyor.model_source import default_model_path
from workers.loading.gguf_reader import _unpermute_rotary_rows, gguf_to_hf_name
from workers.loading.loader import iterate_weights, load_hf_config

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[3]
TINY = {name: REPO / ".models" / name for name in ("llama", "qwen2")}
SMOLLM_GGUF = Path(default_model_path())

needs_tiny = pytest.mark.skipif(not all(p.is_dir() for p in TINY.values()), reason="tiny checkpoints not built")
needs_smollm = pytest.mark.skipif(not SMOLLM_GGUF.is_file(), reason="SmolLM2 GGUF not installed")


def llama_cpp_permute(weights: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """convert_hf_to_gguf.LlamaModel.permute, as llama.cpp writes it."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2)
            .reshape(weights.shape))


# --------------------------------------------------------------------------- configs


@needs_tiny
@pytest.mark.parametrize("name,architecture", [("llama", "LlamaForCausalLM"), ("qwen2", "Qwen2ForCausalLM")])
def test_load_hf_config_folder(name: str, architecture: str) -> None:
    config = load_hf_config(str(TINY[name]))
    assert config.architectures == [architecture]
    assert config.model_type == name
    assert config.num_hidden_layers == 2


@pytest.fixture(scope="module")
def smollm_config() -> PretrainedConfig:
    return load_hf_config(str(SMOLLM_GGUF))  # parsing the GGUF metadata takes seconds: do it once


@needs_smollm
def test_load_hf_config_gguf(smollm_config: PretrainedConfig) -> None:
    config = smollm_config
    assert config.architectures == ["LlamaForCausalLM"]
    assert config.model_type == "llama"
    assert config.tie_word_embeddings is True  # the file has no output.weight
    assert (config.num_hidden_layers, config.hidden_size, config.intermediate_size) == (30, 576, 1536)
    assert (config.num_attention_heads, config.num_key_value_heads, config.vocab_size) == (9, 3, 49152)


# --------------------------------------------------------------------------- safetensors


@needs_tiny
@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_safetensors_folder_round_trips(name: str) -> None:
    expected = load_file(str(TINY[name] / "model.safetensors"))
    loaded = dict(iterate_weights(str(TINY[name])))
    assert loaded.keys() == expected.keys()
    for key, tensor in expected.items():
        assert torch.equal(loaded[key], tensor), key


@needs_tiny
@pytest.mark.parametrize("with_index", [True, False])
def test_sharded_safetensors(tmp_path: Path, with_index: bool) -> None:
    expected = load_file(str(TINY["llama"] / "model.safetensors"))
    keys = sorted(expected)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for file_name, shard_keys in shards.items():
        save_file({k: expected[k] for k in shard_keys}, str(tmp_path / file_name))
    if with_index:
        weight_map = {k: f for f, shard_keys in shards.items() for k in shard_keys}
        (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    loaded = dict(iterate_weights(str(tmp_path)))
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[k], expected[k]) for k in keys)


def test_missing_checkpoint_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        list(iterate_weights(str(tmp_path)))
    with pytest.raises(FileNotFoundError):
        list(iterate_weights(str(tmp_path / "nope.gguf")))


# --------------------------------------------------------------------------- GGUF


@pytest.mark.parametrize("num_heads,num_kv_heads,cols", [(4, 4, 8), (4, 2, 8), (9, 3, 1)])
def test_unpermute_inverts_llama_cpp_permute(num_heads: int, num_kv_heads: int, cols: int) -> None:
    rng = np.random.default_rng(0)
    q = rng.standard_normal((num_heads * 16, cols)).astype(np.float32).squeeze(-1 if cols == 1 else ())
    k = rng.standard_normal((num_kv_heads * 16, cols)).astype(np.float32).squeeze(-1 if cols == 1 else ())
    assert np.array_equal(_unpermute_rotary_rows(llama_cpp_permute(q, num_heads, num_heads), num_heads), q)
    assert np.array_equal(
        _unpermute_rotary_rows(llama_cpp_permute(k, num_heads, num_kv_heads), num_kv_heads), k)


def test_gguf_names() -> None:
    assert gguf_to_hf_name("token_embd.weight") == "model.embed_tokens.weight"
    assert gguf_to_hf_name("blk.12.attn_output.weight") == "model.layers.12.self_attn.o_proj.weight"
    assert gguf_to_hf_name("blk.0.attn_k.bias") == "model.layers.0.self_attn.k_proj.bias"
    assert gguf_to_hf_name("blk.3.ffn_norm.weight") == "model.layers.3.post_attention_layernorm.weight"
    assert gguf_to_hf_name("output.weight") == "lm_head.weight"
    assert gguf_to_hf_name("rope_freqs.weight") is None
    with pytest.raises(ValueError):
        gguf_to_hf_name("blk.0.mystery.weight")


def _hf_to_gguf_name(hf_name: str) -> str:
    """The inverse mapping, written independently for the writer below."""
    import gguf

    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
    stem, kind = hf_name.rsplit(".", 1)
    mapped = name_map.get_name(stem)
    assert mapped is not None, hf_name
    return f"{mapped}.{kind}"


def write_gguf(folder: Path, path: Path, arch: str) -> dict[str, torch.Tensor]:
    """Write a tiny safetensors checkpoint as llama.cpp would (renamed, Q/K permuted for llama, MLP in
    Q8_0, the rest F32). Returns the Hugging Face tensors expected back (Q8_0 ones round-tripped)."""
    import gguf

    config = json.loads((folder / "config.json").read_text())
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    expected = {}
    for hf_name, tensor in sorted(load_file(str(folder / "model.safetensors")).items()):
        array = tensor.numpy()
        stored = array
        if arch == "llama" and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            stored = llama_cpp_permute(array, heads, heads)
        elif arch == "llama" and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            stored = llama_cpp_permute(array, heads, kv_heads)
        if ".mlp." in hf_name:
            quantized = gguf.quants.quantize(stored, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(_hf_to_gguf_name(hf_name), quantized, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            array = gguf.quants.dequantize(quantized, gguf.GGMLQuantizationType.Q8_0)  # MLP is not permuted
        else:
            writer.add_tensor(_hf_to_gguf_name(hf_name), np.ascontiguousarray(stored))
        expected[hf_name] = torch.from_numpy(np.array(array))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return expected


@needs_tiny
@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_synthetic_gguf_round_trips(tmp_path: Path, name: str) -> None:
    path = tmp_path / f"{name}.gguf"
    expected = write_gguf(TINY[name], path, arch=name)
    loaded = dict(iterate_weights(str(path)))
    assert loaded.keys() == expected.keys()
    for key, tensor in expected.items():
        assert loaded[key].dtype == torch.float32
        assert torch.equal(loaded[key], tensor), key


@needs_smollm
def test_smollm_gguf_matches_transformers(smollm_config: PretrainedConfig) -> None:
    """Every tensor equals what transformers' GGUF loader produces for the same parameter name.

    `from_pretrained(..., gguf_file=...)` needs `accelerate`, which this project does not depend on; its
    dequantizing path is `load_gguf_checkpoint(..., model_to_load=model)`, called here directly on a
    meta-device model (no weights allocated).
    """
    from transformers import AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(smollm_config)
    reference = load_gguf_checkpoint(str(SMOLLM_GGUF), return_tensors=True, model_to_load=model)["tensors"]
    seen = set()
    for name, tensor in iterate_weights(str(SMOLLM_GGUF)):
        assert name in reference, name
        assert tensor.dtype == torch.float32 and tensor.shape == reference[name].shape, name
        torch.testing.assert_close(tensor, reference[name].float(), atol=1e-6, rtol=0, msg=name)
        seen.add(name)
    # All of the model's parameters except the tied lm_head come from the file.
    assert set(model.state_dict()) - seen == {"lm_head.weight"}
    assert os.path.getsize(SMOLLM_GGUF) > 50 * 2**20  # the real, quantized checkpoint
