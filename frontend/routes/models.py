"""GET /v1/models, /health, /version."""
from __future__ import annotations

from importlib import metadata
from typing import Any

from fastapi import APIRouter, Depends
from fastapi.responses import Response

from frontend.dependencies import get_state
from frontend.state import FrontendState

v1_router = APIRouter()
router = APIRouter()


@v1_router.get("/v1/models")
async def list_models(state: FrontendState = Depends(get_state)) -> dict[str, Any]:
    return {"object": "list", "data": [_model_card(state)]}


@v1_router.get("/v1/models/{model_id:path}")
async def retrieve_model(model_id: str, state: FrontendState = Depends(get_state)) -> dict[str, Any]:
    state.check_model(model_id)
    return _model_card(state)


def _model_card(state: FrontendState) -> dict[str, Any]:
    config = state.model_config
    card = {"id": config.served_model_name, "object": "model", "created": state.created, "owned_by": "conveyor",
            "root": config.model, "parent": None, "max_model_len": config.max_model_len,
            "permission": [{"id": f"modelperm-{config.served_model_name}", "object": "model_permission",
                            "created": state.created, "allow_create_engine": False, "allow_sampling": True,
                            "allow_logprobs": True, "allow_search_indices": False, "allow_view": True,
                            "allow_fine_tuning": False, "organization": "*", "group": None,
                            "is_blocking": False}]}
    return card


@router.get("/health")
async def health(state: FrontendState = Depends(get_state)) -> Response:
    """200 while the engine answers; 503 (OpenAI error shape) once it is dead."""
    state.check_engine_alive()
    return Response(status_code=200)


@router.get("/version")
async def version() -> dict[str, str]:
    try:
        return {"version": metadata.version("conveyor")}
    except metadata.PackageNotFoundError:
        return {"version": "0.1.0"}
