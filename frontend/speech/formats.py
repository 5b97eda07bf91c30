"""Response bodies of the speech endpoints: json, text, verbose_json, srt and vtt.

srt, vtt and verbose_json decode with timestamps: each window's (<= 30 s) output reads
`<|t0|> text <|t1|><|t1|> text <|t2|>`, and every text between an opening and a closing timestamp is one segment,
its times the timestamps (0.02 s steps) offset by the window's start. Text left open at the end of a window (the
model reached end-of-text before a closing timestamp) ends at the window's end. Times are clipped to the window and
never go back, so segments are monotonic over the whole clip. A window decoded without timestamps is one segment
spanning the window. Whisper's temperature fallback and `no_speech_prob` are not computed (no_speech_prob is 0.0);
avg_logprob and compression_ratio are the window's, as openai/whisper reports them.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Any, Callable

from fastapi.responses import JSONResponse, PlainTextResponse, Response

from frontend.speech.audio import AudioWindow
from frontend.speech.whisper import LANGUAGE_NAMES

_FRAMES_PER_SECOND = 100  # Whisper's `seek` counts 10 ms mel frames
TIMESTAMP_STEP_S = 0.02  # one timestamp token


@dataclass
class Segment:
    """A stretch of text and its place in the clip."""

    start_s: float
    end_s: float
    text: str
    token_ids: list[int]  # its tokens, its timestamp tokens included


@dataclass
class WindowResult:
    """What one window's engine request produced."""

    window: AudioWindow
    text: str  # timestamp tokens left out
    token_ids: list[int]  # generated tokens, end-of-text excluded
    logprobs: list[float]  # of each generated token (verbose_json asks for them), end-of-text included
    finish_reason: str | None
    num_prompt_tokens: int
    timed_segments: list[Segment] | None = None  # decoded with timestamps; None: the window is one segment


def timed_window(window: AudioWindow, token_ids: list[int], timestamp_begin: int,
                 decode: Callable[[list[int]], str]) -> tuple[str, list[Segment]]:
    """A window decoded with timestamps (`token_ids` without end-of-text): its text without the timestamp tokens,
    and its segments in clip time (see the module docstring)."""
    duration = window.end_s - window.start_s
    raw: list[tuple[float, float | None, list[int], list[int]]] = []  # (start, end or None: open, text, all ids)
    start: float | None = None
    last_end = 0.0
    text_ids: list[int] = []
    segment_ids: list[int] = []
    for token in token_ids:
        if token < timestamp_begin:
            if start is None:  # text before any opening timestamp: it starts where the last segment ended
                start, segment_ids = last_end, []
            text_ids.append(token)
            segment_ids.append(token)
            continue
        at = (token - timestamp_begin) * TIMESTAMP_STEP_S
        if start is None or not text_ids:  # an opening timestamp (a repeated one moves the opening)
            start, segment_ids = at, [token]
            continue
        raw.append((start, at, text_ids, segment_ids + [token]))
        start, last_end, text_ids, segment_ids = None, at, [], []
    if text_ids and start is not None:
        raw.append((start, None, text_ids, segment_ids))
    segments: list[Segment] = []
    previous_end = 0.0
    for segment_start, segment_end, segment_text_ids, ids in raw:
        begin = min(max(segment_start, previous_end), duration)
        end = min(max(duration if segment_end is None else segment_end, begin), duration)
        segments.append(Segment(window.start_s + begin, window.start_s + end, decode(segment_text_ids), ids))
        previous_end = end
    return decode([token for token in token_ids if token < timestamp_begin]), segments


def joined_text(results: list[WindowResult]) -> str:
    """The windows' texts in order; Whisper starts each with a space, which the first loses (as OpenAI's)."""
    return "".join(result.text for result in results).lstrip()


def compression_ratio(text: str) -> float:
    """Whisper's repetition measure: text bytes / zlib-compressed bytes (above ~2.4 suggests a loop)."""
    data = text.encode("utf-8")
    return len(data) / len(zlib.compress(data)) if data else 0.0


def segments(results: list[WindowResult], temperature: float) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    for result in results:
        window = result.window
        timed = result.timed_segments
        window_segments = (timed if timed is not None
                           else [Segment(window.start_s, window.end_s, result.text, result.token_ids)])
        avg_logprob = sum(result.logprobs) / len(result.logprobs) if result.logprobs else 0.0
        ratio = compression_ratio(result.text)
        first_id = len(items)
        items.extend({"id": first_id + offset, "seek": round(window.start_s * _FRAMES_PER_SECOND),
                      "start": round(segment.start_s, 3), "end": round(segment.end_s, 3), "text": segment.text,
                      "tokens": segment.token_ids, "temperature": temperature, "avg_logprob": avg_logprob,
                      "compression_ratio": ratio, "no_speech_prob": 0.0}
                     for offset, segment in enumerate(window_segments))
    return items


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
