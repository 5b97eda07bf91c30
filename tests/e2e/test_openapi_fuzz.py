"""Property-based conformance: schemathesis drives the server's own /openapi.json (completions, chat, Responses,
tokenize, embeddings, score, rerank and the rest) with generated requests, valid and not, on the shared tiny Llama:
no 5xx, no status the document does not list, the declared content types, and no hang (generation is bounded
by capping max_tokens-like fields in the schema the generator reads; every call has a timeout)."""
from __future__ import annotations

from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import content_type_conformance, status_code_conformance

from tests.server_harness import ConveyorServer

MAX_EXAMPLES = 12  # per operation: ~20 operations, a few seconds each on the tiny model
# Fields whose size is work: capped so a generated request finishes fast (values past the cap stay tested by the
# negative cases schemathesis derives from the bounds).
_CAPS = {"max_tokens": 4, "max_completion_tokens": 4, "max_output_tokens": 4, "n": 2, "best_of": 2, "min_tokens": 2,
         "top_logprobs": 3, "logprobs": 3, "prompt_logprobs": 2, "beam_width": 2}


def _cap(node: Any) -> None:
    """Give every integer schema of a capped field a maximum (in place, through anyOf/oneOf/allOf)."""
    if isinstance(node, dict):
        for name, schema in node.get("properties", {}).items():
            if name in _CAPS:
                _bound(schema, _CAPS[name])
        for value in node.values():
            _cap(value)
    elif isinstance(node, list):
        for value in node:
            _cap(value)


def _bound(schema: Any, maximum: int) -> None:
    if isinstance(schema, dict):
        if schema.get("type") == "integer":
            schema["maximum"] = min(schema.get("maximum", maximum), maximum)
        for key in ("anyOf", "oneOf", "allOf"):
            for option in schema.get(key, []):
                _bound(option, maximum)


@pytest.fixture(scope="module")
def api_schema(llama_server: ConveyorServer) -> Any:
    document = httpx.get(f"{llama_server.base_url}/openapi.json", timeout=30).json()
    _cap(document)
    schema = schemathesis.openapi.from_dict(document)
    schema.config.update(base_url=llama_server.base_url)
    return schema


def _operations(api_schema: Any) -> list[Any]:
    return [result.ok() for result in api_schema.get_all_operations()]


def test_the_api_answers_as_its_document_says(api_schema: Any) -> None:
    """Each documented operation, generated cases in turn (pytest 9 and schemathesis' own pytest integration do
    not get along, so hypothesis drives each operation's strategy here)."""
    operations = _operations(api_schema)
    assert len(operations) >= 15, [operation.label for operation in operations]
    for operation in operations:
        @settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy())
        def check(case: schemathesis.Case) -> None:
            case.call_and_validate(timeout=60, checks=[not_a_server_error, status_code_conformance,
                                                        content_type_conformance])

        check()
