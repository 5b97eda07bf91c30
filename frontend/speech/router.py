"""Speech: POST /v1/audio/transcriptions and /v1/audio/translations (multipart uploads, read by the serving code
itself so the size limit holds while the body streams in), and the /v1/realtime WebSocket.

Thin; the work is in speech/transcription.py and realtime.py. frontend/auth.py's middleware checks the API key
of the WebSocket handshake as of every HTTP request.
"""
from __future__ import annotations

from fastapi import APIRouter, Depends, Request, WebSocket
from fastapi.responses import Response

from frontend.dependencies import app_state_getter
from frontend.speech.realtime import RealtimeSession
from frontend.speech.transcription import SpeechServing

v1_router = APIRouter()
websocket_router = APIRouter()


get_speech_serving = app_state_getter("speech_serving", SpeechServing)


@v1_router.post("/v1/audio/transcriptions")
async def create_transcription(raw_request: Request,
                               serving: SpeechServing = Depends(get_speech_serving)) -> Response:
    return await serving.create(raw_request, "transcribe")


@v1_router.post("/v1/audio/translations")
async def create_translation(raw_request: Request,
                             serving: SpeechServing = Depends(get_speech_serving)) -> Response:
    return await serving.create(raw_request, "translate")


@websocket_router.websocket("/v1/realtime")
async def realtime(websocket: WebSocket) -> None:
    await RealtimeSession(websocket.app.state.frontend, websocket).run()
