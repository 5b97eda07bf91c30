"""GET /v1/realtime: vLLM's realtime transcription WebSocket.

Client events: `session.update` ({model, language?}), `input_audio_buffer.append` ({audio: base64 PCM16, 16 kHz,
mono, little-endian}), `input_audio_buffer.commit` ({final?: bool}), `input_audio_buffer.clear`.
Server events: `session.created`, `transcription.delta` ({delta}), `transcription.done` ({text, usage}),
`error` ({error, code}); an error never closes the session (a dead engine does, after its error event).

An utterance is the audio appended between two commits. Whisper needs whole windows, so a window is transcribed
when the buffer passes 30 s (cut at the quietest point of its last 2 s, as files are) and when a commit arrives
(the rest of the buffer); deltas stream from the engine as each window decodes, and the commit's
`transcription.done` follows the utterance's last window. A commit with no audio since the last one is a no-op
(vLLM clients send one before streaming), except `final: true`, which answers an empty `transcription.done`.
Windows of one session decode one after another, in order; sessions decode concurrently and share the engine.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi.responses import JSONResponse
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from engine_core.protocol import AUDIO_WINDOW_SAMPLES
from frontend.errors import APIError, EngineDeadError, error_body
from frontend.generate.choices import run_choices
from frontend.speech.audio import AudioWindow, FloatArray, pcm16_to_float32, split_windows
from frontend.speech.protocol import error_event, session_created, transcription_delta, transcription_done
from frontend.speech.transcription import detect_language, speech_sampling_params, window_choices
from frontend.speech.upload import max_file_bytes
from frontend.speech.whisper import WhisperVocab
from frontend.state import FrontendState

logger = logging.getLogger("conveyor.frontend")

_MAX_QUEUED_WINDOWS = 8  # backpressure: the reader waits while this many windows wait to be transcribed


@dataclass
class _Job:
    """Windows to transcribe; `ends_utterance`: send transcription.done after them."""

    windows: list[AudioWindow]
    ends_utterance: bool


class RealtimeSession:
    """One WebSocket connection: a reader (this coroutine) and a transcriber task fed through a bounded queue."""

    def __init__(self, frontend: FrontendState, websocket: WebSocket) -> None:
        self.frontend = frontend
        self.websocket = websocket
        self.session_id = f"sess-{uuid.uuid4().hex}"
        self.model_validated = False
        self.language: str | None = None
        self._chunks: list[FloatArray] = []  # audio appended since the last window was cut off
        self._num_buffered = 0
        self._utterance_has_audio = False
        self._next_window = 0
        self._jobs: asyncio.Queue[_Job] = asyncio.Queue(maxsize=_MAX_QUEUED_WINDOWS)
        self._send_lock = asyncio.Lock()

    async def run(self) -> None:
        vocab = await self._admit()
        if vocab is None:
            return
        await self.send(session_created(self.session_id, int(time.time())))
        transcriber = asyncio.create_task(self._transcribe_jobs(vocab), name=f"realtime-{self.session_id}")
        try:
            while True:
                message = await self.websocket.receive()
                if message["type"] == "websocket.disconnect":
                    break
                if message.get("text") is None:
                    await self.send_error("binary frames are not events: send JSON text events", "invalid_event")
                    continue
                await self._handle(str(message["text"]), vocab)
        except WebSocketDisconnect:
            pass
        finally:
            transcriber.cancel()  # aborts the engine request in flight
            await asyncio.gather(transcriber, return_exceptions=True)

    async def _admit(self) -> WhisperVocab | None:
        """Check the API key and the model before accepting; refusals are HTTP answers to the handshake."""
        # frontend/auth.py's middleware refuses a keyless handshake first; the same check here keeps the
        # route safe in an app built without it.
        if not self.frontend.api_keys.admits(self.websocket.scope):
            await self._deny(401, "Incorrect or missing API key: send `Authorization: Bearer <key>`.",
                             "invalid_api_key")
            return None
        try:
            vocab = self.frontend.require_speech("/v1/realtime")
        except APIError as exc:
            await self._deny(exc.status_code, exc.message, exc.code)
            return None
        offered = self.websocket.scope.get("subprotocols") or []
        await self.websocket.accept(subprotocol="realtime" if "realtime" in offered else None)
        return vocab

    async def _deny(self, status: int, message: str, code: str | int | None) -> None:
        if "websocket.http.response" in self.websocket.scope.get("extensions", {}):
            await self.websocket.send_denial_response(JSONResponse(error_body(status, message, None, code),
                                                                   status_code=status))
        else:
            await self.websocket.close(code=1008, reason=message[:120])

    async def send(self, event: dict[str, Any]) -> None:
        async with self._send_lock:
            if self.websocket.application_state == WebSocketState.CONNECTED:
                await self.websocket.send_text(json.dumps(event, ensure_ascii=False))

    async def send_error(self, message: str, code: str) -> None:
        await self.send(error_event(message, code))

    # ------------------------------------------------------------------ client events

    async def _handle(self, text: str, vocab: WhisperVocab) -> None:
        try:
            event = json.loads(text)
        except json.JSONDecodeError:
            await self.send_error("the event is not valid JSON", "invalid_json")
            return
        if not isinstance(event, dict):
            await self.send_error("an event is a JSON object with a 'type'", "invalid_event")
            return
        kind = event.get("type")
        if kind == "session.update":
            await self._session_update(event, vocab)
        elif kind == "input_audio_buffer.append":
            await self._append(event.get("audio"))
        elif kind == "input_audio_buffer.commit":
            await self._commit(bool(event.get("final", False)))
        elif kind == "input_audio_buffer.clear":
            self._chunks, self._num_buffered = [], 0
        else:
            await self.send_error(f"unknown event type {kind!r}: expected session.update, input_audio_buffer.append, "
                                  "input_audio_buffer.commit or input_audio_buffer.clear", "unknown_event")

    async def _session_update(self, event: dict[str, Any], vocab: WhisperVocab) -> None:
        nested = event.get("session")
        settings: dict[str, Any] = nested if isinstance(nested, dict) else event
        try:
            self.frontend.check_model(settings.get("model"))
            language = vocab.language_code(settings["language"]) if settings.get("language") else self.language
        except APIError as exc:
            await self.send_error(exc.message, "model_not_found" if exc.status_code == 404 else "invalid_language")
            return
        self.model_validated, self.language = True, language

    async def _append(self, audio: Any) -> None:
        if not isinstance(audio, str):
            await self.send_error("input_audio_buffer.append needs 'audio': base64 PCM16 (16 kHz mono)",
                                  "invalid_audio")
            return
        try:
            data = base64.b64decode(audio, validate=True)
        except (binascii.Error, ValueError):
            await self.send_error("'audio' is not valid base64", "invalid_audio")
            return
        if not data:
            await self.send_error("the audio chunk is empty", "invalid_audio")
            return
        if len(data) % 2:
            await self.send_error(f"PCM16 audio has 2 bytes per sample, but the chunk has {len(data)} bytes: send "
                                  "16-bit little-endian mono PCM at 16 kHz", "invalid_audio")
            return
        if len(data) > max_file_bytes():
            await self.send_error(f"the audio chunk is larger than {max_file_bytes() / 2**20:g} MB", "audio_too_large")
            return
        samples = pcm16_to_float32(data)
        self._chunks.append(samples)
        self._num_buffered += len(samples)
        self._utterance_has_audio = True
        if self._num_buffered > AUDIO_WINDOW_SAMPLES:
            windows = split_windows(self._take_buffer())
            *full, rest = windows
            self._chunks, self._num_buffered = [rest.samples], len(rest.samples)
            await self._jobs.put(_Job(full, ends_utterance=False))

    async def _commit(self, final: bool) -> None:
        if not self.model_validated:
            await self.send_error("send session.update with the model before committing audio",
                                  "model_not_validated")
            return
        if not self._utterance_has_audio:
            if final:
                await self._jobs.put(_Job([], ends_utterance=True))
            return
        samples = self._take_buffer()
        self._chunks, self._num_buffered, self._utterance_has_audio = [], 0, False
        windows = split_windows(samples) if len(samples) else []
        await self._jobs.put(_Job(windows, ends_utterance=True))

    def _take_buffer(self) -> FloatArray:
        if not self._chunks:
            return np.zeros(0, dtype=np.float32)
        return np.concatenate(self._chunks) if len(self._chunks) > 1 else self._chunks[0]

    # ------------------------------------------------------------------ transcription

    async def _transcribe_jobs(self, vocab: WhisperVocab) -> None:
        """Decode queued windows in order, streaming deltas; one transcription.done per utterance."""
        text, prompt_tokens, completion_tokens = "", 0, 0
        language = self.language
        while True:
            job = await self._jobs.get()
            try:
                for window in job.windows:
                    if language is None:
                        language = self.language or (await self._detect(vocab, window) if vocab.multilingual
                                                     else "en")
                    piece, num_prompt, num_generated = await self._transcribe(vocab, window, language, not text)
                    text, prompt_tokens, completion_tokens = (text + piece, prompt_tokens + num_prompt,
                                                              completion_tokens + num_generated)
                if job.ends_utterance:
                    await self.send(transcription_done(text, prompt_tokens, completion_tokens))
                    text, prompt_tokens, completion_tokens, language = "", 0, 0, self.language
            except EngineDeadError as exc:
                await self.send_error(exc.message, "engine_dead")
                await self.websocket.close(code=1011, reason="the engine is not available")
                return
            except APIError as exc:  # this utterance failed; the session goes on
                await self.send_error(exc.message, "processing_error")
                text, prompt_tokens, completion_tokens, language = "", 0, 0, self.language
            except Exception as exc:  # a bug must not leave the client waiting for a done that never comes
                logger.exception("realtime session %s: transcription failed", self.session_id)
                await self.send_error(f"internal error: {type(exc).__name__}", "processing_error")
                text, prompt_tokens, completion_tokens, language = "", 0, 0, self.language

    async def _detect(self, vocab: WhisperVocab, window: AudioWindow) -> str:
        request_id = f"rt-{self.session_id}-{self._next_window}"
        self._next_window += 1
        return await detect_language(self.frontend, vocab, request_id, window)

    async def _transcribe(self, vocab: WhisperVocab, window: AudioWindow, language: str,
                          first: bool) -> tuple[str, int, int]:
        """One window: stream its deltas; (its text, prompt tokens, generated tokens)."""
        prompt = vocab.decoder_prompt("transcribe", language, [])
        params = speech_sampling_params(self.frontend, None, len(prompt))
        [choice] = window_choices(self.frontend, vocab, f"rt-{self.session_id}", [window], prompt, params,
                                  first_index=self._next_window)
        self._next_window += 1
        text = ""
        async for delta in run_choices(self.frontend, [choice]):
            piece = delta.text.lstrip() if first and not text else delta.text
            if piece:
                text += piece
                await self.send(transcription_delta(piece))
        return text, len(prompt), len(choice.state.token_ids)
