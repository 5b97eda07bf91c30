"""/v1/audio/transcriptions and /v1/audio/translations through a real frontend in front of the fake engine core
(tests/frontend/speech/harness.py), with the tiny.en Whisper tokenizer."""
from __future__ import annotations

import json
import shutil
from typing import Any, Iterator

import httpx
import openai
import pytest

from engine_core.protocol import AUDIO_WINDOW_SAMPLES
from frontend.tokenizer import TokenizerInfo
from tests.frontend.conftest import SERVED_NAME, FrontendHarness
from tests.frontend.fake_core import FakeCore
from tests.frontend.speech.harness import (EN, EOT, FR, NO_TIMESTAMPS, PREV, SOT, TIMESTAMP_BEGIN, TINY_EN, TRANSCRIBE,
                                           TRANSLATE, WHISPER, num_samples, requests_of, speech_core, wav,
                                           whisper_tokenizer)

__all__ = ["speech_core", "whisper_tokenizer"]  # module fixtures from harness.py



@pytest.fixture(scope="module")
def english(speech_core: FakeCore) -> Iterator[FrontendHarness]:
    harness = FrontendHarness(speech_core, tokenizer_dir=str(TINY_EN), **WHISPER)  # type: ignore[arg-type]
    yield harness
    harness.stop()


@pytest.fixture(scope="module")
def multilingual(speech_core: FakeCore, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FrontendHarness]:
    folder = tmp_path_factory.mktemp("whisper-multilingual")
    shutil.copy(TINY_EN / "tokenizer.json", folder / "tokenizer.json")
    (folder / "config.json").write_text(json.dumps({"vocab_size": 51865}))
    harness = FrontendHarness(speech_core, tokenizer_dir=str(folder), api_key="sk-speech", **WHISPER)  # type: ignore
    yield harness
    harness.stop()


def post(harness: FrontendHarness, path: str, audio: bytes, headers: dict[str, str] | None = None,
         **fields: Any) -> httpx.Response:
    with harness.http() as http:
        return http.post(path, files={"file": ("clip.wav", audio, "audio/wav")}, data=fields, headers=headers)


def test_transcription_json(english: FrontendHarness, speech_core: FakeCore) -> None:
    result = english.openai().audio.transcriptions.create(model=SERVED_NAME, file=("clip.wav", wav(2.0)),
                                                          extra_headers={"X-Request-Id": "one"})
    assert result.text == "Heard 32000 samples."
    assert result.usage is not None and result.usage.type == "duration" and result.usage.seconds == 2
    [request] = requests_of(speech_core, "trsc-one")
    assert request.prompt_token_ids == [SOT, NO_TIMESTAMPS] and request.eos_token_id == EOT
    assert request.sampling_params.temperature == 0.0 and request.sampling_params.max_tokens == 448 - 2


def test_sampling_fields_and_prompt(english: FrontendHarness, speech_core: FakeCore,
                                    whisper_tokenizer: TokenizerInfo) -> None:
    response = post(english, "/v1/audio/transcriptions", wav(1.0), headers={"X-Request-Id": "two"},
                    prompt="Fox story.", temperature="0.5", top_p="0.9", top_k="20", min_p="0.05", seed="3",
                    frequency_penalty="0.1", presence_penalty="0.2", repetition_penalty="1.1",
                    max_completion_tokens="5", language="en")
    assert response.status_code == 200, response.text
    [request] = requests_of(speech_core, "trsc-two")
    previous = [PREV] + whisper_tokenizer.encode(" Fox story.", add_special_tokens=False)
    assert request.prompt_token_ids == previous + [SOT, NO_TIMESTAMPS]
    params = request.sampling_params
    assert (params.temperature, params.top_p, params.top_k, params.min_p, params.seed) == (0.5, 0.9, 20, 0.05, 3)
    assert (params.frequency_penalty, params.presence_penalty, params.repetition_penalty) == (0.1, 0.2, 1.1)
    assert params.max_tokens == 5
    assert response.json()["text"] == "Heard 16000 samples"  # 4 tokens, then the end of text


def test_resampled_upload(english: FrontendHarness, speech_core: FakeCore) -> None:
    response = post(english, "/v1/audio/transcriptions", wav(1.5, rate=8000, channels=2),
                    headers={"X-Request-Id": "8k"}, response_format="text")
    assert response.status_code == 200 and response.text == "Heard 24000 samples."
    assert response.headers["content-type"].startswith("text/plain")
    assert num_samples(requests_of(speech_core, "trsc-8k")[0]) == 24000


def test_long_audio_splits_into_windows(english: FrontendHarness, speech_core: FakeCore) -> None:
    response = post(english, "/v1/audio/transcriptions", wav(70.0, silence_at=(29.0, 58.5)),
                    headers={"X-Request-Id": "long"}, response_format="verbose_json",
                    **{"timestamp_granularities[]": "segment"})
    body = response.json()
    requests = requests_of(speech_core, "trsc-long")
    counts = [num_samples(request) for request in requests]
    assert len(counts) == 3 and sum(counts) == 70 * 16000 and max(counts) <= AUDIO_WINDOW_SAMPLES
    assert 29.0 <= counts[0] / 16000 <= 29.1  # cut inside the silence
    assert body["text"] == " ".join(f"Heard {count} samples." for count in counts)
    assert (body["task"], body["language"], body["duration"]) == ("transcribe", "english", 70.0)
    segments = body["segments"]
    assert [s["text"] for s in segments] == [f" Heard {count} samples." for count in counts]
    assert segments[0]["start"] == 0 and segments[-1]["end"] == 70.0
    assert all(a["end"] == b["start"] for a, b in zip(segments, segments[1:]))
    assert all(r.sampling_params.logprobs == 0 for r in requests)  # avg_logprob needs the chosen tokens' logprobs
    assert segments[0]["avg_logprob"] == -0.5 and segments[0]["tokens"][-1] != EOT
    assert body["usage"] == {"type": "duration", "seconds": 70}
    # Decoded with timestamps: the prompt drops <|notimestamps|>; each segment's tokens open and close with one,
    # and the closing timestamps (past each window's end) are clipped to it.
    assert all(request.prompt_token_ids == [SOT] for request in requests)
    assert all(s["tokens"][0] == TIMESTAMP_BEGIN and s["tokens"][-1] > TIMESTAMP_BEGIN for s in segments)
    assert [s["end"] for s in segments] == [round(sum(counts[:i + 1]) / 16000, 3) for i in range(3)]


@pytest.mark.parametrize("response_format", ["srt", "vtt"])
def test_subtitles(english: FrontendHarness, response_format: str) -> None:
    text = english.openai().audio.transcriptions.create(model=SERVED_NAME, file=("clip.wav", wav(31.0)),
                                                        response_format=response_format)
    assert isinstance(text, str)
    marker = "," if response_format == "srt" else "."
    times = [line.split(" --> ") for line in text.splitlines() if " --> " in line]
    assert len(times) == 2 and times[0][0] == f"00:00:00{marker}000" and times[-1][1] == f"00:00:31{marker}000"
    assert times[0][1] == times[1][0]
    assert text.startswith("1\n" if response_format == "srt" else "WEBVTT\n\n")


def test_stream_joins_to_the_text(english: FrontendHarness) -> None:
    client = english.openai()
    audio = wav(65.0)
    full = client.audio.transcriptions.create(model=SERVED_NAME, file=("clip.wav", audio)).text
    with english.http() as http:
        with http.stream("POST", "/v1/audio/transcriptions", files={"file": ("clip.wav", audio)},
                         data={"stream": "true", "stream_include_usage": "true"}) as response:
            lines = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    chunks = [json.loads(line) for line in lines[:-1]]
    assert all(chunk["object"] == "transcription.chunk" for chunk in chunks)
    content = [chunk["choices"][0] for chunk in chunks if chunk["choices"]]
    assert "".join(choice["delta"]["content"] for choice in content) == full
    assert content[-1]["finish_reason"] == "stop" and all("finish_reason" not in c for c in content[:-1])
    usage = chunks[-1]["usage"]
    assert chunks[-1]["choices"] == [] and usage["prompt_tokens"] == 3 * 2
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_openai_client_streams(english: FrontendHarness) -> None:
    events = english.openai().audio.transcriptions.create(model=SERVED_NAME, file=("clip.wav", wav(1.0)),
                                                          stream=True)
    text = "".join(event.choices[0]["delta"]["content"] for event in events  # type: ignore[union-attr]
                   if getattr(event, "choices", None))
    assert text == "Heard 16000 samples."


@pytest.mark.parametrize("audio,fields,status,param,message", [
    (b"", {}, 400, "file", "empty"),
    (b"GIF89a not audio at all" * 20, {}, 400, "file", "could not decode"),
    (wav(1.0), {"language": "fr"}, 400, "language", "English-only"),
    (wav(1.0), {"temperature": "2"}, 400, "temperature", "less than or equal to 1"),
    (wav(1.0), {"model": "other"}, 404, "model", "does not exist"),
    (wav(1.0), {"response_format": "srt", "stream": "true"}, 400, "response_format", "cannot be streamed"),
])
def test_errors(english: FrontendHarness, audio: bytes, fields: dict[str, str], status: int, param: str,
                message: str) -> None:
    response = post(english, "/v1/audio/transcriptions", audio, **fields)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and message in error["message"]


@pytest.mark.filterwarnings("ignore:deprecated:DeprecationWarning")  # the openai SDK marks audio.translations
def test_english_only_model_does_not_translate(english: FrontendHarness) -> None:
    with pytest.raises(openai.BadRequestError, match="English-only"):
        english.openai().audio.translations.create(model=SERVED_NAME, file=("clip.wav", wav(1.0)))


def test_form_problems(english: FrontendHarness) -> None:
    with english.http() as http:
        no_file = http.post("/v1/audio/transcriptions", files={"other": ("a.wav", b"x")})
        as_json = http.post("/v1/audio/transcriptions", json={"file": "clip.wav"})
    assert no_file.status_code == 400 and "no 'file' part" in no_file.json()["error"]["message"]
    assert as_json.status_code == 400 and "multipart/form-data" in as_json.json()["error"]["message"]


def test_upload_limit(english: FrontendHarness, monkeypatch: pytest.MonkeyPatch) -> None:
    """Refused up front from Content-Length (the openai client), and while streaming a chunked body."""
    monkeypatch.setenv("VLLM_MAX_AUDIO_CLIP_FILESIZE_MB", "0.5")
    with pytest.raises(openai.APIStatusError) as info:
        english.openai().audio.transcriptions.create(model=SERVED_NAME, file=("clip.wav", wav(20.0)))
    assert info.value.status_code == 413 and "0.5 MB" in info.value.message

    def chunked() -> Iterator[bytes]:
        yield b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\n'
        for _ in range(20):
            yield b"\0" * 65536
        yield b"\r\n--b--\r\n"

    with english.http() as http:
        response = http.post("/v1/audio/transcriptions", content=chunked(),
                             headers={"content-type": "multipart/form-data; boundary=b"})
        assert response.status_code == 413 and response.json()["error"]["code"] == "file_too_large"
        assert http.post("/v1/audio/transcriptions", files={"file": ("a.wav", wav(1.0))}).status_code == 200


def test_text_endpoints_refuse_a_speech_model(english: FrontendHarness) -> None:
    with pytest.raises(openai.BadRequestError, match="speech-to-text model"):
        english.openai().completions.create(model=SERVED_NAME, prompt="hi")
    with english.http() as http:
        response = http.post("/v1/embeddings", json={"input": "hi"})
    assert response.status_code == 400 and "/v1/audio/transcriptions" in response.json()["error"]["message"]


def test_text_model_refuses_audio(frontend: FrontendHarness) -> None:
    response = post(frontend, "/v1/audio/transcriptions", wav(1.0))
    assert response.status_code == 400 and "takes no audio" in response.json()["error"]["message"]


def test_engine_error_is_clean(whisper_tokenizer: TokenizerInfo) -> None:
    failing = FakeCore([1], error_message="the worker could not read the audio")
    harness = FrontendHarness(failing, tokenizer_dir=str(TINY_EN), **WHISPER)  # type: ignore[arg-type]
    try:
        response = post(harness, "/v1/audio/transcriptions", wav(1.0))
        assert response.status_code == 500 and "could not read the audio" in response.json()["error"]["message"]
    finally:
        harness.stop()
        failing.close()


# ---------------------------------------------------------------------------------------------- multilingual


def test_multilingual_detects_the_language(multilingual: FrontendHarness, speech_core: FakeCore) -> None:
    client = multilingual.openai(api_key="sk-speech")
    result = client.audio.transcriptions.create(model=SERVED_NAME, file=("clip.wav", wav(1.0)),
                                                response_format="verbose_json", extra_headers={"X-Request-Id": "ml"})
    assert result.language == "french"
    detection = next(r for r in speech_core.requests if r.request_id == "trsc-ml-lang-0")
    assert detection.prompt_token_ids == [SOT] and detection.sampling_params.max_tokens == 1
    assert EN in (detection.sampling_params.allowed_token_ids or [])
    assert requests_of(speech_core, "trsc-ml")[0].prompt_token_ids == [SOT, FR, TRANSCRIBE]  # timestamps


@pytest.mark.filterwarnings("ignore:deprecated:DeprecationWarning")  # the openai SDK marks audio.translations
def test_multilingual_translation(multilingual: FrontendHarness, speech_core: FakeCore) -> None:
    client = multilingual.openai(api_key="sk-speech")
    result = client.audio.translations.create(model=SERVED_NAME, file=("clip.wav", wav(1.0)),
                                              extra_body={"language": "de"}, extra_headers={"X-Request-Id": "tr"})
    assert result.text == "Heard 16000 samples."
    assert requests_of(speech_core, "trsl-tr")[0].prompt_token_ids == [SOT, 50260, TRANSLATE, NO_TIMESTAMPS]  # <|de|>


def test_api_key(multilingual: FrontendHarness) -> None:
    response = post(multilingual, "/v1/audio/transcriptions", wav(1.0))
    assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
