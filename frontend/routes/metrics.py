"""GET /metrics in the Prometheus text format."""
from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST

from frontend.dependencies import get_state
from frontend.state import FrontendState

router = APIRouter()


@router.get("/metrics")
async def metrics(state: FrontendState = Depends(get_state)) -> Response:
    return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)
