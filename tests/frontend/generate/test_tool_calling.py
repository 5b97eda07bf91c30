"""Tool calling and the chat extras, against the fake engine core scripted to "generate" chosen text.

Every response is validated with the openai package's own types (ChatCompletion / ChatCompletionChunk). The
tool parsers on their own: tests/frontend/generate/tool_parsers/.
"""
from __future__ import annotations

import json
from typing import Any, Callable, Iterator

import httpx
import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from conveyor.config_from_args import frontend_config_from_args
from conveyor.flags import build_parser
from engine_core.protocol import EngineCoreRequest, StructuredOutputSpec
from frontend.generate.tool_calling import NamedFunctionProcessor, RequiredToolsProcessor
from frontend.generate.tool_parsers import tool_parser_names
from frontend.tokenizer import TokenizerInfo
from tests.frontend.conftest import SERVED_NAME, FrontendHarness, canned_token_ids, model_dir
from tests.frontend.fake_core import FakeCore
from tests.frontend.generate.tool_outputs import CALLS, OUTPUTS, call_values

EOS = 2  # <|im_end|>, the tiny model's eos_token_id
USER = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER = {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"type": "string",
                                                                                "enum": ["celsius", "fahrenheit"]}},
           "required": ["city"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather now",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "parameters": {
             "type": "object", "properties": {"tz": {"type": "string"}}}}}]

_tokenizer = TokenizerInfo(str(model_dir("llama")))


def tokens(text: str) -> list[int]:
    return _tokenizer.encode(text, add_special_tokens=False)


Script = Callable[[EngineCoreRequest], tuple[list[int], str, "int | str | None"]]


def answer(text: str, finish: str = "stop") -> Script:
    """The fake core answers every request with `text` (then EOS, stop_reason None, as the engine reports it)."""
    ids = tokens(text)
    return lambda _: (ids + [EOS], "stop", None) if finish == "stop" else (ids, finish, None)


@pytest.fixture(scope="module")
def tool_core() -> Iterator[FakeCore]:
    core = FakeCore(canned_token_ids())
    yield core
    core.close()


@pytest.fixture(scope="module")
def servers(tool_core: FakeCore) -> Iterator[dict[str, FrontendHarness]]:
    """One frontend per parser (--enable-auto-tool-choice --tool-call-parser NAME) and a plain one."""
    trust = {"trust_request_chat_template": True}
    harnesses = {name: FrontendHarness(tool_core, frontend_options={"enable_auto_tool_choice": True,
                                                                   "tool_call_parser": name, **trust})
                 for name in OUTPUTS}
    harnesses["plain"] = FrontendHarness(tool_core, frontend_options=trust)
    yield harnesses
    for harness in harnesses.values():
        harness.stop()


@pytest.fixture()
def say(tool_core: FakeCore) -> Iterator[Callable[..., None]]:
    def script(text: str, finish: str = "stop") -> None:
        tool_core.script = answer(text, finish)
    yield script
    tool_core.script = None


def post(server: FrontendHarness, body: dict[str, Any]) -> httpx.Response:
    with server.http() as client:
        return client.post("/v1/chat/completions", json={"model": SERVED_NAME, "messages": USER, **body})


def complete(server: FrontendHarness, **body: Any) -> ChatCompletion:
    response = post(server, body)
    assert response.status_code == 200, response.text
    return ChatCompletion.model_validate(response.json())


def stream(server: FrontendHarness, **body: Any) -> list[ChatCompletionChunk]:
    with server.http() as client, client.stream("POST", "/v1/chat/completions", json={
            "model": SERVED_NAME, "messages": USER, "stream": True, **body}) as response:
        assert response.status_code == 200
        lines = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    return [ChatCompletionChunk.model_validate(json.loads(line[6:])) for line in lines[:-1]]


def assemble(chunks: list[ChatCompletionChunk]) -> tuple[str, list[dict[str, Any]], str | None]:
    """Content, calls (as a client rebuilds them) and the finish reason of a one-choice stream; checks that a
    call's id, type and name come once, in its first piece, and that no content follows the first call."""
    content, calls, finish = "", [], None
    for chunk in chunks:
        for choice in chunk.choices:
            if choice.delta.content:
                assert not calls, "content after a tool call"
                content += choice.delta.content
            for piece in choice.delta.tool_calls or []:
                assert piece.function is not None
                if piece.index == len(calls):
                    assert piece.id and piece.id.startswith("call_") and piece.type == "function"
                    assert piece.function.name
                    calls.append({"id": piece.id, "name": piece.function.name, "arguments": ""})
                else:
                    assert piece.index == len(calls) - 1 and piece.id is None and piece.function.name is None
                calls[piece.index]["arguments"] += piece.function.arguments or ""
            if choice.finish_reason is not None:
                finish = choice.finish_reason
    return content, calls, finish


# --------------------------------------------------------------------------- auto: each parser


@pytest.mark.parametrize("parser", sorted(OUTPUTS))
def test_auto_tool_calls(parser: str, servers: dict[str, FrontendHarness], say: Callable[..., None]) -> None:
    text, content = OUTPUTS[parser]
    say(text)
    completion = complete(servers[parser], tools=TOOLS)
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == content
    assert choice.message.tool_calls is not None and call_values(choice.message.tool_calls) == CALLS
    ids = [call.id for call in choice.message.tool_calls]
    assert all(call_id.startswith("call_") for call_id in ids) and len(set(ids)) == 2
    assert all(call.type == "function" for call in choice.message.tool_calls)


@pytest.mark.parametrize("parser", sorted(OUTPUTS))
def test_auto_tool_calls_streamed(parser: str, servers: dict[str, FrontendHarness],
                                  say: Callable[..., None]) -> None:
    text, content = OUTPUTS[parser]
    say(text)
    chunks = stream(servers[parser], tools=TOOLS, tool_choice="auto")
    streamed_content, calls, finish = assemble(chunks)
    assert streamed_content == (content or "") and finish == "tool_calls"
    assert call_values(calls) == CALLS
    pieces = sum(len(choice.delta.tool_calls or []) for chunk in chunks for choice in chunk.choices)
    assert pieces > 2  # arguments arrive in several pieces, not in one block per call


@pytest.mark.parametrize("parser", sorted(OUTPUTS))
def test_auto_plain_answer_stays_content(parser: str, servers: dict[str, FrontendHarness],
                                         say: Callable[..., None]) -> None:
    text = "It is sunny [1] in {Paris} < 30 degrees."
    say(text)
    completion = complete(servers[parser], tools=TOOLS)
    assert completion.choices[0].message.content == text and not completion.choices[0].message.tool_calls
    assert completion.choices[0].finish_reason == "stop"
    streamed_content, calls, finish = assemble(stream(servers[parser], tools=TOOLS))
    assert (streamed_content, calls, finish) == (text, [], "stop")


def test_length_cut_keeps_length_and_parallel_tool_calls_false(servers: dict[str, FrontendHarness],
                                                               say: Callable[..., None]) -> None:
    say(OUTPUTS["hermes"][0])
    completion = complete(servers["hermes"], tools=TOOLS, parallel_tool_calls=False)
    assert completion.choices[0].message.tool_calls is not None
    assert call_values(completion.choices[0].message.tool_calls) == CALLS[:1]
    _, calls, _ = assemble(stream(servers["hermes"], tools=TOOLS, parallel_tool_calls=False))
    assert call_values(calls) == CALLS[:1]
    say(OUTPUTS["hermes"][0], finish="length")
    completion = complete(servers["hermes"], tools=TOOLS)
    assert completion.choices[0].finish_reason == "length"


def test_parsers_keep_special_tokens(servers: dict[str, FrontendHarness], tool_core: FakeCore) -> None:
    """Tool markers are special tokens in some tokenizers: with a parser at work they stay in the text."""
    tool_core.script = lambda _: (tokens("a") + [1] + tokens("b") + [EOS], "stop", None)  # 1 = <|im_start|>
    try:
        parsed = complete(servers["hermes"], tools=TOOLS)
        unparsed = complete(servers["hermes"], tools=TOOLS, tool_choice="none")
        chosen = complete(servers["hermes"], tools=TOOLS, skip_special_tokens=True)
    finally:
        tool_core.script = None
    assert parsed.choices[0].message.content == "a<|im_start|>b"  # and no <|im_end|>: the stop token is not text
    assert unparsed.choices[0].message.content == chosen.choices[0].message.content == "ab"


def test_n_choices_each_parsed(servers: dict[str, FrontendHarness], say: Callable[..., None]) -> None:
    say(OUTPUTS["pythonic"][0])
    completion = complete(servers["pythonic"], tools=TOOLS, n=2)
    assert [call_values(choice.message.tool_calls or []) for choice in completion.choices] == [CALLS, CALLS]


# --------------------------------------------------------------------------- none, named, required


def test_tool_choice_none_passes_tools_but_does_not_parse(servers: dict[str, FrontendHarness], tool_core: FakeCore,
                                                          say: Callable[..., None]) -> None:
    text = OUTPUTS["hermes"][0]
    say(text)
    template = "{{ (tools or []) | length }} tools|{{ messages[0]['content'] }}"
    completion = complete(servers["hermes"], tools=TOOLS, tool_choice="none", chat_template=template)
    assert completion.choices[0].message.content == text and not completion.choices[0].message.tool_calls
    assert tool_core.requests[-1].prompt_token_ids == tokens("2 tools|" + USER[0]["content"])
    assert tool_core.requests[-1].sampling_params.structured_output is None
    excluding = FrontendHarness(tool_core, frontend_options={"exclude_tools_when_tool_choice_none": True,
                                                             "trust_request_chat_template": True})
    try:
        complete(excluding, tools=TOOLS, tool_choice="none", chat_template=template)
    finally:
        excluding.stop()
    assert tool_core.requests[-1].prompt_token_ids == tokens("0 tools|" + USER[0]["content"])


NAMED = {"type": "function", "function": {"name": "get_weather"}}


@pytest.mark.parametrize("stream_it", [False, True])
def test_named_tool_choice(stream_it: bool, servers: dict[str, FrontendHarness], tool_core: FakeCore,
                           say: Callable[..., None]) -> None:
    arguments = '{"city": "Paris", "unit": "celsius"}'
    say(arguments)
    if stream_it:  # no --enable-auto-tool-choice needed
        content, calls, finish = assemble(stream(servers["plain"], tools=TOOLS, tool_choice=NAMED))
        assert content == "" and finish == "stop"  # OpenAI: a forced named call finishes with "stop"
        assert calls[0]["arguments"] == arguments and calls[0]["name"] == "get_weather" and len(calls) == 1
    else:
        completion = complete(servers["plain"], tools=TOOLS, tool_choice=NAMED)
        message = completion.choices[0].message
        assert message.content is None and completion.choices[0].finish_reason == "stop"
        assert message.tool_calls is not None and call_values(message.tool_calls) == CALLS[:1]
    spec = tool_core.requests[-1].sampling_params.structured_output
    assert spec == StructuredOutputSpec(kind="json", spec=json.dumps(WEATHER))


@pytest.mark.parametrize("stream_it", [False, True])
def test_required_tool_choice(stream_it: bool, servers: dict[str, FrontendHarness], tool_core: FakeCore,
                              say: Callable[..., None]) -> None:
    say(json.dumps([{"name": name, "parameters": arguments} for name, arguments in CALLS]))
    if stream_it:
        content, calls, finish = assemble(stream(servers["plain"], tools=TOOLS, tool_choice="required"))
        assert content == "" and finish == "tool_calls" and call_values(calls) == CALLS
    else:
        completion = complete(servers["plain"], tools=TOOLS, tool_choice="required")
        message = completion.choices[0].message
        assert message.content is None and completion.choices[0].finish_reason == "tool_calls"
        assert message.tool_calls is not None and call_values(message.tool_calls) == CALLS
    spec = tool_core.requests[-1].sampling_params.structured_output
    assert spec is not None and spec.kind == "json"
    schema = json.loads(spec.spec)
    assert schema["type"] == "array" and schema["minItems"] == 1 and "maxItems" not in schema
    variants = schema["items"]["anyOf"]
    assert [variant["properties"]["name"]["enum"] for variant in variants] == [["get_weather"], ["get_time"]]
    assert variants[0]["properties"]["parameters"] == WEATHER and variants[0]["required"] == ["name", "parameters"]


def test_required_single_call_schema(servers: dict[str, FrontendHarness], tool_core: FakeCore,
                                     say: Callable[..., None]) -> None:
    say('[{"name": "get_time", "parameters": {}}]')
    completion = complete(servers["plain"], tools=TOOLS, tool_choice="required", parallel_tool_calls=False)
    assert completion.choices[0].message.tool_calls is not None
    assert call_values(completion.choices[0].message.tool_calls) == [("get_time", {})]
    spec = tool_core.requests[-1].sampling_params.structured_output
    assert spec is not None and json.loads(spec.spec)["maxItems"] == 1


# --------------------------------------------------------------------------- 400s


@pytest.mark.parametrize("server, body, param, message", [
    ("plain", {"tools": TOOLS}, "tool_choice", '"auto" tool choice requires --enable-auto-tool-choice'),
    ("plain", {"tools": TOOLS, "tool_choice": "auto"}, "tool_choice", "--tool-call-parser"),
    ("hermes", {"tool_choice": "required"}, "tool_choice", "`tools` must be set"),
    ("hermes", {"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice", "Invalid value for `tool_choice`"),
    ("hermes", {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice", "does not match any of the specified `tools`"),
    ("hermes", {"tools": TOOLS, "tool_choice": {"type": "function"}}, "tool_choice.function", "Correct usage"),
    ("hermes", {"tools": TOOLS, "tool_choice": {"type": "function", "function": {}}},
     "tool_choice.function.name", "Invalid `name`"),
    ("hermes", {"tools": []}, "tools", "must not be an empty array"),
    ("hermes", {"tools": [{"type": "retrieval", "function": {"name": "f"}}]}, "tools.0.type", "function"),
    ("hermes", {"tools": [TOOLS[0], {"type": "function", "function": {"parameters": {}}}]},
     "tools.1.function.name", "name"),
    ("hermes", {"tools": [{"type": "function", "function": {"name": "f", "parameters": "{}"}}]},
     "tools.0.function.parameters", "JSON schema object"),
    ("hermes", {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": 3}}}]},
     "tools.0.function.parameters", "JSON schema object"),
    ("hermes", {"tools": [{"type": "function"}]}, "tools.0.function", "function"),
    ("plain", {"tools": [TOOLS[1], {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "frob"}}}}}], "tool_choice": {
        "type": "function", "function": {"name": "f"}}}, "tools.1.function.parameters", "cannot be enforced"),
    ("plain", {"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
     "tool_choice", "not both"),
    ("plain", {"chat_template": "{% for m in messages %}{{ m.content }"}, "chat_template", "does not compile"),
    ("plain", {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "what is this?"}, {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]},
     "messages", "text-only"),
    ("plain", {"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]},
     "messages", "input_audio"),
    ("plain", {"messages": [{"role": "assistant", "content": None,
                             "tool_calls": [{"id": "c", "type": "function",
                                             "function": {"name": "f", "arguments": "{not json"}}]}]},
     "messages", "JSON"),
    ("plain", {"continue_final_message": True, "add_generation_prompt": True}, "continue_final_message",
     "Cannot set both `continue_final_message` and `add_generation_prompt`"),
])
def test_bad_requests(server: str, body: dict[str, Any], param: str | None, message: str,
                      servers: dict[str, FrontendHarness]) -> None:
    response = post(servers[server], body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and message in error["message"], error
    assert error["type"] == "BadRequestError" and error["code"] == 400


# --------------------------------------------------------------------------- conversations and chat extras


def render(server: FrontendHarness, **body: Any) -> str:
    """The prompt text through POST /tokenize (and /detokenize)."""
    with server.http() as client:
        response = client.post("/tokenize", json={"model": SERVED_NAME, **body})
        assert response.status_code == 200, response.text
        detokenized = client.post("/detokenize", json={"model": SERVED_NAME, "tokens": response.json()["tokens"]})
    return str(detokenized.json()["prompt"])


def test_tool_conversation_reaches_the_template(servers: dict[str, FrontendHarness], tool_core: FakeCore,
                                                say: Callable[..., None]) -> None:
    template = ("{% for m in messages %}<{{ m.role }}:{{ m.content }}"
                "{% for call in m.tool_calls or [] %} call {{ call.id }} {{ call.function.name }}"
                "({{ call.function.arguments.city }}){% endfor %}"
                "{% if m.tool_call_id %} for {{ m.tool_call_id }}{% endif %}>{% endfor %}")
    messages = USER + [
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "22 C"}]
    expected = ("<user:What is the weather in Paris?><assistant: call call_1 get_weather(Paris)>"
                "<tool:22 C for call_1>")
    assert render(servers["plain"], messages=messages, chat_template=template) == expected
    say("It is 22 C in Paris.")
    completion = complete(servers["hermes"], messages=messages, tools=TOOLS, chat_template=template)
    assert completion.choices[0].message.content == "It is 22 C in Paris."
    assert tool_core.requests[-1].prompt_token_ids == tokens(expected)


def test_request_chat_template_kwargs_and_documents(servers: dict[str, FrontendHarness], tool_core: FakeCore,
                                                    say: Callable[..., None]) -> None:
    template = ("{{ messages[-1]['content'] }}|{% if enable_thinking %}think{% else %}no-think{% endif %}|"
                "{% for d in documents or [] %}[{{ d.title }}: {{ d.text }}]{% endfor %}|{{ bos_token }}")
    say("ok")
    complete(servers["plain"], chat_template=template, chat_template_kwargs={"enable_thinking": True},
             documents=[{"title": "T1", "text": "one"}, {"title": "T2", "text": "two"}])
    bos = _tokenizer.special_tokens["bos_token"] or ""
    assert tool_core.requests[-1].prompt_token_ids == tokens(
        f"{USER[0]['content']}|think|[T1: one][T2: two]|{bos}")
    assert render(servers["plain"], messages=USER, chat_template=template,
                  chat_template_kwargs={"enable_thinking": False}) == f"{USER[0]['content']}|no-think||{bos}"
    # the model's own template again on the next request
    assert render(servers["plain"], messages=USER).endswith("<|im_start|>assistant\n")


def test_request_chat_template_needs_trust(tool_core: FakeCore) -> None:
    untrusting = FrontendHarness(tool_core)  # no --trust-request-chat-template: refused, as vLLM does
    try:
        response = post(untrusting, {"chat_template": "{{ messages[0]['content'] }}"})
        with untrusting.http() as client:
            tokenized = client.post("/tokenize", json={"messages": USER, "chat_template": "x"})
    finally:
        untrusting.stop()
    for refused in (response, tokenized):
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "chat_template"
        assert "--trust-request-chat-template" in refused.json()["error"]["message"]


def test_continue_final_message(servers: dict[str, FrontendHarness], say: Callable[..., None]) -> None:
    messages = USER + [{"role": "assistant", "content": "The weather in Paris is"}]
    continued = render(servers["plain"], messages=messages, continue_final_message=True)
    assert continued.endswith("<|im_start|>assistant\nThe weather in Paris is")  # open: no <|im_end|>
    closed = render(servers["plain"], messages=messages)
    assert closed.endswith("The weather in Paris is<|im_end|>\n<|im_start|>assistant\n")
    say(" sunny.")
    completion = complete(servers["plain"], messages=messages, continue_final_message=True, echo=True)
    message = completion.choices[0].message
    assert message.role == "assistant" and message.content == "The weather in Paris is sunny."


def test_multimodal_kwargs_accepted(servers: dict[str, FrontendHarness], say: Callable[..., None]) -> None:
    say("fine")
    completion = complete(servers["plain"], media_io_kwargs={"image": {"num_frames": 2}},
                          mm_processor_kwargs={"do_resize": False})
    assert completion.choices[0].message.content == "fine"


# --------------------------------------------------------------------------- flags


def test_flags_reach_the_frontend_config() -> None:
    args = build_parser().parse_args(["frontend", "--engine-address", "tcp://127.0.0.1:1",
                                      "--enable-auto-tool-choice", "--tool-call-parser", "pythonic",
                                      "--exclude-tools-when-tool-choice-none", "--trust-request-chat-template"])
    config = frontend_config_from_args(args)
    assert (config.enable_auto_tool_choice, config.tool_call_parser, config.exclude_tools_when_tool_choice_none,
            config.trust_request_chat_template) == (True, "pythonic", True, True)
    default = frontend_config_from_args(build_parser().parse_args(["serve"]))
    assert (default.enable_auto_tool_choice, default.tool_call_parser, default.trust_request_chat_template) == (
        False, None, False)
    with pytest.raises(SystemExit, match="needs --tool-call-parser"):
        frontend_config_from_args(build_parser().parse_args(["serve", "--enable-auto-tool-choice"]))
    with pytest.raises(SystemExit, match="hermes, llama3_json, pythonic"):
        frontend_config_from_args(build_parser().parse_args(["serve", "--tool-call-parser", "nope"]))
    assert {"hermes", "llama3_json", "pythonic"} <= set(tool_parser_names())


# --------------------------------------------------------------------------- the forced-choice processors alone


def test_forced_choice_processors() -> None:
    """The processors of tool_choice "required" and of a named function, on their own."""
    required = RequiredToolsProcessor().extract('[{"name": "a", "parameters": {"x": 1}}, {"name": "b"}]')
    assert (required.content, [(c.name, c.arguments) for c in required.tool_calls]) == (
        None, [("a", '{"x": 1}'), ("b", "{}")])
    assert RequiredToolsProcessor().extract("oops").content == "oops"
    named = NamedFunctionProcessor("f").extract('{"x": 1}')
    assert (named.content, [(c.name, c.arguments) for c in named.tool_calls]) == (None, [("f", '{"x": 1}')])
