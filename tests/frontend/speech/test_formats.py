"""Whisper's timestamp tokens -> timed segments (frontend/speech/formats.py `timed_window`)."""
from __future__ import annotations

import numpy as np

from frontend.speech.audio import AudioWindow
from frontend.speech.formats import WindowResult, segments, timed_window

BEGIN = 50363  # tiny.en's <|0.00|>


def ts(seconds: float) -> int:
    return BEGIN + round(seconds / 0.02)


def decode(ids: list[int]) -> str:
    assert all(token < BEGIN for token in ids), "timestamp tokens never reach the tokenizer"
    return "".join(f" w{token}" for token in ids)


def window(start_s: float, seconds: float) -> AudioWindow:
    return AudioWindow(round(start_s * 16000), np.zeros(round(seconds * 16000), dtype=np.float32))


def test_pairs_become_segments_offset_by_the_window() -> None:
    tokens = [ts(0.0), 1, 2, ts(2.4), ts(2.4), 3, ts(5.0), ts(5.6), 4, 5, ts(9.0)]
    text, found = timed_window(window(30.0, 10.0), tokens, BEGIN, decode)
    assert text == " w1 w2 w3 w4 w5"
    assert [(s.start_s, s.end_s, s.text) for s in found] == [
        (30.0, 32.4, " w1 w2"), (32.4, 35.0, " w3"), (35.6, 39.0, " w4 w5")]
    assert found[0].token_ids == [ts(0.0), 1, 2, ts(2.4)]


def test_open_text_ends_at_the_window_end_and_times_are_clipped() -> None:
    # A closing timestamp past the audio, then text the model left open at end-of-text.
    tokens = [ts(0.5), 1, ts(4.0), ts(4.0), 2]
    _, found = timed_window(window(0.0, 3.0), tokens, BEGIN, decode)
    assert [(s.start_s, s.end_s) for s in found] == [(0.5, 3.0), (3.0, 3.0)]
    # Times never go back, even when the tokens do (sampling without the worker's rules cannot, but be safe).
    _, found = timed_window(window(0.0, 10.0), [ts(3.0), 1, ts(4.0), ts(1.0), 2, ts(2.0)], BEGIN, decode)
    assert [(s.start_s, s.end_s) for s in found] == [(3.0, 4.0), (4.0, 4.0)]


def test_no_timestamps_or_no_text() -> None:
    _, found = timed_window(window(0.0, 2.0), [1, 2], BEGIN, decode)  # text only: the whole window
    assert [(s.start_s, s.end_s, s.text) for s in found] == [(0.0, 2.0, " w1 w2")]
    text, found = timed_window(window(0.0, 2.0), [ts(0.0)], BEGIN, decode)  # silence
    assert text == "" and found == []


def test_verbose_segments_number_across_windows() -> None:
    results = []
    for start, tokens in ((0.0, [ts(0.0), 1, ts(1.0), ts(1.0), 2, ts(2.0)]), (30.0, [ts(0.2), 3, ts(3.0)])):
        win = window(start, 30.0 if start == 0 else 4.0)
        text, timed = timed_window(win, tokens, BEGIN, decode)
        results.append(WindowResult(win, text, tokens, [-1.0, -0.5], "stop", 1, timed))
    items = segments(results, 0.0)
    assert [(item["id"], item["seek"], item["start"], item["end"]) for item in items] == [
        (0, 0, 0.0, 1.0), (1, 0, 1.0, 2.0), (2, 3000, 30.2, 33.0)]
    assert all(item["avg_logprob"] == -0.75 for item in items)
