"""The FastAPI application of one frontend process.

`create_app` builds the process state (tokenizer, chat template, sampling defaults, metrics) at once, so a bad
model folder fails at start-up; the lifespan starts and closes the engine client.
"""
from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from typing import AsyncIterator

from fastapi import FastAPI

from engine_core.config import FrontendConfig, ModelConfig
from frontend.engine_client import EngineClient
from frontend.errors import install_error_handlers
from frontend.generate import router as generate_router
from frontend.generate.chat import ChatServing
from frontend.generate.completion import CompletionServing
from frontend.generate.responses import router as responses_router
from frontend.generate.responses.serving import ResponsesServing
from frontend.http_middleware import install_middleware
from frontend.openapi_doc import document_errors
from frontend.pooling import router as pooling_router
from frontend.pooling.classification import ClassificationServing
from frontend.pooling.embedding import EmbeddingServing
from frontend.pooling.score import ScoreServing
from frontend.routes import metrics, models, tokenize
from frontend.speech import router as speech_router
from frontend.speech.transcription import SpeechServing
from frontend.state import FrontendState

logger = logging.getLogger("conveyor.frontend")


def create_app(model_config: ModelConfig, frontend_config: FrontendConfig, engine_client: EngineClient) -> FastAPI:
    """An app serving `model_config` through `engine_client` (started and closed by the app's lifespan)."""
    state = FrontendState.build(model_config, frontend_config, engine_client)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await engine_client.start()
        try:
            yield
        finally:
            await engine_client.close()

    # root_path (--root-path) as vLLM sets it: URLs work with and without the prefix, /openapi.json names it.
    app = FastAPI(title="Conveyor", lifespan=lifespan, docs_url=None, redoc_url=None,
                  root_path=frontend_config.root_path or "")
    app.state.frontend = state
    app.state.completion_serving = CompletionServing(state)
    app.state.chat_serving = ChatServing(state)
    app.state.responses_serving = ResponsesServing(state)  # reads VLLM_ENABLE_RESPONSES_API_STORE
    app.state.embedding_serving = EmbeddingServing(state)
    app.state.classification_serving = ClassificationServing(state)
    app.state.score_serving = ScoreServing(state)
    app.state.speech_serving = SpeechServing(state)
    install_error_handlers(app)
    # No per-router auth: the API-key middleware guards every route but frontend/auth.py's OPEN_PATHS.
    app.include_router(models.v1_router)
    app.include_router(generate_router.v1_router)
    app.include_router(responses_router.v1_router)
    app.include_router(pooling_router.v1_router)  # also /v2/rerank
    app.include_router(speech_router.v1_router)
    app.include_router(speech_router.websocket_router)
    app.include_router(models.router)
    app.include_router(tokenize.router)
    app.include_router(pooling_router.router)
    app.include_router(metrics.router)
    install_middleware(app, frontend_config, state.api_keys)
    document_errors(app)
    if state.api_keys.required:
        logger.info("API key required on every route but /health, /version, /openapi.json%s",
                    "" if frontend_config.metrics_require_api_key else " and /metrics")
    return app
