"""/v1/responses through a real HTTP server against the fake engine core, the store off: event order, prompt
translation, sampling fields, tool calls in the output and errors. The store: test_store.py."""
from __future__ import annotations

import json
from typing import Any, Iterator

import httpx
import openai
import pytest

from engine_core.protocol import StructuredOutputSpec
from tests.frontend.conftest import MAX_MODEL_LEN, SERVED_NAME, FrontendHarness
from tests.frontend.fake_core import FakeCore
from tests.frontend.generate.responses.serving_harness import (CALL, TEMPLATE, TOOL_PARSING, WEATHER, answer,
                                                               assert_error, prompt_text, stream_events)
from tests.responses_validation import check_event_sequence, validate_event, validate_response


@pytest.fixture(scope="module")
def templated(core: FakeCore) -> Iterator[FrontendHarness]:
    harness = FrontendHarness(core, chat_template=TEMPLATE, frontend_options=TOOL_PARSING)
    yield harness
    harness.stop()


# --------------------------------------------------------------------------- shape and events


def test_plain_response_shape(http: httpx.Client, core: FakeCore) -> None:
    raw = http.post("/v1/responses", json={"model": SERVED_NAME, "input": "hi", "max_output_tokens": 3,
                                           "metadata": {"k": "v"}, "user": "u1"}).json()
    response = validate_response(raw)
    request = core.requests[-1]
    assert request.request_id == f"{response.id}-0" and request.sampling_params.max_tokens == 3
    assert response.status == "incomplete" and response.incomplete_details is not None
    assert response.incomplete_details.reason == "max_output_tokens" and response.completed_at is None
    assert response.output_text == "Hello world!" and response.output[0].status == "incomplete"  # type: ignore
    assert response.output[0].id.startswith("msg_") and response.output[0].role == "assistant"  # type: ignore
    assert response.usage is not None and response.usage.output_tokens == 3
    assert response.usage.input_tokens == len(request.prompt_token_ids)
    assert response.usage.total_tokens == response.usage.input_tokens + 3
    assert response.usage.input_tokens_details.cached_tokens == len(request.prompt_token_ids) // 2
    assert (response.model, response.metadata, response.user, response.max_output_tokens) == \
        (SERVED_NAME, {"k": "v"}, "u1", 3)
    assert response.temperature == 0.7 and response.top_p == 0.9  # the model's generation_config.json
    assert (response.tool_choice, response.tools, response.parallel_tool_calls) == ("auto", [], True)
    assert raw["text"] == {"format": {"type": "text"}} and raw["store"] is False


def test_completed_when_the_model_stops(client: openai.OpenAI, core: FakeCore) -> None:
    core.script = lambda request: ([11, 12, 2], "stop", 2)
    try:
        response = client.responses.create(model=SERVED_NAME, input="hi")
    finally:
        core.script = None
    assert response.status == "completed" and response.incomplete_details is None
    assert response.completed_at is not None and response.output[0].status == "completed"  # type: ignore
    assert core.requests[-1].sampling_params.max_tokens == MAX_MODEL_LEN - len(core.requests[-1].prompt_token_ids)


def test_stream_event_order(http: httpx.Client) -> None:
    events = stream_events(http, {"model": SERVED_NAME, "input": "hi", "max_output_tokens": 6, "stream": True})
    text = check_event_sequence(events, final="response.incomplete")
    assert text == "Hello world! Ün" and len(events) > 9
    assert events[2]["item"]["status"] == "in_progress" and events[2]["item"]["content"] == []
    assert events[3]["part"] == {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
    assert events[-2]["item"]["status"] == "incomplete"


def test_stream_with_the_client_and_a_completed_finish(client: openai.OpenAI, core: FakeCore) -> None:
    core.script = lambda request: ([11, 12, 2], "stop", 2)
    try:
        events = list(client.responses.create(model=SERVED_NAME, input="hi", stream=True))
    finally:
        core.script = None
    check_event_sequence([event.model_dump(mode="json", exclude_unset=True) for event in events])
    assert events[-1].type == "response.completed" and events[-1].response.status == "completed"


def test_output_logprobs(http: httpx.Client, core: FakeCore) -> None:
    body = {"input": "hi", "max_output_tokens": 3, "include": ["message.output_text.logprobs"], "top_logprobs": 2}
    response = validate_response(http.post("/v1/responses", json=body).json())
    assert core.requests[-1].sampling_params.logprobs == 2
    logprobs = response.output[0].content[0].logprobs  # type: ignore[union-attr]
    assert logprobs is not None and [entry.token for entry in logprobs] == ["Hello", " world", "!"]
    assert logprobs[0].bytes == list(b"Hello") and len(logprobs[0].top_logprobs) == 2
    events = stream_events(http, {**body, "stream": True})
    check_event_sequence(events, final="response.incomplete")
    deltas = [event for event in events if event["type"] == "response.output_text.delta"]
    assert [entry["token"] for delta in deltas for entry in delta["logprobs"]] == ["Hello", " world", "!"]
    assert events[-4]["logprobs"][0]["top_logprobs"][0]["token"] == "Hello"


def test_async_client(frontend: FrontendHarness) -> None:
    import asyncio

    async def main() -> tuple[str, str]:
        client = openai.AsyncOpenAI(base_url=f"{frontend.base_url}/v1", api_key="unused", max_retries=0)
        whole = await client.responses.create(model=SERVED_NAME, input="hi", max_output_tokens=5)
        streamed = ""
        async for event in await client.responses.create(model=SERVED_NAME, input="hi", max_output_tokens=5,
                                                         stream=True):
            if event.type == "response.output_text.delta":
                streamed += event.delta
        await client.close()
        return whole.output_text, streamed

    whole, streamed = asyncio.run(main())
    assert whole == streamed == "Hello world! Ü"


# --------------------------------------------------------------------------- translation to the chat template


def test_input_items_become_chat_messages(templated: FrontendHarness, core: FakeCore) -> None:
    items = [
        {"role": "developer", "content": "D"},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "a"},
                                                         {"type": "input_text", "text": "b"}]},
        {"type": "message", "role": "assistant", "id": "msg_1", "status": "completed",
         "content": [{"type": "output_text", "text": "A", "annotations": []}]},
        {"type": "function_call", "call_id": "c1", "name": "get", "arguments": '{"x": 1}'},
        {"type": "function_call", "call_id": "c2", "name": "put", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "R1"},
        {"type": "function_call_output", "call_id": "c2", "output": [{"type": "input_text", "text": "R2"}]},
        {"type": "reasoning", "id": "rs_1", "summary": []},
        {"role": "user", "content": "next"},
    ]
    tools = [{"type": "function", "name": "get", "parameters": {"type": "object", "properties": {}}},
             {"type": "function", "name": "put", "description": "d", "strict": False}]
    response = templated.openai().responses.create(model=SERVED_NAME, input=items, instructions="I",  # type: ignore
                                                    tools=tools, max_output_tokens=1)  # type: ignore[arg-type]
    assert prompt_text(core.requests[-1]) == (
        'system:I;system:D;user:a\nb;assistant:A[c1=get({"x": 1})c2=put({})];'
        "tool:R1<c1/get>;tool:R2<c2/put>;user:next;tools=getput>")
    assert [tool.name for tool in response.tools] == ["get", "put"]  # type: ignore[union-attr]
    assert response.instructions == "I"


def test_function_calls_without_text_open_an_assistant_turn(templated: FrontendHarness, core: FakeCore) -> None:
    items = [{"role": "user", "content": "q"},
             {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
             {"type": "function_call_output", "call_id": "c1", "output": "out"}]
    templated.openai().responses.create(model=SERVED_NAME, input=items, max_output_tokens=1)  # type: ignore
    assert prompt_text(core.requests[-1]) == "user:q;assistant:[c1=f({})];tool:out<c1/f>;>"


def test_real_template_prompt_matches_chat(client: openai.OpenAI, core: FakeCore) -> None:
    client.chat.completions.create(model=SERVED_NAME, max_tokens=1, messages=[  # type: ignore[arg-type]
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}])
    chat_prompt = core.requests[-1].prompt_token_ids
    client.responses.create(model=SERVED_NAME, instructions="Be brief.", input="hi", max_output_tokens=1)
    assert core.requests[-1].prompt_token_ids == chat_prompt


def test_sampling_fields_and_vllm_extras(http: httpx.Client, core: FakeCore) -> None:
    body = {"input": "hi", "max_output_tokens": 2, "temperature": 0.3, "top_p": 0.5, "top_k": 7, "seed": 11,
            "repetition_penalty": 1.2, "priority": 3, "cache_salt": "s"}
    response = validate_response(http.post("/v1/responses", json=body).json())
    request = core.requests[-1]
    params = request.sampling_params
    assert (params.temperature, params.top_p, params.top_k, params.seed, params.repetition_penalty) == \
        (0.3, 0.5, 7, 11, 1.2)
    assert (request.priority, request.cache_salt) == (3, "s")
    assert (response.temperature, response.top_p) == (0.3, 0.5)


@pytest.mark.parametrize("fmt, spec", [
    ({"type": "json_object"}, StructuredOutputSpec("json_object")),
    ({"type": "json_schema", "name": "n", "schema": {"type": "object"}, "strict": True},
     StructuredOutputSpec("json", json.dumps({"type": "object"}))),
    ({"type": "text"}, None),
])
def test_text_format_becomes_the_structured_output_spec(http: httpx.Client, core: FakeCore, fmt: dict[str, Any],
                                                        spec: StructuredOutputSpec | None) -> None:
    raw = http.post("/v1/responses", json={"input": "hi", "max_output_tokens": 2, "text": {"format": fmt}}).json()
    response = validate_response(raw)
    assert core.requests[-1].sampling_params.structured_output == spec
    assert raw["text"]["format"] == fmt and response.text is not None


def test_tools_need_a_parser_as_in_chat(http: httpx.Client, core: FakeCore) -> None:
    tools = [{"type": "function", "name": "f"}]
    error = assert_error(http.post("/v1/responses", json={"input": "hi", "tools": tools}), 400)
    assert error["param"] == "tool_choice" and "--enable-auto-tool-choice" in error["message"]
    body = {"input": "hi", "tools": tools, "tool_choice": "none", "max_output_tokens": 1}
    assert validate_response(http.post("/v1/responses", json=body).json()).tool_choice == "none"


# --------------------------------------------------------------------------- tool calls in the output


def test_parsed_tool_calls_become_function_call_items(templated: FrontendHarness, core: FakeCore) -> None:
    core.script = answer("Let me check." + CALL + '<tool_call>\n{"name": "time", "arguments": {}}\n</tool_call>')
    try:
        with templated.http() as http:
            raw = http.post("/v1/responses", json={"input": "weather?", "tools": WEATHER}).json()
            events = stream_events(http, {"input": "weather?", "tools": WEATHER, "stream": True})
    finally:
        core.script = None
    response = validate_response(raw)
    assert response.status == "completed" and [item.type for item in response.output] == \
        ["message", "function_call", "function_call"]
    assert response.output_text == "Let me check."
    calls = [item for item in response.output if item.type == "function_call"]
    assert [(call.name, json.loads(call.arguments)) for call in calls] == [("weather", {"city": "Paris"}),
                                                                          ("time", {})]
    assert all(call.call_id.startswith("call_") and call.id and call.id.startswith("fc_") for call in calls)
    assert all(call.status == "completed" for call in calls)
    for event in events:
        validate_event(event)
    types = [event["type"] for event in events]
    assert [event["sequence_number"] for event in events] == list(range(len(events)))
    assert types[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert types[-1] == "response.completed"
    done_items = [event for event in events if event["type"] == "response.output_item.done"]
    assert [(event["output_index"], event["item"]["type"]) for event in done_items] == \
        [(0, "message"), (1, "function_call"), (2, "function_call")]
    for index in (1, 2):
        item_id = done_items[index]["item"]["id"]
        added = [e for e in events if e["type"] == "response.output_item.added" and e["output_index"] == index]
        assert len(added) == 1 and added[0]["item"]["arguments"] == "" and added[0]["item"]["status"] == "in_progress"
        deltas = "".join(e["delta"] for e in events
                         if e["type"] == "response.function_call_arguments.delta" and e["item_id"] == item_id)
        done = [e for e in events if e["type"] == "response.function_call_arguments.done" and e["item_id"] == item_id]
        assert json.loads(deltas) == json.loads(done[0]["arguments"]) == json.loads(done_items[index]["item"]["arguments"])
        # each item closes before the next one opens
        assert types.index("response.output_item.added", events.index(added[0])) == events.index(added[0])
    final = validate_response(events[-1]["response"])
    assert [item.type for item in final.output] == [item.type for item in response.output]


def test_only_a_tool_call_has_no_message(templated: FrontendHarness, core: FakeCore) -> None:
    core.script = answer(CALL)
    try:
        response = templated.openai().responses.create(model=SERVED_NAME, input="weather?",
                                                       tools=WEATHER, parallel_tool_calls=False)  # type: ignore
        events = list(templated.openai().responses.create(model=SERVED_NAME, input="weather?", stream=True,
                                                          tools=WEATHER))  # type: ignore[arg-type]
    finally:
        core.script = None
    assert [item.type for item in response.output] == ["function_call"] and response.output_text == ""
    assert [event.type for event in events] == [
        "response.created", "response.in_progress", "response.output_item.added"] + \
        ["response.function_call_arguments.delta"] * (len(events) - 6) + [
        "response.function_call_arguments.done", "response.output_item.done", "response.completed"]


@pytest.mark.parametrize("tool_choice, output, spec_kind", [
    ("required", '[{"name": "weather", "parameters": {"city": "Paris"}}]', "json"),
    ({"type": "function", "name": "weather"}, '{"city": "Paris"}', "json"),
])
def test_forced_tool_choice(templated: FrontendHarness, core: FakeCore, tool_choice: Any, output: str,
                            spec_kind: str) -> None:
    core.script = answer(output)
    try:
        with templated.http() as http:
            raw = http.post("/v1/responses", json={"input": "weather?", "tools": WEATHER,
                                                   "tool_choice": tool_choice}).json()
    finally:
        core.script = None
    response = validate_response(raw)
    spec = core.requests[-1].sampling_params.structured_output
    assert spec is not None and spec.kind == spec_kind  # the call is constrained by a schema
    calls = [item for item in response.output if item.type == "function_call"]
    assert [(call.name, json.loads(call.arguments)) for call in calls] == [("weather", {"city": "Paris"})]
    assert raw["tool_choice"] == tool_choice


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("overrides, status, param", [
    ({"input": [{"type": "input_image", "image_url": "x"}]}, 400, "input"),
    ({"input": [{"role": "robot", "content": "x"}]}, 400, "input"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, 400, "input"),
    ({"input": [{"type": "function_call", "name": "f"}]}, 400, "input"),
    ({"input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": "not json"}]}, 400, "input"),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, 400, "input"),
    ({"input": ["text"]}, 400, "input"),
    ({"input": []}, 400, "input"),
    ({"input": None}, 400, "input"),
    ({"tools": [{"type": "web_search"}]}, 400, "tools"),
    ({"tools": [{"type": "function"}]}, 400, "tools"),
    ({"tool_choice": {"type": "mcp"}}, 400, "tool_choice"),
    ({"text": {"format": {"type": "json_schema", "schema": {}}}}, 400, "text.format.name"),
    ({"text": {"format": {"type": "json_schema", "name": "n"}}}, 400, "text.format.schema"),
    ({"text": {"format": {"type": "xml"}}}, 400, "text.format.type"),
    ({"temperature": -1}, 400, "temperature"),
    ({"max_output_tokens": 0}, 400, "max_output_tokens"),
    ({"top_k": "many"}, 400, "top_k"),
    ({"previous_response_id": "resp_nope"}, 404, "previous_response_id"),
    ({"background": True}, 400, "background"),
    ({"model": "gpt-5"}, 404, "model"),
])
def test_invalid_requests(http: httpx.Client, overrides: dict[str, Any], status: int, param: str) -> None:
    error = assert_error(http.post("/v1/responses", json={"input": "hi", "max_output_tokens": 2, **overrides}),
                         status, param)
    if param in ("previous_response_id", "background"):
        assert "VLLM_ENABLE_RESPONSES_API_STORE=1" in error["message"]


def test_context_length_errors_name_the_field(http: httpx.Client) -> None:
    too_many = http.post("/v1/responses", json={"input": "hi", "max_output_tokens": MAX_MODEL_LEN})
    assert too_many.status_code == 400 and too_many.json()["error"]["param"] == "max_output_tokens"
    too_long = http.post("/v1/responses", json={"input": "hi " * MAX_MODEL_LEN})
    assert too_long.status_code == 400 and too_long.json()["error"]["param"] == "input"


def test_store_off_get_cancel_delete_are_404(http: httpx.Client, client: openai.OpenAI) -> None:
    response = client.responses.create(model=SERVED_NAME, input="hi", max_output_tokens=1, store=True)
    for method, path in [("GET", ""), ("POST", "/cancel"), ("DELETE", "")]:
        error = assert_error(http.request(method, f"/v1/responses/{response.id}{path}"), 404)
        assert "store is disabled" in error["message"] and "VLLM_ENABLE_RESPONSES_API_STORE=1" in error["message"]
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(response.id)


def test_engine_failure_mid_stream_is_an_error_event_then_failed(http: httpx.Client, core: FakeCore) -> None:
    core.error_message = "boom"
    try:
        events = stream_events(http, {"input": "hi", "max_output_tokens": 2, "stream": True})
        plain = http.post("/v1/responses", json={"input": "hi", "max_output_tokens": 2})
    finally:
        core.error_message = None
    assert [event["type"] for event in events][-2:] == ["error", "response.failed"]
    assert events[-2]["message"] == "boom" and events[-1]["response"]["error"]["code"] == "server_error"
    validate_response(events[-1]["response"])
    assert_error(plain, 500, contains="boom")
