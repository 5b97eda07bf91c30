"""POST /v1/embeddings (OpenAI's shape) and POST /pooling (vLLM's raw pooled output for any task the model serves).

Response `data` items are in input order; each holds the values as a float list or as base64 (see
pooling/encoding.py).
"""
from __future__ import annotations

import time
from typing import Awaitable, Optional

from fastapi.responses import JSONResponse, Response
from starlette.requests import Request

from engine_core.config import PoolerConfig
from engine_core.protocol import PoolingParams
from frontend.errors import BadRequestError
from frontend.pooling.encoding import encode_values
from frontend.pooling.protocol import EmbeddingRequest, PoolingRequest
from frontend.pooling.serving import (PooledResult, PoolingPrompt, pooling_request_id, request_prompts, require_pooler,
                                      require_task, run_pooling, usage)
from frontend.state import FrontendState
from frontend.streaming import ClientDisconnected, unless_disconnected


def check_dimensions(pooler: PoolerConfig, dimensions: Optional[int], model_name: str) -> Optional[int]:
    """The `dimensions` to send (None: the full embedding); 400 unless the model is matryoshka-trained for it."""
    if dimensions is None or dimensions == pooler.embedding_size:
        return None
    if not pooler.is_matryoshka:
        raise BadRequestError(f"Model {model_name!r} does not support matryoshka representation: its embeddings "
                              f"have {pooler.embedding_size} dimensions, and changing that would give poor results",
                              param="dimensions")
    if dimensions > pooler.embedding_size:
        raise BadRequestError(f"dimensions ({dimensions}) is larger than the embedding size "
                              f"({pooler.embedding_size})", param="dimensions")
    if pooler.matryoshka_dimensions and dimensions not in pooler.matryoshka_dimensions:
        raise BadRequestError(f"Model {model_name!r} only supports the matryoshka dimensions "
                              f"{list(pooler.matryoshka_dimensions)}", param="dimensions")
    return dimensions


async def collect(raw_request: Request, work: Awaitable[list[PooledResult]]) -> list[PooledResult] | Response:
    """The results, or a 499 response when the client left first (its engine requests are aborted)."""
    try:
        return await unless_disconnected(raw_request, work)
    except ClientDisconnected:
        return Response(status_code=499)


class EmbeddingServing:
    def __init__(self, frontend: FrontendState) -> None:
        self.frontend = frontend

    async def create_embedding(self, request: EmbeddingRequest, raw_request: Request) -> Response:
        frontend = self.frontend
        frontend.check_model(request.model)
        frontend.check_engine_alive()
        pooler = require_task(frontend, "embed", "/v1/embeddings")
        name = frontend.model_config.served_model_name
        params = PoolingParams(task="embed", normalize=request.embed_normalize,
                               dimensions=check_dimensions(pooler, request.dimensions, name))
        prompts = await request_prompts(frontend, request, "/v1/embeddings")
        request_id = pooling_request_id("embd", request, raw_request.headers)
        return await self._respond(request, raw_request, request_id, prompts, params, ("embedding", "embedding"))

    async def create_pooling(self, request: PoolingRequest, raw_request: Request) -> Response:
        frontend = self.frontend
        frontend.check_model(request.model)
        frontend.check_engine_alive()
        params = self._pooling_params(request, require_pooler(frontend, "/pooling"))
        prompts = await request_prompts(frontend, request, "/pooling")
        request_id = pooling_request_id("pool", request, raw_request.headers)
        return await self._respond(request, raw_request, request_id, prompts, params, ("pooling", "data"))

    async def _respond(self, request: EmbeddingRequest | PoolingRequest, raw_request: Request, request_id: str,
                       prompts: list[PoolingPrompt], params: PoolingParams, item: tuple[str, str]) -> Response:
        """Run the prompts; a list of `{"index", "object": item[0], item[1]: values}` in the requested encoding."""
        frontend = self.frontend
        results = await collect(raw_request, run_pooling(frontend, request_id, request, prompts, params))
        if isinstance(results, Response):
            return results
        object_name, field = item
        data = [{"index": index, "object": object_name,
                 field: encode_values(result.values, request.encoding_format, request.embed_dtype,
                                      request.endianness)}
                for index, result in enumerate(results)]
        return JSONResponse({"id": request_id, "object": "list", "created": int(time.time()),
                             "model": frontend.model_config.served_model_name, "data": data,
                             "usage": usage(results)})

    def _pooling_params(self, request: PoolingRequest, pooler: PoolerConfig) -> PoolingParams:
        """vLLM's default task: per-token embeddings for an embedding model, per-token class scores otherwise."""
        task = request.task or ("token_embed" if "token_embed" in pooler.tasks else "token_classify")
        require_task(self.frontend, task, "/pooling")
        if request.dimensions is not None and task != "embed":
            raise BadRequestError(f"dimensions applies to the 'embed' task only, not {task!r}", param="dimensions")
        dimensions = check_dimensions(pooler, request.dimensions, self.frontend.model_config.served_model_name)
        if task in ("embed", "token_embed"):
            return PoolingParams(task=task, normalize=request.embed_normalize, dimensions=dimensions)
        return PoolingParams(task=task, use_activation=request.use_activation)
