"""POST /v1/completions and /v1/chat/completions: thin; the work is in completion.py and chat.py."""
from __future__ import annotations

from typing import TypeVar

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from frontend.dependencies import app_state_getter, get_state
from frontend.generate.chat import ChatServing
from frontend.generate.completion import CompletionServing
from frontend.generate.protocol import ChatCompletionRequest, CompletionRequest, SamplingRequest, StreamOptions
from frontend.state import FrontendState

v1_router = APIRouter()

get_completion_serving = app_state_getter("completion_serving", CompletionServing)
get_chat_serving = app_state_getter("chat_serving", ChatServing)


@v1_router.post("/v1/completions")
async def create_completion(body: CompletionRequest, raw_request: Request,
                            serving: CompletionServing = Depends(get_completion_serving),
                            state: FrontendState = Depends(get_state)) -> Response:
    return await serving.create(_force_usage(body, state), raw_request)


@v1_router.post("/v1/chat/completions")
async def create_chat_completion(body: ChatCompletionRequest, raw_request: Request,
                                 serving: ChatServing = Depends(get_chat_serving),
                                 state: FrontendState = Depends(get_state)) -> Response:
    return await serving.create(_force_usage(body, state), raw_request)


_Request = TypeVar("_Request", bound=SamplingRequest)


def _force_usage(body: _Request, state: FrontendState) -> _Request:
    """--enable-force-include-usage: a stream ends with its usage chunk as if stream_options asked for it."""
    if not (state.frontend_config.enable_force_include_usage and body.stream) or body.include_usage:
        return body
    continuous = bool(body.stream_options and body.stream_options.continuous_usage_stats)
    body.stream_options = StreamOptions(include_usage=True, continuous_usage_stats=continuous)
    return body
