"""The app's /openapi.json says what it really answers: every route that runs the model documents OpenAI's error
shape for the statuses it can give (400, 401, 404, 413, 500, 503), and /health its empty 200 and its 503."""
from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

_ERROR_SCHEMA: dict[str, Any] = {
    "type": "object", "required": ["error"],
    "properties": {"error": {
        "type": "object", "required": ["message", "type", "param", "code"],
        "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                       "param": {"anyOf": [{"type": "string"}, {"type": "null"}]},
                       "code": {"anyOf": [{"type": "string"}, {"type": "integer"}, {"type": "null"}]}}}}}
_ERRORS = {"400": "Invalid request (the message names the parameter)",
           "401": "Missing or wrong API key (--api-key)",
           "404": "Unknown model or object",
           "413": "Request body over --max-request-body-mb",
           "500": "Internal error",
           "503": "Engine dead, server draining, or waiting queue full (--max-waiting-requests; Retry-After)"}
_OPEN = {"/health", "/version", "/metrics", "/openapi.json", "/ping", "/load"}
# With "stream": true these answer server-sent events (data: <JSON chunk> lines, then data: [DONE]).
_STREAMING = {"/v1/completions", "/v1/chat/completions", "/v1/responses", "/v1/audio/transcriptions",
              "/v1/audio/translations"}


def document_errors(app: FastAPI) -> None:
    """Replace `app.openapi` with a generator that adds the error responses (computed once, like FastAPI's)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, openapi_version=app.openapi_version,
                                 description=app.description, routes=app.routes, servers=app.servers)
            schema.setdefault("components", {}).setdefault("schemas", {})["ErrorResponse"] = _ERROR_SCHEMA
            error = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}
            for path, operations in schema.get("paths", {}).items():
                for operation in operations.values():
                    responses = operation.setdefault("responses", {})
                    responses.pop("422", None)  # FastAPI's default; validation errors here are 400s
                    if path == "/metrics":
                        responses["200"] = {"description": "Prometheus' text format",
                                            "content": {"text/plain": {"schema": {"type": "string"}}}}
                    elif path == "/health":
                        responses["200"] = {"description": "The engine answers (empty body)"}
                        responses["503"] = {"description": "Engine dead or server draining", **error}
                    elif path not in _OPEN:
                        if path in _STREAMING:
                            content = responses.setdefault("200", {"description": "OK"}).setdefault("content", {})
                            content["text/event-stream"] = {"schema": {"type": "string"}}
                        for status, description in _ERRORS.items():
                            responses.setdefault(status, {"description": description, **error})
            for unused in ("HTTPValidationError", "ValidationError"):
                schema["components"]["schemas"].pop(unused, None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
