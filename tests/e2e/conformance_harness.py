"""Shared pieces of the OpenAI-conformance tests (tests/e2e/test_conformance*.py): the prompts, schemas and tools
they send to the tiny Llama, and small readers of what comes back.

Outputs of the random tiny Llama are steered where a test needs a particular shape (a hermes tool call is forced
with the built-in `force_tokens` logits processor, see `forced`).
"""
from __future__ import annotations

from typing import Any

from tests.conformance_validation import Recorder
from tests.server_harness import ConveyorServer

MODEL = "tiny-llama"
PROMPT = "The quick brown fox jumps over the lazy dog because"
MESSAGES: list[Any] = [{"role": "user", "content": "Name three colors."}]
EOS = 2  # <|im_end|>, the tiny Llama's EOS (SmolLM2's tokenizer)
# Bounded schemas (enums, small integers): even random weights finish them well within max_tokens.
CITY_SCHEMA = {"type": "object", "additionalProperties": False, "required": ["city", "days"],
               "properties": {"city": {"type": "string", "enum": ["Paris", "Rome", "Oslo"]},
                              "days": {"type": "integer", "minimum": 1, "maximum": 7}}}
TOOLS: list[Any] = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                      "parameters": CITY_SCHEMA}},
    {"type": "function", "function": {"name": "get_time", "parameters": {
        "type": "object", "additionalProperties": False, "required": ["utc"],
        "properties": {"utc": {"type": "boolean"}}}}},
]
HERMES_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n</tool_call>'
HERMES_TIME = '<tool_call>\n{"name": "get_time", "arguments": {"utc": true}}\n</tool_call>'


def extra(obj: Any, name: str) -> Any:
    """A vLLM extra field of a parsed SDK object (present: the recorder already checked its type)."""
    assert obj.model_extra is not None and name in obj.model_extra, f"{name} missing"
    return obj.model_extra[name]


def token_ids(rec: Recorder, server: ConveyorServer, text: str) -> list[int]:
    with rec.http(server) as http:
        return list(http.post("/tokenize", json={"model": MODEL, "prompt": text,
                                                 "add_special_tokens": False}).json()["tokens"])


def names(chat: Any) -> list[str]:
    """The function names of a chat completion's first choice's tool calls."""
    return [call.function.name for call in chat.choices[0].message.tool_calls or []]


def forced(ids: list[int]) -> dict[str, Any]:
    """vllm_xargs making the output start with these tokens (the built-in force_tokens processor)."""
    return {"logits_processors": ["force_tokens"], "forced_token_ids": ids}
