"""Streaming completions held open in background threads, to act on a server (kill, signal) while they run."""
from __future__ import annotations

import json
import threading
import time
from typing import Any

import httpx

from tests.server_harness import ConveyorServer


class OpenStream:
    """One streaming completion read in a thread: what arrived, how it ended and when."""

    def __init__(self, server: ConveyorServer, model: str, max_tokens: int) -> None:
        self.chunks = 0  # data events with a choice (tokens)
        self.error: dict[str, Any] | None = None  # the error event, if the stream ended with one
        self.done = False  # saw `data: [DONE]`
        self.finish_reason: str | None = None
        self.completion_tokens = 0  # from the final usage chunk
        self.exception: BaseException | None = None  # the connection failed instead
        self.ended_at = 0.0  # time.monotonic() when the stream ended
        self.started = threading.Event()  # the first token arrived
        body = {"model": model, "prompt": "Once upon a time", "max_tokens": max_tokens, "ignore_eos": True,
                "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
        self._thread = threading.Thread(target=self._read, args=(server.base_url, body), daemon=True)
        self._thread.start()

    def _read(self, base_url: str, body: dict[str, Any]) -> None:
        try:
            with httpx.stream("POST", f"{base_url}/v1/completions", json=body, timeout=120.0) as response:
                for line in response.iter_lines():
                    self._take(line)
        except httpx.HTTPError as exc:
            self.exception = exc
        finally:
            self.ended_at = time.monotonic()
            self.started.set()

    def _take(self, line: str) -> None:
        if not line.startswith("data:"):
            return
        payload = line[len("data:"):].strip()
        if payload == "[DONE]":
            self.done = True
            return
        event = json.loads(payload)
        if "error" in event:
            self.error = event["error"]
            return
        if not event["choices"]:  # the usage chunk
            self.completion_tokens = event["usage"]["completion_tokens"]
            return
        self.chunks += 1
        self.finish_reason = event["choices"][0].get("finish_reason") or self.finish_reason
        self.started.set()

    @property
    def finished_whole(self) -> bool:
        return self.done and self.error is None and self.exception is None and self.finish_reason == "length"

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the stream hung"


def open_streams(server: ConveyorServer, count: int, max_tokens: int) -> list[OpenStream]:
    """`count` streams, returned once each has its first token. On a busy machine a fast stream may already have
    ended by then (the last one started seconds after the first): tests that act on open streams take
    `still_open(streams)` at the moment they act."""
    model = httpx.get(f"{server.base_url}/v1/models", timeout=10.0).json()["data"][0]["id"]
    streams = [OpenStream(server, model, max_tokens) for _ in range(count)]
    for stream in streams:
        assert stream.started.wait(timeout=60), "a stream got no token"
    return streams


def still_open(streams: list[OpenStream], at_least: int) -> list[OpenStream]:
    """The streams not yet ended; at least `at_least` of them, or the test's premise does not hold."""
    live = [stream for stream in streams if not stream.ended_at]
    assert len(live) >= at_least, ["too few streams still open", *[(s.chunks, s.error, s.exception) for s in streams]]
    return live
