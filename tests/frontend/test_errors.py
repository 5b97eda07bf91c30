"""Every error status and the OpenAI error shape; API keys."""
from __future__ import annotations

from typing import Any

import httpx
import openai
import pytest

from tests.frontend.conftest import MAX_MODEL_LEN, SERVED_NAME, FrontendHarness
from tests.frontend.fake_core import FakeCore

COMPLETION = {"model": SERVED_NAME, "prompt": "hi", "max_tokens": 2}
CHAT = {"model": SERVED_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def assert_error(response: httpx.Response, status: int, param: str | None = None, *,
                 error_type: str | None = None, code: Any = None, contains: str = "") -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"] and "Traceback" not in error["message"]
    assert contains in error["message"]
    if param is not None:
        assert error["param"] == param and param in error["message"]
    if error_type is not None:
        assert error["type"] == error_type
    if code is not None:
        assert error["code"] == code
    return dict(error)


@pytest.mark.parametrize("path, overrides, param", [
    ("/v1/completions", {"temperature": -1}, "temperature"),
    ("/v1/completions", {"top_p": 0}, "top_p"),
    ("/v1/completions", {"top_p": 1.5}, "top_p"),
    ("/v1/completions", {"n": 0}, "n"),
    ("/v1/completions", {"max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {"n": "many"}, "n"),
    ("/v1/completions", {"logprobs": 99}, "logprobs"),
    ("/v1/completions", {"stop": 5}, "stop"),
    ("/v1/completions", {"prompt": []}, "prompt"),
    ("/v1/completions", {"prompt": [[1], []]}, "prompt"),
    ("/v1/completions", {"best_of": 3}, "best_of"),
    ("/v1/completions", {"prompt": [10**9]}, "prompt"),
    ("/v1/completions", {"stop_token_ids": [-1]}, "stop_token_ids"),
    ("/v1/completions", {"logit_bias": {"abc": 1}}, "logit_bias"),
    ("/v1/chat/completions", {"temperature": -0.1}, "temperature"),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {"messages": "hi"}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     "messages"),  # text-only model: the whole messages parameter is named, the message says which part
    ("/v1/chat/completions", {"messages": [{"content": "no role"}]}, "messages.0.role"),
    ("/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs"),
    ("/v1/chat/completions", {"max_completion_tokens": 0}, "max_completion_tokens"),
])
def test_invalid_values_are_400(http: httpx.Client, path: str, overrides: dict[str, Any], param: str | None) -> None:
    base = COMPLETION if path == "/v1/completions" else CHAT
    assert_error(http.post(path, json={**base, **overrides}), 400, param, error_type="BadRequestError", code=400)


def test_malformed_json_and_missing_body(http: httpx.Client) -> None:
    headers = {"content-type": "application/json"}
    assert_error(http.post("/v1/completions", content=b'{"prompt": ', headers=headers), 400, contains="JSON")
    assert_error(http.post("/v1/chat/completions", content=b"", headers=headers), 400)
    assert_error(http.post("/v1/completions", json={"model": SERVED_NAME}), 400, "prompt")


def test_context_length(http: httpx.Client) -> None:
    error = assert_error(http.post("/v1/completions", json={**COMPLETION, "max_tokens": MAX_MODEL_LEN}), 400,
                         contains=f"maximum context length is {MAX_MODEL_LEN} tokens")
    assert error["param"] == "max_tokens"
    long_prompt = "hello " * (MAX_MODEL_LEN + 10)
    assert_error(http.post("/v1/chat/completions", json={**CHAT, "messages": [{"role": "user", "content": long_prompt}],
                                                         "max_tokens": None}),
                 400, contains="maximum context length")


def test_unknown_model_is_404(http: httpx.Client, client: openai.OpenAI) -> None:
    for path, body in (("/v1/completions", COMPLETION), ("/v1/chat/completions", CHAT)):
        assert_error(http.post(path, json={**body, "model": "gpt-9"}), 404, "model", error_type="NotFoundError",
                     code="model_not_found")
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x")


def test_openai_client_raises_bad_request(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=SERVED_NAME, prompt="x", temperature=-1)
    assert info.value.param == "temperature"  # type: ignore[attr-defined]


def test_unknown_route_and_method(http: httpx.Client) -> None:
    assert_error(http.get("/v1/nothing"), 404, error_type="NotFoundError")
    assert_error(http.get("/v1/completions"), 405)


def test_engine_error_finish_is_500_or_400(http: httpx.Client, core: FakeCore) -> None:
    core.error_message = "worker exploded"
    try:
        assert_error(http.post("/v1/completions", json=COMPLETION), 500, error_type="InternalServerError",
                     contains="worker exploded")
        core.error_message = "the prompt has 900 tokens, more than the maximum context length of 256 tokens"
        assert_error(http.post("/v1/chat/completions", json=CHAT), 400, contains="maximum context length")
        core.error_message = "worker exploded"
        with http.stream("POST", "/v1/completions", json={**COMPLETION, "stream": True}) as response:
            assert response.status_code == 200
            lines = [line for line in response.iter_lines() if line]
        assert '"worker exploded"' in lines[0] and '"InternalServerError"' in lines[0]
        assert lines[-1] == "data: [DONE]"
    finally:
        core.error_message = None


@pytest.fixture(scope="module")
def keyed(core: FakeCore) -> Any:
    harness = FrontendHarness(core, api_key="sekret")
    yield harness
    harness.stop()


def test_api_key(keyed: FrontendHarness) -> None:
    with keyed.http() as http:
        assert_error(http.post("/v1/completions", json=COMPLETION), 401, error_type="AuthenticationError",
                     code="invalid_api_key")
        assert_error(http.get("/v1/models", headers={"Authorization": "Bearer wrong"}), 401)
        assert http.get("/v1/models", headers={"Authorization": "Bearer sekret"}).status_code == 200
        assert http.get("/health").status_code == 200  # open: probes, /version, /metrics
        assert http.get("/metrics").status_code == 200
        assert_error(http.post("/tokenize", json={"prompt": "x"}), 401)  # every model route needs the key
        assert http.post("/tokenize", json={"prompt": "x"}, headers={"Authorization": "Bearer sekret"}).status_code == 200
    with pytest.raises(openai.AuthenticationError):
        keyed.openai(api_key="wrong").models.list()
    assert keyed.openai(api_key="sekret").completions.create(model=SERVED_NAME, prompt="x", max_tokens=1).choices


def test_api_key_from_environment(core: FakeCore, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLLM_API_KEY", "envkey")
    harness = FrontendHarness(core)
    try:
        with harness.http() as http:
            assert http.get("/v1/models").status_code == 401
            assert http.get("/v1/models", headers={"Authorization": "Bearer envkey"}).status_code == 200
    finally:
        harness.stop()
