"""Shared pieces of the /v1/responses serving tests (tests/frontend/generate/responses/test_*.py): a chat template
that shows what reaches it, fake-core scripts, and readers of errors, prompts and event streams.
"""
from __future__ import annotations

from typing import Any, Callable

import httpx

from engine_core.protocol import EngineCoreRequest
from frontend.tokenizer import TokenizerInfo
from tests.frontend.conftest import model_dir
from tests.responses_validation import parse_sse

# Shows what reaches the template: roles, contents, tool calls, tool results, tools.
TEMPLATE = ("{% for m in messages %}{{ m.role }}:{{ m.content }}"
            "{% if m.tool_calls %}[{% for c in m.tool_calls %}{{ c.id }}={{ c.function.name }}"
            "({{ c.function.arguments | tojson }}){% endfor %}]{% endif %}"
            "{% if m.tool_call_id %}<{{ m.tool_call_id }}/{{ m.name }}>{% endif %};{% endfor %}"
            "{% if tools %}tools={% for t in tools %}{{ t.function.name }}{% endfor %}{% endif %}"
            "{% if add_generation_prompt %}>{% endif %}")


TOOL_PARSING = {"enable_auto_tool_choice": True, "tool_call_parser": "hermes"}  # as the serve flags set it


def answer(text: str) -> Callable[[EngineCoreRequest], tuple[list[int], str, int]]:
    """A fake-core script: the model writes `text`, then EOS."""
    token_ids = TokenizerInfo(str(model_dir("llama"))).encode(text, add_special_tokens=False)
    return lambda request: (token_ids + [2], "stop", 2)


def assert_error(response: httpx.Response, status: int, param: str | None = None, *,
                 contains: str = "") -> dict[str, Any]:
    """The OpenAI error shape; a named `param` also appears in the message."""
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert contains in error["message"] and "Traceback" not in error["message"]
    if param is not None:
        assert error["param"] == param and param in error["message"], error
    return error


def prompt_text(request: EngineCoreRequest) -> str:
    return TokenizerInfo(str(model_dir("llama"))).decode(request.prompt_token_ids, False)


def stream_events(http: httpx.Client, body: dict[str, Any], path: str = "/v1/responses",
                  method: str = "POST") -> list[dict[str, Any]]:
    kwargs: dict[str, Any] = {"json": body} if method == "POST" else {"params": body}
    with http.stream(method, path, **kwargs) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        return parse_sse(response.iter_lines())



# Tools of the tool-call tests, and a hermes call of the first one.
WEATHER = [{"type": "function", "name": "weather", "parameters": {"type": "object",
                                                                  "properties": {"city": {"type": "string"}}}},
           {"type": "function", "name": "time", "parameters": {"type": "object", "properties": {}}}]
CALL = '<tool_call>\n{"name": "weather", "arguments": {"city": "Paris"}}\n</tool_call>'
