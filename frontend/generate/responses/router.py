"""OpenAI's Responses API: POST /v1/responses, GET / DELETE /v1/responses/{id}, POST /v1/responses/{id}/cancel.

Thin; the work is in generate/responses/serving.py. Stored responses live in the answering frontend process's memory
(only with VLLM_ENABLE_RESPONSES_API_STORE=1).
"""
from __future__ import annotations

from typing import Optional

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from frontend.dependencies import app_state_getter
from frontend.generate.responses.protocol import ResponsesRequest
from frontend.generate.responses.serving import ResponsesServing

v1_router = APIRouter()


get_responses_serving = app_state_getter("responses_serving", ResponsesServing)


@v1_router.post("/v1/responses")
async def create_response(body: ResponsesRequest, raw_request: Request,
                          serving: ResponsesServing = Depends(get_responses_serving)) -> Response:
    return await serving.create(body, raw_request)


@v1_router.get("/v1/responses/{response_id}")
async def retrieve_response(response_id: str, stream: bool = False, starting_after: Optional[int] = None,
                            serving: ResponsesServing = Depends(get_responses_serving)) -> Response:
    return await serving.retrieve(response_id, stream, starting_after)


@v1_router.post("/v1/responses/{response_id}/cancel")
async def cancel_response(response_id: str,
                          serving: ResponsesServing = Depends(get_responses_serving)) -> Response:
    return await serving.cancel(response_id)


@v1_router.delete("/v1/responses/{response_id}")
async def delete_response(response_id: str,
                          serving: ResponsesServing = Depends(get_responses_serving)) -> Response:
    return await serving.delete(response_id)
