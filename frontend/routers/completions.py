"""POST /v1/completions: thin; the work is in serving_completion.py."""
from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from frontend.dependencies import get_completion_serving
from frontend.protocol import CompletionRequest
from frontend.serving_completion import CompletionServing

v1_router = APIRouter()


@v1_router.post("/v1/completions")
async def create_completion(body: CompletionRequest, raw_request: Request,
                            serving: CompletionServing = Depends(get_completion_serving)) -> Response:
    return await serving.create(body, raw_request)

