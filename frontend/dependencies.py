"""FastAPI dependency getters: routers reach process state through these, never through module globals."""
from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from fastapi import Depends, Request

from frontend.engine_client import EngineClient
from frontend.state import FrontendState


def get_state(request: Request) -> FrontendState:
    state: FrontendState = request.app.state.frontend
    return state


def get_engine_client(state: FrontendState = Depends(get_state)) -> EngineClient:
    return state.engine


_Serving = TypeVar("_Serving")


def app_state_getter(name: str, kind: type[_Serving]) -> Callable[[Request], _Serving]:
    """A dependency returning `app.state.<name>` (set by create_app), checked to be a `kind`."""
    def get(request: Request) -> _Serving:
        value = getattr(request.app.state, name)
        assert isinstance(value, kind), (name, type(value))
        return value

    return get
