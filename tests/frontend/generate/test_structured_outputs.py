"""`structured_outputs` / `response_format` -> StructuredOutputSpec, and the 400s (with `param`) for contradictory
or uncompilable specs. Pure functions: no server."""
from __future__ import annotations

import json
from typing import Any

import pytest

from engine_core.protocol import StructuredOutputSpec
from engine_core.structured_output import check_spec
from frontend.errors import BadRequestError
from frontend.generate.protocol import ChatCompletionRequest, CompletionRequest
from frontend.generate.structured_outputs import structured_output_spec

SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}


def spec_of(**fields: Any) -> StructuredOutputSpec | None:
    return structured_output_spec(CompletionRequest(prompt="x", **fields))


def error_of(**fields: Any) -> BadRequestError:
    with pytest.raises(BadRequestError) as info:
        spec_of(**fields)
    return info.value


def test_no_constraint() -> None:
    assert spec_of() is None
    assert spec_of(response_format={"type": "text"}) is None
    assert spec_of(structured_outputs={"json_object": False}) is None
    assert spec_of(structured_outputs={"disable_any_whitespace": True}) is None  # options alone constrain nothing


@pytest.mark.parametrize("fields,expected", [
    ({"structured_outputs": {"json": SCHEMA}}, StructuredOutputSpec("json", json.dumps(SCHEMA))),
    ({"structured_outputs": {"json": json.dumps(SCHEMA)}}, StructuredOutputSpec("json", json.dumps(SCHEMA))),
    ({"structured_outputs": {"json_object": True}}, StructuredOutputSpec("json_object")),
    ({"structured_outputs": {"regex": r"\d+"}}, StructuredOutputSpec("regex", r"\d+")),
    ({"structured_outputs": {"choice": ["a", "b c"]}}, StructuredOutputSpec("choice", '["a", "b c"]')),
    ({"structured_outputs": {"grammar": 'root ::= "a" | "b"'}}, StructuredOutputSpec("grammar", 'root ::= "a" | "b"')),
    ({"response_format": {"type": "json_object"}}, StructuredOutputSpec("json_object")),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": SCHEMA, "strict": True}}},
     StructuredOutputSpec("json", json.dumps(SCHEMA))),
    # The same constraint twice is not a contradiction.
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": SCHEMA}},
      "structured_outputs": {"json": SCHEMA}}, StructuredOutputSpec("json", json.dumps(SCHEMA))),
])
def test_mapping(fields: dict[str, Any], expected: StructuredOutputSpec) -> None:
    assert spec_of(**fields) == expected


def test_chat_requests_map_the_same_way() -> None:
    request = ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}],
                                    response_format={"type": "json_schema", "json_schema": {"schema": SCHEMA}})
    assert structured_output_spec(request) == StructuredOutputSpec("json", json.dumps(SCHEMA))


def test_structural_tag() -> None:
    tag = {"type": "structural_tag", "triggers": ["<f="],
           "structures": [{"begin": "<f=x>", "schema": {"type": "object"}, "end": "</f>"}]}
    spec = spec_of(structured_outputs={"structural_tag": json.dumps(tag)})
    assert spec is not None and spec.kind == "structural_tag" and json.loads(spec.spec) == tag
    assert spec_of(response_format=tag) == spec
    assert error_of(structured_outputs={"structural_tag": {**tag, "triggers": ["<g="]}}).param == \
        "structured_outputs.structural_tag"


def test_json_options_travel_inside_the_schema() -> None:
    spec = spec_of(structured_outputs={"json": SCHEMA, "disable_any_whitespace": True})
    assert spec is not None and json.loads(spec.spec)["x-guidance"] == {"whitespace_pattern": ""}
    spec = spec_of(structured_outputs={"json_object": True, "whitespace_pattern": "[ ]?"})
    assert spec is not None and spec.kind == "json"
    assert json.loads(spec.spec) == {"type": "object", "x-guidance": {"whitespace_pattern": "[ ]?"}}


def test_disable_additional_properties_closes_every_object() -> None:
    schema = {"type": "object", "properties": {
        "properties": {"type": "object", "properties": {"x": {"type": "string"}}},  # a property named "properties"
        "list": {"type": "array", "items": {"type": "object"}},
        "open": {"type": "object", "additionalProperties": True}}}
    spec = spec_of(structured_outputs={"json": schema, "disable_additional_properties": True})
    assert spec is not None
    closed = json.loads(spec.spec)
    assert closed["additionalProperties"] is False
    assert set(closed["properties"]) == {"properties", "list", "open"}
    assert closed["properties"]["properties"]["additionalProperties"] is False
    assert closed["properties"]["list"]["items"]["additionalProperties"] is False
    assert closed["properties"]["open"]["additionalProperties"] is True


@pytest.mark.parametrize("fields,param", [
    ({"structured_outputs": {"json": {"type": "objekt"}}}, "structured_outputs.json"),
    ({"structured_outputs": {"json": "{not json"}}, "structured_outputs.json"),
    ({"structured_outputs": {"json": [1, 2]}}, "structured_outputs.json"),
    ({"structured_outputs": {"json": {"type": "string", "minLength": 3, "maxLength": 1}}}, "structured_outputs.json"),
    ({"structured_outputs": {"regex": "a(b"}}, "structured_outputs.regex"),
    ({"structured_outputs": {"regex": ""}}, "structured_outputs.regex"),
    ({"structured_outputs": {"grammar": "start: undefined_rule"}}, "structured_outputs.grammar"),
    ({"structured_outputs": {"grammar": "root ::= ("}}, "structured_outputs.grammar"),
    ({"structured_outputs": {"choice": []}}, "structured_outputs.choice"),
    ({"structured_outputs": {"choice": ["a", 1]}}, "structured_outputs.choice"),
    ({"structured_outputs": {"json_object": "yes"}}, "structured_outputs.json_object"),
    ({"structured_outputs": {"json": SCHEMA, "regex": "a"}}, "structured_outputs.regex"),
    ({"structured_outputs": {"choice": ["a"], "json_object": True}}, "structured_outputs.json_object"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "n"}}}, "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": 3}}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}}, "response_format"),
])
def test_errors_name_the_field(fields: dict[str, Any], param: str) -> None:
    error = error_of(**fields)
    assert error.status_code == 400 and error.param == param, error.message
    assert param in error.message or error.param == "response_format"


def test_compiled_specs_are_cached() -> None:
    check_spec.cache_clear()
    for _ in range(5):
        spec_of(structured_outputs={"regex": "[a-z]+"})
    assert check_spec.cache_info().hits == 4
