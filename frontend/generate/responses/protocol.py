"""The Responses API request (POST /v1/responses) and its translation into chat-template terms.

A Responses request becomes an internal `ChatCompletionRequest`: `instructions` a system message first, the
previous response's conversation (with `previous_response_id`), then `input` — a string (one user message) or a
list of items: messages (user, system, developer, assistant; text content), `function_call` items (assistant
`tool_calls`) and `function_call_output` items (`tool` messages). `reasoning` items are skipped (no reasoning
parser). Function tools become chat tools; `text.format` becomes chat's `response_format`.
"""
from __future__ import annotations

import json
import logging
import re
from typing import Any, Literal, Optional, Union

from pydantic import Field, model_validator

from frontend.errors import BadRequestError
from frontend.generate.protocol import ChatCompletionRequest
from frontend.protocol import OpenAIModel

logger = logging.getLogger("conveyor.frontend")

# Fields of the internal chat request that a Responses request sets itself (or that make no sense here); every
# other chat-request field (top_k, min_p, seed, stop, cache_salt, priority, ...) may come in the body as a vLLM
# extra and is passed through.
_OWN_FIELDS = frozenset({
    "model", "messages", "n", "stream", "stream_options", "temperature", "top_p", "user", "echo", "max_tokens",
    "max_completion_tokens", "logprobs", "top_logprobs", "tools", "tool_choice", "parallel_tool_calls",
    "response_format", "return_token_ids", "add_generation_prompt", "continue_final_message", "request_id",
})
_OUTPUT_LOGPROBS = "message.output_text.logprobs"
_MESSAGE_ROLES = {"user": "user", "system": "system", "developer": "system", "assistant": "assistant"}
_TEXT_PART_TYPES = {"input_text", "output_text", "text"}


def passthrough_fields() -> set[str]:
    """vLLM extras a Responses body may carry for the sampler (computed late: others add chat fields)."""
    return set(ChatCompletionRequest.model_fields) - _OWN_FIELDS


class ResponsesRequest(OpenAIModel):
    """POST /v1/responses. Unknown fields that the chat path knows (vLLM's sampling extras) pass through."""

    model: Optional[str] = None
    input: Union[str, list[dict[str, Any]], None] = None  # may be left out with previous_response_id
    instructions: Optional[str] = None
    max_output_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0.0)
    top_p: Optional[float] = Field(None, gt=0.0, le=1.0)
    stream: bool = False
    store: bool = True
    background: bool = False
    previous_response_id: Optional[str] = None
    metadata: Optional[dict[str, str]] = None
    user: Optional[str] = None
    tools: list[dict[str, Any]] = Field(default_factory=list)
    tool_choice: Union[Literal["none", "auto", "required"], dict[str, Any]] = "auto"
    parallel_tool_calls: bool = True
    max_tool_calls: Optional[int] = Field(None, ge=1)
    text: Optional[dict[str, Any]] = None
    include: Optional[list[str]] = None
    top_logprobs: Optional[int] = Field(None, ge=0, le=20)
    truncation: Optional[Literal["auto", "disabled"]] = None
    reasoning: Optional[dict[str, Any]] = None
    service_tier: Optional[str] = None
    prompt_cache_key: Optional[str] = None
    safety_identifier: Optional[str] = None
    stream_options: Optional[dict[str, Any]] = None
    request_id: Optional[str] = None  # vLLM: becomes the response id (prefixed "resp_" when it lacks it)

    @model_validator(mode="after")
    def _log_unknown_fields(self) -> ResponsesRequest:
        unknown = sorted(set(self.model_extra or {}) - passthrough_fields())
        if unknown:
            logger.warning("ResponsesRequest: ignoring unknown field(s) %s", unknown)
        return self

    @property
    def output_logprobs(self) -> int | None:
        """Top alternatives per output token when `include` asks for output logprobs, else None."""
        if self.include and _OUTPUT_LOGPROBS in self.include:
            return self.top_logprobs or 0
        return None

    def passthrough(self) -> dict[str, Any]:
        allowed = passthrough_fields()
        return {key: value for key, value in (self.model_extra or {}).items() if key in allowed}


# --------------------------------------------------------------------------- input items -> chat messages


def _text_of_parts(parts: Any, where: str, param: str, images: bool = False) -> list[dict[str, Any]]:
    """Content parts -> chat parts: text (input_text, output_text, refusal), and with `images` an input_image's
    `image_url` as chat's image_url part (a `file_id` needs the Files API, which Conveyor does not have)."""
    if not isinstance(parts, list):
        raise BadRequestError(f"invalid value for '{where}': expected a string or a list of content parts",
                              param=param)
    texts: list[dict[str, Any]] = []
    for index, part in enumerate(parts):
        part_type = part.get("type") if isinstance(part, dict) else None
        if part_type in _TEXT_PART_TYPES and isinstance(part.get("text"), str):
            texts.append({"type": "text", "text": part["text"]})
        elif part_type == "refusal" and isinstance(part.get("refusal"), str):
            texts.append({"type": "text", "text": part["refusal"]})
        elif images and part_type == "input_image" and isinstance(part.get("image_url"), str):
            texts.append({"type": "image_url", "image_url": {"url": part["image_url"], "detail": part.get("detail")}})
        else:
            allowed = "input_text, output_text, input_image (with image_url)" if images else "input_text, output_text"
            raise BadRequestError(f"invalid value for '{where}[{index}]': content parts of type {part_type!r} are "
                                  f"not supported (only {allowed} and refusal)", param=param)
    return texts


def _tool_call(item: dict[str, Any]) -> dict[str, Any]:
    """A function_call item as a chat tool call (arguments stay JSON text; chat's template rendering turns them
    into the object templates expect, and rejects text that is not JSON)."""
    return {"id": item["call_id"], "type": "function",
            "function": {"name": item["name"], "arguments": item["arguments"]}}


def items_to_messages(items: list[Any], call_names: dict[str, str], param: str = "input") -> list[dict[str, Any]]:
    """Responses items -> chat messages (content as text parts). `call_names` (call_id -> function name) is
    read and extended so a function_call_output can name its function."""
    messages: list[dict[str, Any]] = []
    for index, item in enumerate(items):
        where = f"{param}[{index}]"
        if not isinstance(item, dict):
            raise BadRequestError(f"invalid value for '{where}': expected an object", param=param)
        item_type = item.get("type", "message" if "role" in item else None)
        if item_type == "message":
            messages.append(_message_item(item, where, param))
        elif item_type == "function_call":
            _add_function_call(messages, item, call_names, where, param)
        elif item_type == "function_call_output":
            messages.append(_function_output_item(item, call_names, where, param))
        elif item_type != "reasoning":  # replayed reasoning items: this server emits none and renders none
            raise BadRequestError(f"invalid value for '{where}.type': input items of type {item_type!r} are not "
                                  "supported (message, function_call, function_call_output, reasoning)",
                                  param=param)
    return messages


def _message_item(item: dict[str, Any], where: str, param: str) -> dict[str, Any]:
    role = item.get("role")
    if role not in _MESSAGE_ROLES:
        raise BadRequestError(f"invalid value for '{where}.role': {role!r} (expected one of user, system, "
                              "developer, assistant)", param=param)
    content = item.get("content")
    parts = [{"type": "text", "text": content}] if isinstance(content, str) else \
        _text_of_parts(content, f"{where}.content", param, images=True)
    return {"role": _MESSAGE_ROLES[role], "content": parts}


def _add_function_call(messages: list[dict[str, Any]], item: dict[str, Any], call_names: dict[str, str],
                       where: str, param: str) -> None:
    """A function_call item joins the assistant message before it (parallel calls, or text then calls)."""
    for key in ("call_id", "name", "arguments"):
        if not isinstance(item.get(key), str):
            raise BadRequestError(f"missing or invalid '{where}.{key}' in a function_call item", param=param)
    try:
        json.loads(item["arguments"])
    except ValueError:
        raise BadRequestError(f"invalid value for '{where}.arguments': the arguments of a function call "
                              "must be JSON text", param=param) from None
    call_names[item["call_id"]] = item["name"]
    last = messages[-1] if messages else None
    if last is not None and last["role"] == "assistant":
        last.setdefault("tool_calls", []).append(_tool_call(item))
    else:
        messages.append({"role": "assistant", "content": [], "tool_calls": [_tool_call(item)]})


def _function_output_item(item: dict[str, Any], call_names: dict[str, str], where: str,
                          param: str) -> dict[str, Any]:
    call_id, output = item.get("call_id"), item.get("output")
    if not isinstance(call_id, str):
        raise BadRequestError(f"missing or invalid '{where}.call_id' in a function_call_output item", param=param)
    text = output if isinstance(output, str) else \
        "".join(part["text"] for part in _text_of_parts(output, f"{where}.output", param))
    message: dict[str, Any] = {"role": "tool", "tool_call_id": call_id, "content": [{"type": "text", "text": text}]}
    if call_id in call_names:
        message["name"] = call_names[call_id]
    return message


def input_to_messages(request: ResponsesRequest, call_names: dict[str, str]) -> list[dict[str, Any]]:
    if request.input is None:
        return []
    if isinstance(request.input, str):
        return [{"role": "user", "content": [{"type": "text", "text": request.input}]}]
    return items_to_messages(request.input, call_names)


def output_to_messages(output: list[dict[str, Any]], call_names: dict[str, str]) -> list[dict[str, Any]]:
    """A stored response's output items as the assistant turn that continues the conversation."""
    items: list[dict[str, Any]] = []
    for item in output:
        if item.get("type") == "message":
            items.append({"type": "message", "role": "assistant",
                          "content": [part for part in item.get("content", []) if part.get("type") == "output_text"]})
        elif item.get("type") == "function_call":
            items.append(item)
    return items_to_messages(items, call_names, param="previous_response_id")


# --------------------------------------------------------------------------- tools and text.format


def chat_tools(tools: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
    """Responses function tools ({type, name, description, parameters, strict}) -> chat tools."""
    converted: list[dict[str, Any]] = []
    for index, tool in enumerate(tools):
        if tool.get("type") != "function":
            raise BadRequestError(f"invalid value for 'tools[{index}].type': tools of type {tool.get('type')!r} are "
                                  "not supported (only function tools)", param="tools")
        if not isinstance(tool.get("name"), str) or not tool["name"]:
            raise BadRequestError(f"missing or invalid 'tools[{index}].name'", param="tools")
        function = {key: tool[key] for key in ("name", "description", "parameters", "strict")
                    if tool.get(key) is not None}
        converted.append({"type": "function", "function": function})
    return converted or None


def echo_tools(tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Tools as a response shows them (OpenAI fills parameters and strict)."""
    return [{**tool, "parameters": tool.get("parameters"), "strict": tool.get("strict", True)} for tool in tools]


def chat_tool_choice(tool_choice: str | dict[str, Any]) -> str | dict[str, Any]:
    if isinstance(tool_choice, str):
        return tool_choice
    if tool_choice.get("type") == "function" and isinstance(tool_choice.get("name"), str):
        return {"type": "function", "function": {"name": tool_choice["name"]}}
    raise BadRequestError("invalid value for 'tool_choice': expected none, auto, required or "
                          '{"type": "function", "name": ...}', param="tool_choice")


def text_format(text: dict[str, Any] | None) -> dict[str, Any]:
    """The response's `text` field: the request's, with format defaulting to {"type": "text"}."""
    config = dict(text or {})
    config["format"] = config.get("format") or {"type": "text"}
    return config


def response_format(text: dict[str, Any] | None) -> dict[str, Any] | None:
    """`text.format` -> chat's `response_format`, so the constraint takes chat's structured-output path
    (frontend/generate/structured_outputs.py compiles it into the sampler's `StructuredOutputSpec`)."""
    fmt = text_format(text)["format"]
    if not isinstance(fmt, dict):
        raise BadRequestError("invalid value for 'text.format': expected an object", param="text.format")
    kind = fmt.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        if not isinstance(fmt.get("name"), str) or not fmt["name"]:
            raise BadRequestError("missing 'text.format.name' (required for json_schema)", param="text.format.name")
        if not isinstance(fmt.get("schema"), dict):
            raise BadRequestError("missing or invalid 'text.format.schema': expected a JSON schema object",
                                  param="text.format.schema")
        json_schema = {key: fmt[key] for key in ("name", "description", "schema", "strict") if key in fmt}
        return {"type": "json_schema", "json_schema": json_schema}
    raise BadRequestError(f"invalid value for 'text.format.type': {kind!r} (expected text, json_object or "
                          "json_schema)", param="text.format.type")


def responses_error(error: BadRequestError, max_output_tokens_given: bool) -> BadRequestError:
    """A 400 from chat's machinery (tools, template, structured outputs, context length), renamed to the
    Responses request's fields: messages -> input, response_format -> text.format, tools.N... -> tools,
    max_tokens -> max_output_tokens (or input, when the client left the limit to the server)."""
    param, message = error.param, error.message
    if param is None:
        return error
    if param.startswith("messages"):
        param = "input"  # chat's message indexes are not the input's (instructions, merged function calls)
        message = re.sub(r"\bmessages\[\d+\]", "an input message", message).replace("messages", "input")
        message = message.replace("'image_url'", "'input_image'")
    elif param.startswith("response_format"):
        param = "text.format" + param.removeprefix("response_format").replace(".json_schema", "", 1)
        message = message.replace("response_format.json_schema", "text.format").replace("response_format",
                                                                                        "text.format")
    elif param.startswith("tools."):
        param = "tools"
    elif param.startswith("tool_choice"):
        param = "tool_choice"
    elif param == "max_tokens":
        param = "max_output_tokens" if max_output_tokens_given else "input"
    return BadRequestError(message, param=param, code=error.code)
