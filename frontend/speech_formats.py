"""Response bodies of the speech endpoints: json, text, verbose_json, srt and vtt.

One segment per audio window (a window is at most 30 s): start/end are the window's place in the clip, so
segments are contiguous, monotonic, and the last one ends at the clip's duration. Whisper's temperature fallback
and `no_speech_prob` are not computed (no_speech_prob is reported as 0.0).
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Any

from fastapi.responses import JSONResponse, PlainTextResponse, Response

from frontend.audio import AudioWindow
from frontend.whisper import LANGUAGE_NAMES

_FRAMES_PER_SECOND = 100  # Whisper's `seek` counts 10 ms mel frames


@dataclass
class WindowResult:
    """What one window's engine request produced."""

    window: AudioWindow
    text: str
    token_ids: list[int]  # generated tokens, end-of-text excluded
    logprobs: list[float]  # of each generated token (verbose_json asks for them), end-of-text included
    finish_reason: str | None
    num_prompt_tokens: int


def joined_text(results: list[WindowResult]) -> str:
    """The windows' texts in order; Whisper starts each with a space, which the first loses (as OpenAI's)."""
    return "".join(result.text for result in results).lstrip()


def compression_ratio(text: str) -> float:
    """Whisper's repetition measure: text bytes / zlib-compressed bytes (above ~2.4 suggests a loop)."""
    data = text.encode("utf-8")
    return len(data) / len(zlib.compress(data)) if data else 0.0


def segments(results: list[WindowResult], temperature: float) -> list[dict[str, Any]]:
    return [{"id": index, "seek": round(result.window.start_s * _FRAMES_PER_SECOND),
             "start": round(result.window.start_s, 3), "end": round(result.window.end_s, 3), "text": result.text,
             "tokens": result.token_ids, "temperature": temperature,
             "avg_logprob": sum(result.logprobs) / len(result.logprobs) if result.logprobs else 0.0,
             "compression_ratio": compression_ratio(result.text), "no_speech_prob": 0.0}
            for index, result in enumerate(results)]


def timestamp(seconds: float, decimal_marker: str) -> str:
    """`HH:MM:SS,mmm` (srt) or `HH:MM:SS.mmm` (vtt)."""
    milliseconds = max(0, round(seconds * 1000))
    hours, milliseconds = divmod(milliseconds, 3_600_000)
    minutes, milliseconds = divmod(milliseconds, 60_000)
    secs, milliseconds = divmod(milliseconds, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{decimal_marker}{milliseconds:03d}"


def srt(items: list[dict[str, Any]]) -> str:
    cues = [item for item in items if str(item["text"]).strip()]
    return "".join(f"{number}\n{timestamp(item['start'], ',')} --> {timestamp(item['end'], ',')}\n"
                   f"{str(item['text']).strip()}\n\n" for number, item in enumerate(cues, start=1))


def vtt(items: list[dict[str, Any]]) -> str:
    cues = [item for item in items if str(item["text"]).strip()]
    return "WEBVTT\n\n" + "".join(f"{timestamp(item['start'], '.')} --> {timestamp(item['end'], '.')}\n"
                                  f"{str(item['text']).strip()}\n\n" for item in cues)


def duration_usage(duration_s: float) -> dict[str, Any]:
    """OpenAI's usage of a transcription: the audio's duration in whole seconds, rounded up."""
    return {"type": "duration", "seconds": int(math.ceil(duration_s))}


def speech_response(response_format: str, task: str, language: str, duration_s: float,
                    results: list[WindowResult], temperature: float) -> Response:
    """The body for `response_format`; transcriptions carry the duration usage (as OpenAI and vLLM), translations
    do not."""
    text = joined_text(results)
    usage = {"usage": duration_usage(duration_s)} if task == "transcribe" else {}
    if response_format == "json":
        return JSONResponse({"text": text, **usage})
    if response_format == "text":
        return PlainTextResponse(text)
    items = segments(results, temperature)
    if response_format == "srt":
        return PlainTextResponse(srt(items))
    if response_format == "vtt":
        return PlainTextResponse(vtt(items), media_type="text/vtt")
    return JSONResponse({"task": task, "language": LANGUAGE_NAMES.get(language, language),
                         "duration": round(duration_s, 3), "text": text, "segments": items, **usage})
