"""A dead engine (sentinel or silence) turns into 503s; a client that goes away aborts its engine request."""
from __future__ import annotations

import threading
import time
from typing import Iterator

import httpx
import pytest

from tests.frontend.conftest import SERVED_NAME, FrontendHarness, canned_token_ids
from tests.frontend.fake_core import FakeCore

COMPLETION = {"model": SERVED_NAME, "prompt": "hi", "max_tokens": 50}


@pytest.fixture()
def slow_core() -> Iterator[FakeCore]:
    fake = FakeCore(canned_token_ids(), token_interval_s=0.1)
    yield fake
    fake.close()


def assert_503(response: httpx.Response) -> None:
    assert response.status_code == 503, response.text
    error = response.json()["error"]
    assert error["type"] == "ServiceUnavailableError" and error["code"] == 503 and "engine" in error["message"]


def test_engine_dead_sentinel(slow_core: FakeCore) -> None:
    harness = FrontendHarness(slow_core)
    try:
        with harness.http() as http:
            assert http.get("/health").status_code == 200
            assert slow_core.wait_for(lambda: bool(slow_core.hellos))
            in_flight: list[httpx.Response] = []
            worker = threading.Thread(target=lambda: in_flight.append(http.post("/v1/completions", json=COMPLETION)))
            worker.start()
            assert slow_core.wait_for(lambda: bool(slow_core.requests))
            slow_core.die()
            worker.join(timeout=5)
            assert_503(in_flight[0])  # the waiting request failed instead of hanging
            assert_503(http.get("/health"))
            assert_503(http.post("/v1/completions", json=COMPLETION))
            assert_503(http.post("/v1/chat/completions", json={
                "model": SERVED_NAME, "messages": [{"role": "user", "content": "x"}], "stream": True}))
    finally:
        harness.stop()


def test_silent_engine_is_dead_after_the_heartbeat_timeout(slow_core: FakeCore) -> None:
    harness = FrontendHarness(slow_core, heartbeat_timeout_s=0.6)
    try:
        with harness.http() as http:
            time.sleep(1.0)  # heartbeats every 0.2 s keep it alive
            assert http.get("/health").status_code == 200
            slow_core.silent = True
            deadline = time.monotonic() + 5
            while http.get("/health").status_code == 200 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert_503(http.get("/health"))
            assert_503(http.post("/v1/completions", json=COMPLETION))
    finally:
        harness.stop()


def test_stream_in_flight_gets_an_error_event_when_the_engine_dies(slow_core: FakeCore) -> None:
    harness = FrontendHarness(slow_core)
    try:
        with harness.http() as http, http.stream("POST", "/v1/completions",
                                                 json={**COMPLETION, "stream": True}) as response:
            lines = response.iter_lines()
            assert next(line for line in lines if line).startswith("data: {")
            slow_core.die()
            rest = [line for line in lines if line]
        assert '"ServiceUnavailableError"' in rest[-2] and rest[-1] == "data: [DONE]"
    finally:
        harness.stop()


def test_streaming_disconnect_aborts(slow_core: FakeCore) -> None:
    harness = FrontendHarness(slow_core)
    try:
        with harness.http() as http:
            with http.stream("POST", "/v1/chat/completions", json={
                    "model": SERVED_NAME, "messages": [{"role": "user", "content": "x"}], "stream": True}) as response:
                next(line for line in response.iter_lines() if line)  # the role chunk
            assert slow_core.wait_for(lambda: bool(slow_core.requests))
            request_id = slow_core.requests[-1].request_id
            assert slow_core.wait_for(lambda: request_id in slow_core.aborted)
    finally:
        harness.stop()


def test_non_streaming_disconnect_aborts(slow_core: FakeCore) -> None:
    harness = FrontendHarness(slow_core)
    try:
        with httpx.Client(base_url=harness.base_url, timeout=0.5) as http, pytest.raises(httpx.ReadTimeout):
            http.post("/v1/completions", json={**COMPLETION, "n": 2})
        request_ids = {request.request_id for request in slow_core.requests}
        assert len(request_ids) == 2
        assert slow_core.wait_for(lambda: request_ids <= set(slow_core.aborted))
    finally:
        harness.stop()
