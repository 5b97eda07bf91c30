"""Tool calling for /v1/chat/completions: `tools` and `tool_choice` checked the way vLLM checks them, and the
per-choice processor that turns generated text into content + tool calls.

tool_choice (default "auto" when tools are given, else "none"):
- "none": tools still reach the chat template (unless --exclude-tools-when-tool-choice-none); output is not parsed.
- "auto": needs --enable-auto-tool-choice and --tool-call-parser; the parser finds calls in the model's own syntax.
- "required" / {"type": "function", "function": {"name": ...}}: the output is constrained with a JSON schema
  (structured outputs): an array of {"name", "parameters"} objects (anyOf over the tools), or the named
  function's parameters; that JSON is read back into tool calls.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgspec

from engine_core.config import FrontendConfig
from engine_core.protocol import StructuredOutputSpec
from engine_core.structured_output import check_spec
from frontend.errors import BadRequestError
from frontend.generate.protocol import ChatCompletionRequest
from frontend.generate.tool_parsers import ToolOutputProcessor, ToolParser, get_tool_parser
from frontend.generate.tool_parsers.base import StreamDelta, _CallRecord
from frontend.generate.tool_parsers.json_calls import JsonCallSequence

if TYPE_CHECKING:
    from frontend.generate.choices import Choice

_CORRECT_USAGE = 'Correct usage: `{"type": "function", "function": {"name": "my_function"}}`'
_EMPTY_PARAMETERS = {"type": "object", "properties": {}}


@dataclass(frozen=True)
class ToolPlan:
    """How one request handles tools; `mode` is "none", "auto", "required" or "named"."""

    mode: str
    template_tools: list[dict[str, Any]] | None  # what the chat template sees as `tools`
    parser: type[ToolParser] | None = None  # "auto"
    function_name: str | None = None  # "named"
    structured_output: StructuredOutputSpec | None = None  # "required" / "named"
    parallel_tool_calls: bool = True

    @property
    def parses_output(self) -> bool:
        return self.mode in ("required", "named") or (self.mode == "auto" and self.parser is not None)

    @property
    def keep_special_tokens(self) -> bool:
        """Parsers read markers that some tokenizers mark special (<tool_call>, <|python_tag|>)."""
        return self.mode == "auto" and self.parser is not None and self.parser.keep_special_tokens

    def make_processor(self) -> ToolOutputProcessor | None:
        """A fresh processor for one choice, or None when output is plain content."""
        if self.mode == "named":
            assert self.function_name is not None
            return NamedFunctionProcessor(self.function_name)
        if self.mode == "required":
            return RequiredToolsProcessor()
        if self.mode == "auto" and self.parser is not None:
            return self.parser(self.template_tools)
        return None

    def finish_reason(self, engine_reason: str | None, tools_called: bool) -> str | None:
        """As OpenAI: "tool_calls" when "auto"/"required" produced calls (a forced named call keeps "stop")."""
        if tools_called and engine_reason == "stop" and self.mode in ("auto", "required"):
            return "tool_calls"
        return engine_reason

    def filter_stream(self, delta: StreamDelta) -> StreamDelta:
        """parallel_tool_calls=false: only the first call."""
        if not self.parallel_tool_calls:
            delta.tool_calls = [piece for piece in delta.tool_calls if piece.index == 0]
        return delta


def plan_tools(request: ChatCompletionRequest, config: FrontendConfig) -> ToolPlan:
    """Check `tools` / `tool_choice` (400 naming the parameter) and decide how this request handles tools."""
    tools = request.tools
    if tools is not None:
        if not tools:
            raise BadRequestError("`tools` must not be an empty array. Either provide at least one tool or omit "
                                  "the field entirely.", param="tools")
        for index, tool in enumerate(tools):
            _check_tool(tool, index)
    choice: Any = request.tool_choice
    if choice is None:
        explicit_null = "tool_choice" in request.model_fields_set
        auto_enabled = config.enable_auto_tool_choice and config.tool_call_parser is not None
        choice = "auto" if tools and (not explicit_null or auto_enabled) else "none"
    parallel = request.parallel_tool_calls is not False
    if choice == "none":
        shown = None if config.exclude_tools_when_tool_choice_none else tools
        return ToolPlan("none", shown, parallel_tool_calls=parallel)
    if tools is None:
        raise BadRequestError("When using `tool_choice`, `tools` must be set.", param="tool_choice")
    if isinstance(choice, dict):
        name = _named_choice(choice, tools)
        _check_no_other_constraint(request)
        parameters = _function(tools, name).get("parameters") or _EMPTY_PARAMETERS
        spec = StructuredOutputSpec(kind="json", spec=json.dumps(parameters, ensure_ascii=False))
        index = next(i for i, tool in enumerate(tools) if _function_of(tool)["name"] == name)
        _check_enforceable(spec, f"tools.{index}.function.parameters")
        return ToolPlan("named", tools, function_name=name, structured_output=spec, parallel_tool_calls=parallel)
    if choice == "required":
        _check_no_other_constraint(request)
        spec = StructuredOutputSpec(kind="json", spec=json.dumps(required_schema(tools, parallel), ensure_ascii=False))
        _check_enforceable(spec, "tools")
        return ToolPlan("required", tools, structured_output=spec, parallel_tool_calls=parallel)
    if choice == "auto":
        if not config.enable_auto_tool_choice or config.tool_call_parser is None:
            raise BadRequestError('"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to '
                                  "be set", param="tool_choice")
        return ToolPlan("auto", tools, parser=get_tool_parser(config.tool_call_parser), parallel_tool_calls=parallel)
    raise BadRequestError(f"Invalid value for `tool_choice`: {choice!r}! Only named tools, \"none\", \"auto\" or "
                          "\"required\" are supported.", param="tool_choice")


def required_schema(tools: list[dict[str, Any]], parallel: bool = True) -> dict[str, Any]:
    """tool_choice="required": a non-empty array of {"name": <one of the tools>, "parameters": <its schema>}
    (vLLM's schema, closed to other keys: an open object would let a weak model wander off into a free key)."""
    variants = [{"type": "object",
                 "properties": {"name": {"type": "string", "enum": [_function_of(tool)["name"]]},
                                "parameters": _function_of(tool).get("parameters") or _EMPTY_PARAMETERS},
                 "required": ["name", "parameters"], "additionalProperties": False} for tool in tools]
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"type": "object", "anyOf": variants}}
    if not parallel:
        schema["maxItems"] = 1
    definitions: dict[str, Any] = {}
    for tool in tools:  # tools' own "$defs" must sit at the root for their "#/$defs/..." references
        parameters = _function_of(tool).get("parameters") or {}
        definitions.update(parameters.get("$defs") or {})
    if definitions:
        schema["$defs"] = definitions
    return schema


def _function_of(tool: dict[str, Any]) -> dict[str, Any]:
    function: dict[str, Any] = tool["function"]
    return function


def _function(tools: list[dict[str, Any]], name: str) -> dict[str, Any]:
    return next(_function_of(tool) for tool in tools if _function_of(tool)["name"] == name)


def _check_tool(tool: Any, index: int) -> None:
    where = f"tools.{index}"
    if not isinstance(tool, dict):
        raise BadRequestError(f"invalid value for '{where}': a tool must be an object", param=where)
    if tool.get("type", "function") != "function":
        raise BadRequestError(f"invalid value for '{where}.type': only tools of type \"function\" are supported "
                              f"(got {tool.get('type')!r})", param=f"{where}.type")
    function = tool.get("function")
    if not isinstance(function, dict):
        raise BadRequestError(f"missing or invalid '{where}.function': expected an object with a name",
                              param=f"{where}.function")
    name = function.get("name")
    if not isinstance(name, str) or not name:
        raise BadRequestError(f"invalid value for '{where}.function.name': a function needs a non-empty name",
                              param=f"{where}.function.name")
    description = function.get("description")
    if description is not None and not isinstance(description, str):
        raise BadRequestError(f"invalid value for '{where}.function.description': expected a string",
                              param=f"{where}.function.description")
    parameters = function.get("parameters")
    if parameters is not None and not _is_schema_object(parameters):
        raise BadRequestError(f"invalid value for '{where}.function.parameters': expected a JSON schema object "
                              f"(got {json.dumps(parameters)[:80]})", param=f"{where}.function.parameters")


def _is_schema_object(schema: Any) -> bool:
    """A light JSON-schema shape check: an object whose `type`, `properties` and `required` are well formed."""
    if not isinstance(schema, dict):
        return False
    kind = schema.get("type")
    if kind is not None and not (isinstance(kind, str) or (isinstance(kind, list)
                                                          and all(isinstance(item, str) for item in kind))):
        return False
    properties = schema.get("properties")
    if properties is not None and not (isinstance(properties, dict)
                                       and all(isinstance(value, (dict, bool)) for value in properties.values())):
        return False
    required = schema.get("required")
    return required is None or (isinstance(required, list) and all(isinstance(item, str) for item in required))


def _named_choice(choice: dict[str, Any], tools: list[dict[str, Any]]) -> str:
    if choice.get("type", "function") != "function":
        raise BadRequestError(f"Invalid value for `tool_choice.type`: {choice.get('type')!r}! {_CORRECT_USAGE}",
                              param="tool_choice.type")
    function = choice.get("function")
    if not isinstance(function, dict):
        raise BadRequestError(f"Invalid value for `function`: `{function}` in `tool_choice`! {_CORRECT_USAGE}",
                              param="tool_choice.function")
    name = function.get("name")
    if not isinstance(name, str) or not name:
        raise BadRequestError(f"Invalid `name` in `function`: `{name}` in `tool_choice`! {_CORRECT_USAGE}",
                              param="tool_choice.function.name")
    if not any(_function_of(tool)["name"] == name for tool in tools):
        raise BadRequestError(f"The tool specified in `tool_choice` ({name!r}) does not match any of the specified "
                              "`tools`", param="tool_choice")
    return name


def _check_enforceable(spec: StructuredOutputSpec, param: str) -> None:
    """400 when the tools' schemas cannot be turned into the grammar that forces the call."""
    error = check_spec(spec)
    if error is not None:
        raise BadRequestError(f"the function parameters cannot be enforced as a JSON schema: {error}", param=param)


def _check_no_other_constraint(request: ChatCompletionRequest) -> None:
    """A forced tool call is itself a structured-output constraint: it cannot be combined with another one."""
    format_type = (request.response_format or {}).get("type")
    if request.structured_outputs or format_type in ("json_schema", "json_object", "structural_tag"):
        raise BadRequestError("You can only either use constraints for structured outputs or tools, not both.",
                              param="tool_choice")


def template_tool_calls(message: dict[str, Any], index: int) -> None:
    """Chat templates expect an assistant message's tool call arguments as a dict, not the JSON text OpenAI
    clients send (vLLM converts them the same way)."""
    tool_calls = message.get("tool_calls")
    if not isinstance(tool_calls, list):
        return
    for call in tool_calls:
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict):
            continue
        arguments = function.get("arguments")
        if not arguments:
            function["arguments"] = {}
        elif isinstance(arguments, str):
            try:
                function["arguments"] = json.loads(arguments)
            except ValueError:
                raise BadRequestError(f"invalid value for 'messages.{index}.tool_calls': the arguments of a tool "
                                      "call must be JSON text", param="messages") from None


class NamedFunctionProcessor(ToolOutputProcessor):
    """tool_choice naming a function: the whole (schema-constrained) output is that call's arguments."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name
        self._record: _CallRecord | None = None
        self._sent = 0

    def _advance(self, final: bool) -> None:
        if self._record is None and (self.text or final):
            self._record = self._call_open()
            self._call_name(self._record, self.name)
        if self._record is not None:
            self._call_arguments(self._record, self.text[self._sent:])
            self._sent = len(self.text)

    def _final_arguments(self, call: _CallRecord) -> str:
        return call.arguments


class RequiredToolsProcessor(JsonCallSequence):
    """tool_choice="required": the output is a JSON array of {"name": ..., "parameters": {...}}."""

    opener = "["
    separator = ","
    closer = "]"
    require_arguments = False


class ChoiceToolOutput:
    """One choice's output under a ToolPlan: streamed deltas and the final message, as OpenAI shapes them."""

    def __init__(self, plan: ToolPlan) -> None:
        self.plan = plan
        self.processor = plan.make_processor()

    def stream(self, text: str, finish_reason: str | None) -> tuple[dict[str, Any], str | None]:
        """A chunk's `delta` for new text (empty when the parser holds it back) and its finish reason."""
        if self.processor is None:
            return ({"content": text} if text else {}), finish_reason
        out = self.processor.feed(text)
        if finish_reason is not None:
            out.merge(self.processor.finish())
        out = self.plan.filter_stream(out)
        delta: dict[str, Any] = {}
        if out.content:
            delta["content"] = out.content
        if out.tool_calls:
            delta["tool_calls"] = [piece.to_openai() for piece in out.tool_calls]
        if finish_reason is not None:
            finish_reason = self.plan.finish_reason(finish_reason, self.processor.tools_called)
        return delta, finish_reason

    def message(self, role: str, prefix: str, text: str,
                finish_reason: str | None) -> tuple[dict[str, Any], str | None]:
        """The whole `message` (content after `prefix`, the echoed text) and the choice's finish reason."""
        if self.processor is None:
            return {"role": role, "content": prefix + text, "refusal": None, "tool_calls": []}, finish_reason
        extracted = self.processor.extract(text)
        calls = extracted.tool_calls if self.plan.parallel_tool_calls else extracted.tool_calls[:1]
        content: str | None = prefix + (extracted.content or "")
        if calls and not content:
            content = None
        message = {"role": role, "content": content, "refusal": None,
                   "tool_calls": [call.to_openai() for call in calls]}
        return message, self.plan.finish_reason(finish_reason, bool(calls))



def request_for_engine(plan: ToolPlan, request: ChatCompletionRequest) -> ChatCompletionRequest:
    """Parsers need their markers in the text: keep special tokens (unless the client chose
    skip_special_tokens itself), as vLLM does."""
    if plan.keep_special_tokens and "skip_special_tokens" not in request.model_fields_set:
        return request.model_copy(update={"skip_special_tokens": False})
    return request


def constrain_choices(plan: ToolPlan, choices: list[Choice]) -> None:
    """Put the forced call's JSON schema on every engine request ("required" / named tool_choice)."""
    if plan.structured_output is None:
        return
    for choice in choices:
        params = msgspec.structs.replace(choice.engine_request.sampling_params,
                                         structured_output=plan.structured_output)
        choice.engine_request = msgspec.structs.replace(choice.engine_request, sampling_params=params)
