"""The /v1/realtime WebSocket through a real frontend (uvicorn) in front of the fake engine core, driven by the
`websockets` client. The fake core answers " Heard N samples." per window."""
from __future__ import annotations

import asyncio
import base64
import json
from typing import Any, Iterator

import numpy as np
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus

from tests.frontend.conftest import SERVED_NAME, FrontendHarness
from tests.frontend.fake_core import FakeCore
from tests.frontend.speech.harness import TINY_EN, WHISPER, requests_of, speech_core, whisper_tokenizer

__all__ = ["speech_core", "whisper_tokenizer"]  # module fixtures from harness.py
API_KEY = "sk-rt"


@pytest.fixture(scope="module")
def server(speech_core: FakeCore) -> Iterator[FrontendHarness]:
    harness = FrontendHarness(speech_core, tokenizer_dir=str(TINY_EN), api_key=API_KEY, **WHISPER)  # type: ignore
    yield harness
    harness.stop()


def url(harness: FrontendHarness) -> str:
    return harness.base_url.replace("http://", "ws://") + "/v1/realtime"


def pcm16(seconds: float) -> bytes:
    t = np.arange(int(seconds * 16000)) / 16000
    return (8000 * np.sin(2 * np.pi * 220 * t)).astype("<i2").tobytes()


async def send(ws: ClientConnection, **event: Any) -> None:
    await ws.send(json.dumps(event))


async def receive(ws: ClientConnection) -> dict[str, Any]:
    event = json.loads(await asyncio.wait_for(ws.recv(), 10))
    assert isinstance(event, dict)
    return event


async def stream_clip(ws: ClientConnection, audio: bytes, chunk_bytes: int = 3200) -> tuple[list[str], dict[str, Any]]:
    """vLLM's client flow: session.update, commit, append chunks (100 ms), commit final; deltas and the done."""
    await send(ws, type="session.update", model=SERVED_NAME)
    await send(ws, type="input_audio_buffer.commit")
    for start in range(0, len(audio), chunk_bytes):
        chunk = base64.b64encode(audio[start:start + chunk_bytes]).decode()
        await send(ws, type="input_audio_buffer.append", audio=chunk)
    await send(ws, type="input_audio_buffer.commit", final=True)
    deltas = []
    while True:
        event = await receive(ws)
        if event["type"] == "transcription.delta":
            deltas.append(event["delta"])
        else:
            assert event["type"] == "transcription.done", event
            return deltas, event


def run(coroutine: Any) -> Any:
    return asyncio.run(coroutine)


def test_stream_a_clip(server: FrontendHarness) -> None:
    async def scenario() -> tuple[dict[str, Any], list[str], dict[str, Any]]:
        async with connect(url(server), additional_headers={"Authorization": f"Bearer {API_KEY}"}) as ws:
            created = await receive(ws)
            deltas, done = await stream_clip(ws, pcm16(2.0))
            return created, deltas, done

    created, deltas, done = run(scenario())
    assert created["type"] == "session.created" and created["id"].startswith("sess-")
    assert "".join(deltas) == done["text"] == "Heard 32000 samples."
    assert done["usage"]["prompt_tokens"] == 2 and done["usage"]["total_tokens"] == 2 + done["usage"][
        "completion_tokens"]


def test_long_stream_is_windowed_while_it_arrives(server: FrontendHarness, speech_core: FakeCore) -> None:
    async def scenario() -> tuple[str, dict[str, Any]]:
        async with connect(url(server), subprotocols=["realtime", f"openai-insecure-api-key.{API_KEY}"]) as ws:
            assert ws.subprotocol == "realtime"
            created = await receive(ws)
            deltas, done = await stream_clip(ws, pcm16(65.0), chunk_bytes=32000)
            return str(created["id"]), done

    session_id, done = run(scenario())
    counts = [len(r.audio.samples) // 4 for r in requests_of(speech_core, f"rt-{session_id}")]  # type: ignore
    assert len(counts) == 3 and sum(counts) == 65 * 16000 and max(counts) <= 480000
    assert done["text"] == " ".join(f"Heard {count} samples." for count in counts)


def test_utterances_and_errors_keep_the_session(server: FrontendHarness) -> None:
    async def scenario() -> list[dict[str, Any]]:
        events = []
        async with connect(url(server), additional_headers={"Authorization": f"Bearer {API_KEY}"}) as ws:
            await receive(ws)
            await send(ws, type="input_audio_buffer.commit")
            events.append(await receive(ws))  # model not validated yet
            await send(ws, type="session.update", model="whisper-large")
            events.append(await receive(ws))
            await send(ws, type="session.update", model=SERVED_NAME)
            await ws.send("{not json")
            events.append(await receive(ws))
            await send(ws, type="input_audio_buffer.append", audio="***")
            events.append(await receive(ws))
            await send(ws, type="input_audio_buffer.append", audio=base64.b64encode(b"\1\2\3").decode())
            events.append(await receive(ws))
            await send(ws, type="input_audio_buffer.append")
            events.append(await receive(ws))
            await send(ws, type="response.create")
            events.append(await receive(ws))
            await ws.send(b"\0\1")
            events.append(await receive(ws))
            for seconds in (1.0, 0.5):  # two utterances, one commit each
                await send(ws, type="input_audio_buffer.append", audio=base64.b64encode(pcm16(seconds)).decode())
                await send(ws, type="input_audio_buffer.commit")
                while (event := await receive(ws))["type"] != "transcription.done":
                    pass
                events.append(event)
            await send(ws, type="input_audio_buffer.commit", final=True)  # nothing buffered: an empty done
            events.append(await receive(ws))
        return events

    events = run(scenario())
    codes = [event.get("code") for event in events[:8]]
    assert codes == ["model_not_validated", "model_not_found", "invalid_json", "invalid_audio", "invalid_audio",
                     "invalid_audio", "unknown_event", "invalid_event"]
    assert all(event["type"] == "error" and event["error"] for event in events[:8])
    assert "2 bytes per sample" in events[4]["error"]
    assert [event["text"] for event in events[8:]] == ["Heard 16000 samples.", "Heard 8000 samples.", ""]


def test_concurrent_sessions(server: FrontendHarness) -> None:
    async def one(seconds: float) -> str:
        async with connect(url(server), additional_headers={"Authorization": f"Bearer {API_KEY}"}) as ws:
            await receive(ws)
            deltas, done = await stream_clip(ws, pcm16(seconds))
            assert "".join(deltas) == done["text"]
            return str(done["text"])

    async def scenario() -> list[str]:
        return list(await asyncio.gather(*(one(1.0 + index / 10) for index in range(4))))

    assert run(scenario()) == [f"Heard {16000 + index * 1600} samples." for index in range(4)]


def test_refused_handshakes(server: FrontendHarness, frontend: FrontendHarness) -> None:
    async def status_of(address: str, **kwargs: Any) -> tuple[int, bytes]:
        try:
            async with connect(address, **kwargs):
                pass
        except InvalidStatus as exc:
            return exc.response.status_code, bytes(exc.response.body or b"")
        raise AssertionError("the handshake was accepted")

    status, body = run(status_of(url(server)))
    assert status == 401 and json.loads(body)["error"]["code"] == "invalid_api_key"
    status, body = run(status_of(url(server), additional_headers={"Authorization": "Bearer wrong"}))
    assert status == 401
    status, body = run(status_of(url(frontend)))  # a text model
    assert status == 400 and "takes no audio" in json.loads(body)["error"]["message"]


def test_engine_failure_is_an_error_event() -> None:
    failing = FakeCore([1], error_message="the worker could not read the audio")
    harness = FrontendHarness(failing, tokenizer_dir=str(TINY_EN), **WHISPER)  # type: ignore[arg-type]

    async def scenario() -> list[dict[str, Any]]:
        async with connect(url(harness)) as ws:
            await receive(ws)
            await send(ws, type="session.update", model=SERVED_NAME)
            events = []
            for _ in range(2):  # the session survives the failure
                await send(ws, type="input_audio_buffer.append", audio=base64.b64encode(pcm16(0.5)).decode())
                await send(ws, type="input_audio_buffer.commit")
                events.append(await receive(ws))
            await send(ws, type="input_audio_buffer.append", audio=base64.b64encode(pcm16(0.5)).decode())
            await send(ws, type="input_audio_buffer.clear")  # drops the buffered audio: nothing to transcribe
            await send(ws, type="input_audio_buffer.commit", final=True)
            events.append(await receive(ws))
            return events

    try:
        events = run(scenario())
    finally:
        harness.stop()
        failing.close()
    assert [event["type"] for event in events] == ["error", "error", "transcription.done"]
    assert "could not read the audio" in events[0]["error"] and events[0]["code"] == "processing_error"
    assert events[2]["text"] == ""
