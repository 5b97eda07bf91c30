"""Pooling endpoints: /v1/embeddings, /pooling, /classify, /score (+ /v1/score), /rerank (+ /v1/rerank: Jina's
shape; /v2/rerank: Cohere's). Thin; the work is in pooling/embedding.py, pooling/classification.py and
pooling/score.py. `v1_router` holds the /v1 and /v2 routes (behind --api-key), `router` the others.
"""
from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Body, Depends, Request
from fastapi.responses import Response

from frontend.dependencies import app_state_getter
from frontend.pooling.classification import ClassificationServing
from frontend.pooling.embedding import EmbeddingServing
from frontend.pooling.protocol import (ClassificationChatRequest, ClassificationCompletionRequest,
                                       EmbeddingChatRequest, EmbeddingCompletionRequest, PoolingChatRequest,
                                       PoolingCompletionRequest, RerankRequest, ScoreRequest, parse_pooling_request)
from frontend.pooling.score import ScoreServing

v1_router = APIRouter()
router = APIRouter()


get_embedding_serving = app_state_getter("embedding_serving", EmbeddingServing)
get_classification_serving = app_state_getter("classification_serving", ClassificationServing)
get_score_serving = app_state_getter("score_serving", ScoreServing)


@v1_router.post("/v1/embeddings")
async def create_embedding(raw_request: Request, body: dict[str, Any] = Body(...),
                           serving: EmbeddingServing = Depends(get_embedding_serving)) -> Response:
    request = parse_pooling_request(body, EmbeddingCompletionRequest, EmbeddingChatRequest)
    return await serving.create_embedding(request, raw_request)


@router.post("/pooling")
async def create_pooling(raw_request: Request, body: dict[str, Any] = Body(...),
                         serving: EmbeddingServing = Depends(get_embedding_serving)) -> Response:
    request = parse_pooling_request(body, PoolingCompletionRequest, PoolingChatRequest)
    return await serving.create_pooling(request, raw_request)


@router.post("/classify")
async def create_classification(raw_request: Request, body: dict[str, Any] = Body(...),
                                serving: ClassificationServing = Depends(get_classification_serving)) -> Response:
    request = parse_pooling_request(body, ClassificationCompletionRequest, ClassificationChatRequest)
    return await serving.create(request, raw_request)


@router.post("/score")
@v1_router.post("/v1/score")
async def create_score(body: ScoreRequest, raw_request: Request,
                       serving: ScoreServing = Depends(get_score_serving)) -> Response:
    return await serving.create_score(body, raw_request)


@router.post("/rerank")
@v1_router.post("/v1/rerank")
async def rerank(body: RerankRequest, raw_request: Request,
                 serving: ScoreServing = Depends(get_score_serving)) -> Response:
    return await serving.rerank(body, raw_request, "jina")


@v1_router.post("/v2/rerank")
async def rerank_v2(body: RerankRequest, raw_request: Request,
                    serving: ScoreServing = Depends(get_score_serving)) -> Response:
    return await serving.rerank(body, raw_request, "cohere")
