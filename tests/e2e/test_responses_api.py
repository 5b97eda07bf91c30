"""The Responses API end to end on real processes with the official `openai` client (sync and async, streamed
and not), every response and event validated against `openai.types.responses` (strict, no unknown fields)."""
from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import openai
import pytest
from openai.types.responses import Response

from frontend.generate.responses.store import STORE_ENV
from tests.responses_validation import check_event_sequence, parse_sse, validate_response
from tests.server_harness import ConveyorServer

MODEL = "tiny-llama"
QUESTION = "Name three colors."


@pytest.fixture(scope="module")
def store_server(tiny_models: Path) -> Iterator[ConveyorServer]:
    """The tiny Llama with the response store on (VLLM_ENABLE_RESPONSES_API_STORE=1) and tool parsing."""
    server = ConveyorServer(str(tiny_models / "llama"), "--served-model-name", MODEL, "--max-model-len", "2048",
                            "--kv-cache-memory", "64MiB", "--enable-auto-tool-choice", "--tool-call-parser",
                            "hermes", env={STORE_ENV: "1"})
    yield server
    server.stop()


def create(client: openai.OpenAI, **kwargs: Any) -> Response:
    """responses.create, with the raw JSON validated strictly as well as the client's parse."""
    raw = client.responses.with_raw_response.create(**kwargs)
    validated = validate_response(raw.http_response.json())
    parsed = raw.parse()
    assert parsed == validated
    return parsed


def events_as_dicts(events: list[Any]) -> list[dict[str, Any]]:
    return [event.model_dump(mode="json", exclude_unset=True) for event in events]


def wait_finished(client: openai.OpenAI, response_id: str) -> Response:
    deadline = time.monotonic() + 120  # a guard against hanging, not a timing assertion
    while time.monotonic() < deadline:
        response = client.responses.retrieve(response_id)
        if response.status not in ("queued", "in_progress"):
            return response
        time.sleep(0.05)
    raise AssertionError(f"response {response_id} did not finish")


# --------------------------------------------------------------------------- generation (store off)


def test_response_matches_chat_greedy(llama_server: ConveyorServer) -> None:
    client = llama_server.openai_client()
    chat = client.chat.completions.create(model=MODEL, temperature=0, max_tokens=16, messages=[
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": QUESTION}])
    response = create(client, model=MODEL, instructions="Be brief.", input=QUESTION, temperature=0,
                      max_output_tokens=16)
    assert response.output_text == chat.choices[0].message.content
    assert response.usage is not None and chat.usage is not None
    assert response.usage.input_tokens == chat.usage.prompt_tokens
    assert response.usage.output_tokens == chat.usage.completion_tokens
    expected_status = "incomplete" if chat.choices[0].finish_reason == "length" else "completed"
    assert response.status == expected_status and response.model == MODEL and response.temperature == 0


def test_max_output_tokens_is_incomplete(llama_server: ConveyorServer) -> None:
    response = create(llama_server.openai_client(), model=MODEL, input=QUESTION, max_output_tokens=3,
                      extra_body={"ignore_eos": True})
    assert response.status == "incomplete" and response.incomplete_details is not None
    assert response.incomplete_details.reason == "max_output_tokens"
    assert response.usage is not None and response.usage.output_tokens == 3


def test_stream_events_and_sse_framing(llama_server: ConveyorServer) -> None:
    client = llama_server.openai_client()
    whole = create(client, model=MODEL, input=QUESTION, temperature=0, max_output_tokens=12)
    final = f"response.{whole.status}"
    events = list(client.responses.create(model=MODEL, input=QUESTION, temperature=0, max_output_tokens=12,
                                          stream=True))
    assert check_event_sequence(events_as_dicts(events), final) == whole.output_text
    body = {"model": MODEL, "input": QUESTION, "temperature": 0, "max_output_tokens": 12, "stream": True}
    with httpx.stream("POST", f"{llama_server.base_url}/v1/responses", json=body, timeout=60) as http:
        assert http.headers["content-type"].startswith("text/event-stream")
        raw = parse_sse(http.iter_lines())  # every `event:` line names its data's type; no [DONE]
    assert check_event_sequence(raw, final) == whole.output_text


def test_async_client(llama_server: ConveyorServer) -> None:
    async def main() -> tuple[Response, list[Any]]:
        client = llama_server.async_openai_client()
        whole = await client.responses.create(model=MODEL, input=QUESTION, temperature=0, max_output_tokens=10)
        stream = await client.responses.create(model=MODEL, input=QUESTION, temperature=0, max_output_tokens=10,
                                               stream=True)
        events = [event async for event in stream]
        await client.close()
        return whole, events

    whole, events = asyncio.run(main())
    validate_response(whole.model_dump(mode="json", exclude_unset=True))
    assert check_event_sequence(events_as_dicts(events), f"response.{whole.status}") == whole.output_text


def test_input_items_match_the_equivalent_chat(llama_server: ConveyorServer) -> None:
    client = llama_server.openai_client()
    items: list[Any] = [
        {"role": "developer", "content": "Answer tersely."},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Weather in Paris?"}]},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Checking.",
                                                               "annotations": []}]},
        {"type": "function_call", "call_id": "call_1", "name": "weather", "arguments": '{"city": "Paris"}'},
        {"type": "function_call_output", "call_id": "call_1", "output": "sunny, 21C"},
    ]
    response = create(client, model=MODEL, input=items, temperature=0, max_output_tokens=10)
    chat = client.chat.completions.create(model=MODEL, temperature=0, max_tokens=10, messages=[
        {"role": "system", "content": "Answer tersely."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "Checking.", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21C"}])
    assert response.usage is not None and chat.usage is not None
    assert response.usage.input_tokens == chat.usage.prompt_tokens
    assert response.output_text == chat.choices[0].message.content


def test_tools_follow_the_servers_tool_settings(llama_server: ConveyorServer, store_server: ConveyorServer) -> None:
    tools: list[Any] = [{"type": "function", "name": "weather", "description": "Current weather",
                         "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}]
    with pytest.raises(openai.BadRequestError, match="enable-auto-tool-choice") as no_parser:
        llama_server.openai_client(max_retries=0).responses.create(model=MODEL, input="hi", tools=tools)
    assert no_parser.value.body["param"] == "tool_choice"  # type: ignore[index]
    # started with --enable-auto-tool-choice --tool-call-parser hermes: the random model writes no call
    response = create(store_server.openai_client(), model=MODEL, input="Weather in Paris?", tools=tools,
                      max_output_tokens=8)
    assert [tool.name for tool in response.tools] == ["weather"]  # type: ignore[union-attr]
    assert response.tool_choice == "auto" and response.output[0].type == "message"


def test_text_format_is_accepted_and_echoed(llama_server: ConveyorServer) -> None:
    schema = {"type": "object", "properties": {"color": {"type": "string"}}, "required": ["color"]}
    response = create(llama_server.openai_client(), model=MODEL, input=QUESTION, max_output_tokens=8,
                      text={"format": {"type": "json_schema", "name": "color", "schema": schema, "strict": True}})
    assert response.text is not None and response.text.format is not None
    assert response.text.format.type == "json_schema"
    assert response.text.format.schema_ == schema  # type: ignore[union-attr]


def test_errors_without_the_store(llama_server: ConveyorServer) -> None:
    client = llama_server.openai_client(max_retries=0)
    stored = create(client, model=MODEL, input="hi", max_output_tokens=2, store=True)  # accepted, not stored
    assert stored.model_extra is not None and stored.model_extra["store"] is False
    with pytest.raises(openai.NotFoundError, match="store is disabled"):
        client.responses.retrieve(stored.id)
    with pytest.raises(openai.NotFoundError) as not_found:
        client.responses.create(model=MODEL, input="hi", previous_response_id="resp_missing")
    assert not_found.value.body["param"] == "previous_response_id"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as bad_item:
        client.responses.create(model=MODEL, input=[{"type": "input_image", "image_url": "x"}])  # type: ignore
    assert bad_item.value.body["param"] == "input"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError, match="VLLM_ENABLE_RESPONSES_API_STORE"):
        client.responses.create(model=MODEL, input="hi", background=True)


# --------------------------------------------------------------------------- the store


def test_store_get_and_previous_response_id(store_server: ConveyorServer) -> None:
    client = store_server.openai_client(max_retries=0)
    first = create(client, model=MODEL, input="My name is Ada.", temperature=0, max_output_tokens=6)
    got = client.responses.retrieve(first.id)
    assert got == first and validate_response(got.model_dump(mode="json", exclude_unset=True)) == first
    second = create(client, model=MODEL, input="What is my name?", temperature=0, max_output_tokens=6,
                    previous_response_id=first.id)
    assert second.previous_response_id == first.id
    alone = create(client, model=MODEL, input="What is my name?", temperature=0, max_output_tokens=6, store=False)
    assert first.usage is not None and second.usage is not None and alone.usage is not None
    # the second prompt holds the first exchange: more tokens than the question alone by at least its output
    assert second.usage.input_tokens >= alone.usage.input_tokens + first.usage.output_tokens
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(alone.id)
    with pytest.raises(openai.BadRequestError, match="background"):
        client.responses.cancel(first.id)  # a finished, synchronous response
    streamed = list(client.responses.create(model=MODEL, input="hi", max_output_tokens=4, stream=True))
    assert client.responses.retrieve(streamed[0].response.id).status in ("completed", "incomplete")  # type: ignore


def test_background_cancel_and_completion(store_server: ConveyorServer) -> None:
    client = store_server.openai_client(max_retries=0)
    running = create(client, model=MODEL, input="Tell me a long story.", background=True, max_output_tokens=1900,
                     extra_body={"ignore_eos": True})
    assert running.status in ("queued", "in_progress") and running.background is True
    cancelled = client.responses.cancel(running.id)
    assert cancelled.status == "cancelled"
    assert client.responses.retrieve(running.id).status == "cancelled"
    done = create(client, model=MODEL, input="hi", background=True, max_output_tokens=5,
                  extra_body={"ignore_eos": True})
    finished = wait_finished(client, done.id)
    validate_response(finished.model_dump(mode="json", exclude_unset=True))
    assert finished.status == "incomplete" and finished.usage is not None and finished.usage.output_tokens == 5
    with pytest.raises(openai.BadRequestError, match="already incomplete"):
        client.responses.cancel(done.id)


def test_background_stream_and_resume(store_server: ConveyorServer) -> None:
    client = store_server.openai_client(max_retries=0)
    events = events_as_dicts(list(client.responses.create(model=MODEL, input="hi", background=True, stream=True,
                                                          max_output_tokens=6, extra_body={"ignore_eos": True})))
    text = check_event_sequence(events, "response.incomplete")
    resumed = events_as_dicts(list(client.responses.retrieve(events[0]["response"]["id"], stream=True,
                                                             starting_after=3)))
    assert resumed == events[4:] and "".join(event.get("delta", "") for event in resumed) == text


def test_smollm2_answers_sensibly() -> None:
    server = ConveyorServer(None, "--kv-cache-memory", "256MiB", "--max-model-len", "1024")
    try:
        response = create(server.openai_client(), model="SmolLM2-135M-Instruct", temperature=0,
                          input="What is the capital of France?", max_output_tokens=20)
    finally:
        server.stop()
    assert "Paris" in response.output_text
