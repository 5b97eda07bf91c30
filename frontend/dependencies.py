"""FastAPI dependency getters: routers reach process state through these, never through module globals."""
from __future__ import annotations

import secrets

from fastapi import Depends, Request

from frontend.engine_client import EngineClient
from frontend.errors import AuthenticationError
from frontend.serving_chat import ChatServing
from frontend.serving_completion import CompletionServing
from frontend.state import FrontendState


def get_state(request: Request) -> FrontendState:
    state: FrontendState = request.app.state.frontend
    return state


def get_engine_client(state: FrontendState = Depends(get_state)) -> EngineClient:
    return state.engine


def get_completion_serving(request: Request) -> CompletionServing:
    serving: CompletionServing = request.app.state.completion_serving
    return serving


def get_chat_serving(request: Request) -> ChatServing:
    serving: ChatServing = request.app.state.chat_serving
    return serving


def verify_api_key(request: Request, state: FrontendState = Depends(get_state)) -> None:
    """With --api-key (or VLLM_API_KEY), every /v1 and /v2 route needs `Authorization: Bearer KEY`."""
    if state.api_key is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), state.api_key.encode()):
        raise AuthenticationError("Incorrect or missing API key: send `Authorization: Bearer <key>`.",
                                  code="invalid_api_key")
