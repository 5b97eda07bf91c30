"""`structured_outputs` (vLLM) and `response_format` (OpenAI) -> one `StructuredOutputSpec`, compiled here so a bad
spec is a 400 naming the field before anything reaches the engine.

vLLM's object takes exactly one of `json` (a schema object or its JSON text), `regex`, `choice` (list of strings),
`grammar` (Lark, or GBNF/EBNF with `::=`), `structural_tag` (object or JSON text) and `json_object: true`, plus the
JSON options `disable_any_whitespace`, `whitespace_pattern` and `disable_additional_properties`. OpenAI's
`response_format` is {"type": "text" | "json_object" | "json_schema" (with {"name", "schema", "strict"}) |
"structural_tag"}. Both may be given only when they ask for the same thing.
"""
from __future__ import annotations

import json
import logging
from typing import Any

from engine_core.protocol import StructuredOutputSpec
from engine_core.structured_output import check_spec
from frontend.errors import BadRequestError
from frontend.generate.protocol import SamplingRequest

logger = logging.getLogger("conveyor.frontend")

_KIND_FIELDS = ("json", "regex", "choice", "grammar", "structural_tag", "json_object")
_OPTION_FIELDS = ("disable_any_whitespace", "whitespace_pattern", "disable_additional_properties")
# Accepted and ignored: vLLM's backend selection and fallback switches (Conveyor has one backend, llguidance).
_IGNORED_FIELDS = ("disable_fallback", "backend", "_backend", "_backend_was_auto")


def structured_output_spec(request: SamplingRequest) -> StructuredOutputSpec | None:
    """The request's constraint (None without one); raises `BadRequestError` naming the offending field."""
    from_vllm = _from_structured_outputs(request.structured_outputs)
    from_openai = _from_response_format(request.response_format)
    if from_vllm is not None and from_openai is not None and from_vllm[0] != from_openai[0]:
        raise BadRequestError("response_format and structured_outputs ask for different constraints; give one",
                              param="response_format")
    chosen = from_vllm or from_openai
    if chosen is None:
        return None
    spec, param = chosen
    error = check_spec(spec)
    if error is not None:
        raise BadRequestError(f"invalid value for '{param}': {error}", param=param)
    return spec


def _from_structured_outputs(value: dict[str, Any] | None) -> tuple[StructuredOutputSpec, str] | None:
    if not value:
        return None
    unknown = sorted(set(value) - set(_KIND_FIELDS) - set(_OPTION_FIELDS) - set(_IGNORED_FIELDS))
    if unknown:
        logger.warning("structured_outputs: ignoring unknown field(s) %s", unknown)
    given = [name for name in _KIND_FIELDS
             if value.get(name) is not None and not (name == "json_object" and value[name] is False)]
    if len(given) > 1:
        raise BadRequestError(f"structured_outputs takes exactly one of {', '.join(_KIND_FIELDS)}; got "
                              + " and ".join(f"'structured_outputs.{name}'" for name in given),
                              param=f"structured_outputs.{given[1]}")
    if not given:
        return None  # options alone constrain nothing (vLLM does the same)
    kind = given[0]
    param = f"structured_outputs.{kind}"
    raw = value[kind]
    options = _json_options(value)
    if kind == "json":
        return StructuredOutputSpec("json", _schema_text(raw, param, options)), param
    if kind == "json_object":
        if raw is not True:
            raise BadRequestError(f"invalid value for '{param}': expected true", param=param)
        if options:
            return StructuredOutputSpec("json", _schema_text({"type": "object"}, param, options)), param
        return StructuredOutputSpec("json_object"), param
    if kind in ("regex", "grammar"):
        if not isinstance(raw, str) or not raw:
            raise BadRequestError(f"invalid value for '{param}': expected a non-empty string", param=param)
        return StructuredOutputSpec(kind, raw), param
    if kind == "choice":
        if not isinstance(raw, list) or not raw or not all(isinstance(item, str) for item in raw):
            raise BadRequestError(f"invalid value for '{param}': expected a non-empty list of strings", param=param)
        return StructuredOutputSpec("choice", json.dumps(raw)), param
    return StructuredOutputSpec("structural_tag", _object_text(raw, param)), param


def _from_response_format(value: dict[str, Any] | None) -> tuple[StructuredOutputSpec, str] | None:
    if not value:
        return None
    kind = value.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutputSpec("json_object"), "response_format"
    if kind == "json_schema":
        json_schema = value.get("json_schema")
        if not isinstance(json_schema, dict):
            raise BadRequestError("'response_format.json_schema' (an object) is required with type json_schema",
                                  param="response_format.json_schema")
        # "schema" is OpenAI's key; vLLM also reads the pydantic alias "json_schema".
        schema = json_schema.get("schema", json_schema.get("json_schema"))
        param = "response_format.json_schema.schema"
        if schema is None:
            raise BadRequestError(f"'{param}' (a JSON schema object) is required", param=param)
        return StructuredOutputSpec("json", _schema_text(schema, param, {})), param
    if kind == "structural_tag":
        return StructuredOutputSpec("structural_tag", json.dumps(value)), "response_format"
    raise BadRequestError(f"invalid value for 'response_format.type': {kind!r} is not one of 'text', "
                          "'json_object', 'json_schema', 'structural_tag'", param="response_format.type")


def _json_options(value: dict[str, Any]) -> dict[str, Any]:
    """vLLM's JSON switches as llguidance compile options (they travel inside the schema as "x-guidance")."""
    options: dict[str, Any] = {}
    pattern = value.get("whitespace_pattern")
    if pattern is not None:
        if not isinstance(pattern, str):
            raise BadRequestError("invalid value for 'structured_outputs.whitespace_pattern': expected a string",
                                  param="structured_outputs.whitespace_pattern")
        options["whitespace_pattern"] = pattern
    elif value.get("disable_any_whitespace"):
        options["whitespace_pattern"] = ""  # compact JSON: no whitespace between tokens
    if value.get("disable_additional_properties"):
        options["disable_additional_properties"] = True
    return options


def _schema_text(raw: Any, param: str, options: dict[str, Any]) -> str:
    """A JSON schema (object, boolean or JSON text) as JSON text, with `options` applied."""
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except ValueError as exc:
            raise BadRequestError(f"invalid value for '{param}': not valid JSON ({exc})", param=param) from None
    if isinstance(raw, bool):
        raw = {} if raw else {"not": {}}
    if not isinstance(raw, dict):
        raise BadRequestError(f"invalid value for '{param}': a JSON schema must be an object", param=param)
    if options.pop("disable_additional_properties", False):
        raw = _close_objects(raw)
    if options:
        raw = {**raw, "x-guidance": {**raw.get("x-guidance", {}), **options}}
    return json.dumps(raw)


_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SCHEMA_LISTS = ("anyOf", "allOf", "oneOf", "prefixItems")
_SCHEMAS = ("items", "additionalItems", "additionalProperties", "not", "if", "then", "else", "contains",
            "propertyNames", "unevaluatedProperties", "unevaluatedItems")


def _close_objects(schema: Any) -> Any:
    """`additionalProperties: false` on every object schema that does not say otherwise (vLLM's
    disable_additional_properties)."""
    if not isinstance(schema, dict):
        return schema
    closed = dict(schema)
    for key in _SCHEMA_MAPS:
        if isinstance(closed.get(key), dict):
            closed[key] = {name: _close_objects(sub) for name, sub in closed[key].items()}
    for key in _SCHEMA_LISTS:
        if isinstance(closed.get(key), list):
            closed[key] = [_close_objects(sub) for sub in closed[key]]
    for key in _SCHEMAS:
        if key in closed:
            closed[key] = _close_objects(closed[key])
    if (closed.get("type") == "object" or "properties" in closed) and "additionalProperties" not in closed:
        closed["additionalProperties"] = False
    return closed


def _object_text(raw: Any, param: str) -> str:
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except ValueError as exc:
            raise BadRequestError(f"invalid value for '{param}': not valid JSON ({exc})", param=param) from None
    if not isinstance(raw, dict):
        raise BadRequestError(f"invalid value for '{param}': expected an object", param=param)
    return json.dumps(raw)
