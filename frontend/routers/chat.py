"""POST /v1/chat/completions: thin; the work is in serving_chat.py."""
from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from frontend.dependencies import get_chat_serving
from frontend.protocol import ChatCompletionRequest
from frontend.serving_chat import ChatServing

v1_router = APIRouter()


@v1_router.post("/v1/chat/completions")
async def create_chat_completion(body: ChatCompletionRequest, raw_request: Request,
                                 serving: ChatServing = Depends(get_chat_serving)) -> Response:
    return await serving.create(body, raw_request)
