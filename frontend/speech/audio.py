"""Audio in: any file soundfile (libsndfile) reads -> 16 kHz mono float32 -> windows of at most 30 s.

Whisper's encoder sees exactly 30 s (`AUDIO_WINDOW_SAMPLES`), so longer audio is split. Each cut is placed at the
quietest 20 ms frame within the last `CUT_SEARCH_S` seconds before the 30 s limit, so a word is rarely split:

```
 |<------------------------ window 0 (<= 30 s) ------------------------>|<-- window 1 ...
 0                                              [   search ~2 s    ]cut  30 s
```
Everything here is numpy on one request's audio; callers run `decode_audio` in a thread.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import numpy as np

from engine_core.protocol import AUDIO_SAMPLE_RATE, AUDIO_WINDOW_SAMPLES, AudioInput
from frontend.errors import BadRequestError

FloatArray = np.ndarray[Any, np.dtype[np.float32]]

CUT_SEARCH_S = 2.0  # where to look for a quiet cut point before each 30 s boundary
_FRAME_SAMPLES = AUDIO_SAMPLE_RATE // 50  # 20 ms frames for the loudness search


@dataclass(frozen=True)
class AudioWindow:
    """One engine request's audio: `samples` starting `start_sample` samples into the whole clip."""

    start_sample: int
    samples: FloatArray

    @property
    def start_s(self) -> float:
        return self.start_sample / AUDIO_SAMPLE_RATE

    @property
    def end_s(self) -> float:
        return (self.start_sample + len(self.samples)) / AUDIO_SAMPLE_RATE


def decode_audio(data: bytes, param: str = "file") -> FloatArray:
    """An audio file's bytes (wav, flac, ogg/vorbis, mp3, ... as libsndfile reads them) -> 16 kHz mono float32.

    Raises BadRequestError naming the problem for an empty, unreadable or silent-by-construction (no frames) file.
    """
    import soundfile

    if not data:
        raise BadRequestError("the audio file is empty", param=param)
    try:
        frames, rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except (soundfile.LibsndfileError, RuntimeError, TypeError, ValueError) as exc:
        raise BadRequestError(f"could not decode the audio file ({_reason(exc)}); send wav, flac, ogg or mp3 audio",
                              param=param) from None
    if frames.shape[0] == 0:
        raise BadRequestError("the audio file contains no samples", param=param)
    mono = frames.mean(axis=1, dtype=np.float32) if frames.shape[1] > 1 else frames[:, 0]  # [num_samples]
    return resample(np.ascontiguousarray(mono, dtype=np.float32), int(rate))


def _reason(exc: Exception) -> str:
    text = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
    return text.removeprefix("Error opening <_io.BytesIO object at ").split(": ", 1)[-1]


def resample(samples: FloatArray, rate: int) -> FloatArray:
    """Mono float32 at `rate` Hz -> 16 kHz (soxr, high quality); a no-op at 16 kHz."""
    if rate == AUDIO_SAMPLE_RATE:
        return samples
    if rate <= 0:
        raise BadRequestError(f"the audio file has an invalid sample rate ({rate} Hz)", param="file")
    import soxr

    return np.asarray(soxr.resample(samples, rate, AUDIO_SAMPLE_RATE, quality="HQ"), dtype=np.float32)


def pcm16_to_float32(data: bytes) -> FloatArray:
    """Little-endian signed 16-bit PCM -> float32 in [-1, 1). The caller checks that the byte count is even."""
    return (np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0).astype(np.float32)


def quietest_cut(samples: FloatArray, search_start: int, search_end: int) -> int:
    """The start of the 20 ms frame with the least energy in samples[search_start:search_end]; `search_end` if the
    region is shorter than one frame."""
    region = samples[search_start:search_end]
    num_frames = len(region) // _FRAME_SAMPLES
    if num_frames == 0:
        return search_end
    frames = region[:num_frames * _FRAME_SAMPLES].reshape(num_frames, _FRAME_SAMPLES)  # [num_frames, frame]
    energy = np.einsum("ij,ij->i", frames, frames)  # [num_frames]
    return search_start + int(np.argmin(energy)) * _FRAME_SAMPLES


def split_windows(samples: FloatArray, window_samples: int = AUDIO_WINDOW_SAMPLES,
                  search_samples: int = int(CUT_SEARCH_S * AUDIO_SAMPLE_RATE)) -> list[AudioWindow]:
    """Cut the clip into consecutive windows of at most `window_samples` that cover it exactly; each cut but the
    last lies at the quietest frame of the `search_samples` before the window's limit."""
    windows: list[AudioWindow] = []
    start = 0
    while len(samples) - start > window_samples:
        limit = start + window_samples
        cut = quietest_cut(samples, max(start + 1, limit - search_samples), limit)
        windows.append(AudioWindow(start, samples[start:cut]))
        start = cut
    windows.append(AudioWindow(start, samples[start:]))
    return windows


def audio_input(samples: FloatArray) -> AudioInput:
    """The wire form of one window: little-endian float32 clipped to [-1, 1]."""
    assert len(samples) <= AUDIO_WINDOW_SAMPLES, "split the audio into windows first"
    clipped = np.clip(samples, -1.0, 1.0).astype("<f4", copy=False)
    return AudioInput(samples=clipped.tobytes())


def duration_s(samples: FloatArray) -> float:
    return len(samples) / AUDIO_SAMPLE_RATE
