"""POST /v1/completions and /v1/chat/completions: thin; the work is in completion.py and chat.py."""
from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from frontend.dependencies import app_state_getter
from frontend.generate.chat import ChatServing
from frontend.generate.completion import CompletionServing
from frontend.generate.protocol import ChatCompletionRequest, CompletionRequest

v1_router = APIRouter()

get_completion_serving = app_state_getter("completion_serving", CompletionServing)
get_chat_serving = app_state_getter("chat_serving", ChatServing)


@v1_router.post("/v1/completions")
async def create_completion(body: CompletionRequest, raw_request: Request,
                            serving: CompletionServing = Depends(get_completion_serving)) -> Response:
    return await serving.create(body, raw_request)


@v1_router.post("/v1/chat/completions")
async def create_chat_completion(body: ChatCompletionRequest, raw_request: Request,
                                 serving: ChatServing = Depends(get_chat_serving)) -> Response:
    return await serving.create(body, raw_request)
