"""/v1/responses with the store on (VLLM_ENABLE_RESPONSES_API_STORE=1), through a real HTTP server against a slow
fake engine core: GET, previous_response_id (also carrying a tool call's result), background responses, cancel,
resuming a stream, DELETE, and the store's own bound."""
from __future__ import annotations

from typing import Iterator

import httpx
import pytest

from frontend.generate.responses.store import STORE_ENV, ResponseObject, ResponseStore, StoredResponse
from tests.frontend.conftest import SERVED_NAME, FrontendHarness, canned_token_ids
from tests.frontend.fake_core import FakeCore
from tests.frontend.generate.responses.serving_harness import (CALL, TEMPLATE, TOOL_PARSING, WEATHER, answer,
                                                               assert_error, prompt_text, stream_events)
from tests.responses_validation import check_event_sequence, validate_response


@pytest.fixture(scope="module")
def slow_core() -> Iterator[FakeCore]:
    fake = FakeCore(canned_token_ids(), token_interval_s=0.02)
    yield fake
    fake.close()


@pytest.fixture(scope="module")
def stored(slow_core: FakeCore) -> Iterator[FrontendHarness]:
    """A frontend started with the store on (the variable is read when the app is built)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(STORE_ENV, "1")
        harness = FrontendHarness(slow_core, chat_template=TEMPLATE, frontend_options=TOOL_PARSING)
    yield harness
    harness.stop()


@pytest.fixture()
def stored_http(stored: FrontendHarness) -> Iterator[httpx.Client]:
    with stored.http() as session:
        yield session


# --------------------------------------------------------------------------- a tool result by previous_response_id


def test_tool_round_trip_with_previous_response_id(stored: FrontendHarness, slow_core: FakeCore) -> None:
    client = stored.openai()
    slow_core.script = answer(CALL)
    try:
        first = client.responses.create(model=SERVED_NAME, input="weather?", tools=WEATHER)  # type: ignore
    finally:
        slow_core.script = None
    call = first.output[0]
    assert call.type == "function_call"
    client.responses.create(model=SERVED_NAME, previous_response_id=first.id, tools=WEATHER,  # type: ignore
                            max_output_tokens=1, input=[{"type": "function_call_output", "call_id": call.call_id,
                                                         "output": "sunny"}])
    assert prompt_text(slow_core.requests[-1]) == (
        f'user:weather?;assistant:[{call.call_id}=weather({{"city": "Paris"}})];'
        f"tool:sunny<{call.call_id}/weather>;tools=weathertime>")


# --------------------------------------------------------------------------- the store


def test_stored_response_get_and_continue(stored: FrontendHarness, stored_http: httpx.Client,
                                          slow_core: FakeCore) -> None:
    client = stored.openai()
    first = client.responses.create(model=SERVED_NAME, input="q1", instructions="I1", max_output_tokens=2)
    got = stored_http.get(f"/v1/responses/{first.id}").json()
    assert validate_response(got) == first and got["store"] is True
    assert client.responses.retrieve(first.id) == first
    second = client.responses.create(model=SERVED_NAME, input="q2", instructions="I2", max_output_tokens=2,
                                     previous_response_id=first.id)
    assert second.previous_response_id == first.id
    # the previous instructions are not carried over (OpenAI); its input and output are
    assert prompt_text(slow_core.requests[-1]) == "system:I2;user:q1;assistant:Hello world;user:q2;>"
    third = client.responses.create(model=SERVED_NAME, input=[{"role": "user", "content": "q3"}],
                                    max_output_tokens=1, previous_response_id=second.id)
    assert prompt_text(slow_core.requests[-1]) == \
        "user:q1;assistant:Hello world;user:q2;assistant:Hello world;user:q3;>"
    unstored = client.responses.create(model=SERVED_NAME, input="x", max_output_tokens=1, store=False)
    assert_error(stored_http.get(f"/v1/responses/{unstored.id}"), 404, contains="not found")
    assert_error(stored_http.post("/v1/responses", json={"input": "x", "previous_response_id": unstored.id}),
                 404, "previous_response_id")
    assert_error(stored_http.post(f"/v1/responses/{third.id}/cancel"), 400, contains="background")
    assert stored_http.delete(f"/v1/responses/{third.id}").json() == \
        {"id": third.id, "object": "response", "deleted": True}
    assert_error(stored_http.get(f"/v1/responses/{third.id}"), 404)


def test_stored_streamed_response(stored: FrontendHarness, stored_http: httpx.Client) -> None:
    events = stream_events(stored_http, {"input": "hi", "max_output_tokens": 3, "stream": True})
    check_event_sequence(events, final="response.incomplete")
    got = validate_response(stored_http.get(f"/v1/responses/{events[0]['response']['id']}").json())
    assert got.output_text == "Hello world!"
    assert_error(stored_http.get(f"/v1/responses/{got.id}", params={"stream": "true"}), 400, "stream")


def test_background_cancel(stored: FrontendHarness, stored_http: httpx.Client, slow_core: FakeCore) -> None:
    client = stored.openai()
    queued = client.responses.create(model=SERVED_NAME, input="long", background=True)  # ~200 tokens, slow core
    assert queued.status in ("queued", "in_progress") and queued.background is True
    engine_id = f"{queued.id}-0"
    assert slow_core.wait_for(lambda: any(r.request_id == engine_id for r in slow_core.requests))
    cancelled = client.responses.cancel(queued.id)
    assert cancelled.status == "cancelled"
    assert slow_core.wait_for(lambda: engine_id in slow_core.aborted)
    assert client.responses.retrieve(queued.id).status == "cancelled"
    assert client.responses.cancel(queued.id).status == "cancelled"  # idempotent
    validate_response(stored_http.get(f"/v1/responses/{queued.id}").json())


def test_background_completes(stored: FrontendHarness, stored_http: httpx.Client, slow_core: FakeCore) -> None:
    client = stored.openai()
    queued = client.responses.create(model=SERVED_NAME, input="x", background=True, max_output_tokens=3)
    assert slow_core.wait_for(lambda: client.responses.retrieve(queued.id).status == "incomplete", timeout_s=30)
    done = validate_response(stored_http.get(f"/v1/responses/{queued.id}").json())
    assert done.output_text == "Hello world!" and done.usage is not None and done.usage.output_tokens == 3
    assert_error(stored_http.post(f"/v1/responses/{queued.id}/cancel"), 400, contains="already incomplete")


def test_background_stream_and_resume(stored_http: httpx.Client) -> None:
    events = stream_events(stored_http, {"input": "x", "background": True, "stream": True, "max_output_tokens": 3})
    check_event_sequence(events, final="response.incomplete")
    assert events[0]["response"]["status"] == "queued" and events[0]["response"]["background"] is True
    response_id = events[0]["response"]["id"]
    replayed = stream_events(stored_http, {"stream": "true"}, f"/v1/responses/{response_id}", "GET")
    assert replayed == events
    resumed = stream_events(stored_http, {"stream": "true", "starting_after": 3}, f"/v1/responses/{response_id}",
                            "GET")
    assert resumed == events[4:]


def test_background_with_store_false_is_400(stored_http: httpx.Client) -> None:
    assert_error(stored_http.post("/v1/responses", json={"input": "x", "background": True, "store": False}),
                 400, "background")


def test_store_is_a_bounded_lru() -> None:
    store = ResponseStore(enabled=True, capacity=2)

    def entry(response_id: str, finished: bool = True) -> StoredResponse:
        return StoredResponse(ResponseObject({"id": response_id}), [], finished=finished)

    store.put(entry("a", finished=False))  # running: never evicted
    store.put(entry("b"))
    store.get("b")
    store.put(entry("c"))
    assert store.get("a") is not None and store.get("b") is None and store.get("c") is not None
    disabled = ResponseStore(enabled=False)
    disabled.put(entry("a"))
    assert len(disabled) == 0
