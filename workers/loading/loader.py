"""Weight loading for Conveyor's own model code: Hugging Face folders (safetensors), GGUF files (gguf_reader.py) and
CTranslate2 Whisper folders (`model.bin`, ctranslate2.py).

Every source comes out the same way: `(hugging_face_parameter_name, tensor)` pairs that a model's
`load_weights` consumes one at a time (weights.py), so a checkpoint never has to sit in memory twice.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

from workers.layers.quantized import QuantizedTensor
from workers.loading.ctranslate2 import is_ctranslate2_folder
from workers.loading.gguf_reader import causal_lm_class_name, is_gguf, iterate_gguf
from workers.loading.progress import LoadProgress

if TYPE_CHECKING:
    from transformers import PretrainedConfig


def load_hf_config(model_path: str) -> PretrainedConfig:
    """The model's Hugging Face config, from a folder's config.json or a `.gguf` file's metadata.

    `architectures` is always set (GGUF carries only a model type, so the causal-LM class of that type is
    used), and a GGUF file without an `output.weight` tensor has `tie_word_embeddings=True`.
    """
    from transformers import AutoConfig

    config: PretrainedConfig
    if is_ctranslate2_folder(model_path):
        from transformers import WhisperConfig

        from workers.loading.ctranslate2 import read_whisper_config

        whisper_config: PretrainedConfig = WhisperConfig(**read_whisper_config(model_path))
        return whisper_config
    if not is_gguf(model_path):
        config = AutoConfig.from_pretrained(model_path)
        return config
    folder, file_name = os.path.split(os.path.abspath(model_path))
    config = AutoConfig.from_pretrained(folder, gguf_file=file_name)
    if not config.architectures:
        config.architectures = [causal_lm_class_name(config.model_type)]
    return config


def iterate_weights(model_path: str, keep_quantized: bool = False
                    ) -> Iterator[tuple[str, torch.Tensor | QuantizedTensor]]:
    """Yield `(hugging_face_name, tensor)` for every weight of the checkpoint at `model_path`.

    CTranslate2 Whisper folders: every weight under its Hugging Face name, in the stored dtype.
    Folders: every tensor of the folder's safetensors files (those named by `model.safetensors.index.json`
    when there is one), in the stored dtype. GGUF: every tensor renamed and reshaped to Hugging Face conventions,
    dequantized to float32 unless `keep_quantized` and of a type the quantized kernels run (gguf_reader.py).
    Tensors are on the CPU.
    """
    if is_gguf(model_path):
        yield from iterate_gguf(model_path, keep_quantized)
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
    progress = LoadProgress(folder, sum(os.path.getsize(path) for path in paths))
    for path in paths:
        with safe_open(path, framework="pt") as shard:
            for name in shard.keys():  # noqa: SIM118 (safe_open is not a dict)
                tensor = shard.get_tensor(name)
                progress.advance(tensor.numel() * tensor.element_size())
                yield name, tensor
    progress.done()


def _iterate_ctranslate2(folder: str) -> Iterator[tuple[str, torch.Tensor]]:
    from workers.loading.ctranslate2 import iterate_hf_arrays, model_parts

    progress = LoadProgress(folder, sum(os.path.getsize(path) for path in model_parts(folder)))
    for name, array in iterate_hf_arrays(folder):
        progress.advance(array.nbytes)
        yield name, torch.from_numpy(array)
    progress.done()
