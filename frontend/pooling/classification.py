"""POST /classify: one class-score vector per input, with the most likely label (vLLM's shape).

`probs` are the softmax (or sigmoid, for one label or a multi-label head) of the logits; with
`use_activation: false` the raw logits.
"""
from __future__ import annotations

import time

from fastapi.responses import JSONResponse, Response
from starlette.requests import Request

from engine_core.config import PoolerConfig
from engine_core.protocol import PoolingParams
from frontend.pooling.embedding import collect
from frontend.pooling.protocol import ClassificationRequest
from frontend.pooling.serving import pooling_request_id, request_prompts, require_task, run_pooling, usage
from frontend.state import FrontendState


def label_of(pooler: PoolerConfig, class_index: int) -> str:
    """config.json's id2label name, else Hugging Face's default `LABEL_i`."""
    return pooler.id2label.get(class_index, f"LABEL_{class_index}")


class ClassificationServing:
    def __init__(self, frontend: FrontendState) -> None:
        self.frontend = frontend

    async def create(self, request: ClassificationRequest, raw_request: Request) -> Response:
        frontend = self.frontend
        frontend.check_model(request.model)
        frontend.check_engine_alive()
        pooler = require_task(frontend, "classify", "/classify")
        prompts = await request_prompts(frontend, request, "/classify")
        request_id = pooling_request_id("classify", request, raw_request.headers)
        params = PoolingParams(task="classify", use_activation=request.use_activation)
        results = await collect(raw_request, run_pooling(frontend, request_id, request, prompts, params))
        if isinstance(results, Response):
            return results
        data = []
        for index, result in enumerate(results):
            probs = [float(value) for value in result.values.reshape(-1)]
            best = max(range(len(probs)), key=probs.__getitem__)
            data.append({"index": index, "label": label_of(pooler, best), "probs": probs,
                         "num_classes": len(probs)})
        return JSONResponse({"id": request_id, "object": "list", "created": int(time.time()),
                             "model": frontend.model_config.served_model_name, "data": data,
                             "usage": usage(results)})
