"""Structured outputs end to end: vLLM's `structured_outputs` and OpenAI's `response_format` on real servers.

The tiny Llama has random weights, so unconstrained output is garbage: at temperature 1 every one of 50 samples
per case must still parse and validate, via completions and chat, streamed and not (the streamed text, joined,
must be valid too). Seeds make the samples repeatable. SmolLM2 must answer a response_format json_schema chat with
sensible JSON. Bad specs are 400s naming the field, and the server goes on serving.
"""
from __future__ import annotations

import json
import re
from collections import defaultdict
from typing import Any, Callable, Iterator

import httpx
import pytest

from tests.server_harness import ConveyorServer

MODEL = "tiny-llama"
SAMPLES = 50

PERSON_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "color": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 10}, "maxItems": 3},
    },
    "required": ["name", "age", "color", "tags"],
    "additionalProperties": False,
}
PHONE = r"\d{3}-\d{4}"
CHOICES = ["alpha", "beta", "gamma", "delta"]
ARITHMETIC = """start: expr
expr: term (("+" | "-") term)*
term: NUMBER | "(" expr ")"
NUMBER: /[0-9]{1,3}/
"""
# Random weights write endless strings; lifting '"', '}' and '"}' ends them sooner, and banning the one token "{}"
# keeps the chat samples from all being that. The mask still decides what is allowed (a bias cannot lift a masked
# token), so validity is the grammar's doing.
JSON_OBJECT_BIAS = {"18": 8, "109": 4, "23597": 8, "6150": -100}


def check_person(text: str) -> None:
    value = json.loads(text)
    try:
        import jsonschema
    except ImportError:  # by hand, for this schema
        assert set(value) == set(PERSON_SCHEMA["required"]), value
        assert isinstance(value["name"], str) and len(value["name"]) <= 20
        assert isinstance(value["age"], int) and 0 <= value["age"] <= 150
        assert value["color"] in ("red", "green", "blue")
        assert isinstance(value["tags"], list) and len(value["tags"]) <= 3
        assert all(isinstance(tag, str) and len(tag) <= 10 for tag in value["tags"])
    else:
        jsonschema.validate(value, PERSON_SCHEMA)


def check_phone(text: str) -> None:
    assert re.fullmatch(r"[0-9]{3}-[0-9]{4}", text), text


def check_choice(text: str) -> None:
    assert text in CHOICES, text


def check_arithmetic(text: str) -> None:
    """Recursive descent over the ARITHMETIC grammar; the whole text must be one expr."""
    position = 0

    def expr() -> None:
        nonlocal position
        term()
        while position < len(text) and text[position] in "+-":
            position += 1
            term()

    def term() -> None:
        nonlocal position
        if position < len(text) and text[position] == "(":
            position += 1
            expr()
            assert text[position:position + 1] == ")", text
            position += 1
            return
        digits = re.match(r"[0-9]{1,3}", text[position:])
        assert digits, text
        position += digits.end()

    expr()
    assert position == len(text), text


def check_json_object(text: str) -> None:
    assert isinstance(json.loads(text), dict), text


CASES: dict[str, tuple[dict[str, Any], Callable[[str], None], dict[str, Any]]] = {
    "json": ({"structured_outputs": {"json": PERSON_SCHEMA}}, check_person, {}),
    "regex": ({"structured_outputs": {"regex": PHONE}}, check_phone, {}),
    "choice": ({"structured_outputs": {"choice": CHOICES}}, check_choice, {}),
    "grammar": ({"structured_outputs": {"grammar": ARITHMETIC}}, check_arithmetic, {}),
    "json_object": ({"response_format": {"type": "json_object"}}, check_json_object,
                    {"logit_bias": JSON_OBJECT_BIAS}),
}


def sample(server: ConveyorServer, endpoint: str, stream: bool, fields: dict[str, Any],
           n: int = SAMPLES) -> list[tuple[str, str | None]]:
    """(text, finish_reason) of `n` samples at temperature 1, joined from the stream when streaming."""
    client = server.openai_client(timeout=600)
    common: dict[str, Any] = dict(model=MODEL, n=n, max_tokens=440, temperature=1.0, top_p=1.0, seed=1234,
                                  stream=stream)
    # response_format is a named argument of chat.completions only; everything else rides in extra_body
    if endpoint == "chat":
        create: Callable[..., Any] = client.chat.completions.create
        common["messages"] = [{"role": "user", "content": "Answer in the requested format."}]
    else:
        create = client.completions.create
        common["prompt"] = "Answer:"
    result = create(**common, extra_body=fields)
    if not stream:
        return [((c.message.content if endpoint == "chat" else c.text), c.finish_reason)
                for c in sorted(result.choices, key=lambda c: c.index)]
    texts: dict[int, list[str]] = defaultdict(list)
    finish: dict[int, str | None] = {}
    for chunk in result:
        for choice in chunk.choices:
            piece = choice.delta.content if endpoint == "chat" else choice.text
            texts[choice.index].append(piece or "")
            if choice.finish_reason is not None:
                finish[choice.index] = choice.finish_reason
    return [("".join(texts[i]), finish.get(i)) for i in range(n)]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("endpoint", ["completions", "chat"])
@pytest.mark.parametrize("case", list(CASES))
def test_every_sample_follows_the_constraint(llama_server: ConveyorServer, case: str, endpoint: str,
                                             stream: bool) -> None:
    constraint, check, extra = CASES[case]
    samples = sample(llama_server, endpoint, stream, {**constraint, **extra})
    assert len(samples) == SAMPLES
    for text, finish_reason in samples:
        assert finish_reason == "stop", (finish_reason, text)  # the grammar finished, then EOS was the only choice
        check(text)
    assert len({text for text, _ in samples}) > 1 or case == "choice"  # sampled, not one forced answer


def test_gbnf_grammar_and_compact_json(llama_server: ConveyorServer) -> None:
    gbnf = 'root ::= "(" num ("+" num)* ")"\nnum ::= [0-9] [0-9]?'
    for text, finish_reason in sample(llama_server, "completions", False,
                                      {"structured_outputs": {"grammar": gbnf}}, n=10):
        assert finish_reason == "stop" and re.fullmatch(r"\([0-9]{1,2}(\+[0-9]{1,2})*\)", text), text
    compact = {"structured_outputs": {"json": PERSON_SCHEMA, "disable_any_whitespace": True}}
    for text, finish_reason in sample(llama_server, "chat", False, compact, n=10):
        assert finish_reason == "stop", text
        check_person(text)
        assert not re.search(r"\s", re.sub(r'"(?:[^"\\]|\\.)*"', "", text)), text  # no blanks between tokens


def post(server: ConveyorServer, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{server.base_url}{path}", json={"model": MODEL, **body}, timeout=60)


@pytest.mark.parametrize("fields,param", [
    ({"structured_outputs": {"json": {"type": "objekt"}}}, "structured_outputs.json"),
    ({"structured_outputs": {"regex": "(unclosed"}}, "structured_outputs.regex"),
    ({"structured_outputs": {"grammar": "start: missing_rule"}}, "structured_outputs.grammar"),
    ({"structured_outputs": {"json": PERSON_SCHEMA, "regex": PHONE}}, "structured_outputs.regex"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_object"}, "structured_outputs": {"choice": CHOICES}}, "response_format"),
])
def test_bad_specs_are_400_naming_the_field(llama_server: ConveyorServer, fields: dict[str, Any],
                                            param: str) -> None:
    for path, body in (("/v1/completions", {"prompt": "Hi", "max_tokens": 4}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4,
                                                 "stream": True})):
        response = post(llama_server, path, {**body, **fields})
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["param"] == param and error["type"] == "BadRequestError", error
    # The server goes on serving, constrained requests included.
    ok = post(llama_server, "/v1/completions", {"prompt": "Hi", "max_tokens": 20, "temperature": 1.0,
                                                "structured_outputs": {"regex": PHONE}})
    assert ok.status_code == 200
    check_phone(ok.json()["choices"][0]["text"])


@pytest.fixture(scope="module")
def smollm2_server() -> Iterator[ConveyorServer]:
    server = ConveyorServer(None, "--kv-cache-memory", "256MiB", "--max-model-len", "1024")
    yield server
    server.stop()


def test_smollm2_answers_a_json_schema_chat_with_sensible_json(smollm2_server: ConveyorServer) -> None:
    client = smollm2_server.openai_client(timeout=300)
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40},
                                               "country": {"type": "string", "maxLength": 40}},
              "required": ["city", "country"], "additionalProperties": False}
    reply = client.chat.completions.create(
        model="SmolLM2-135M-Instruct", temperature=0, max_tokens=60,
        messages=[{"role": "user", "content": "What is the capital of France? Answer as JSON with the keys "
                                              "city and country."}],
        response_format={"type": "json_schema", "json_schema": {"name": "capital", "schema": schema,
                                                                "strict": True}})
    choice = reply.choices[0]
    assert choice.finish_reason == "stop", choice
    value = json.loads(choice.message.content)
    assert set(value) == {"city", "country"}, value
    assert "paris" in value["city"].lower() and "france" in value["country"].lower(), value
    answer = client.chat.completions.create(
        model="SmolLM2-135M-Instruct", temperature=0, max_tokens=5,
        messages=[{"role": "user", "content": "Is Paris in France? Answer yes or no."}],
        extra_body={"structured_outputs": {"choice": ["yes", "no"]}})
    assert answer.choices[0].message.content == "yes"
