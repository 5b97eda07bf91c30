"""Incremental detokenization, stop strings and engine-error mapping, without a server."""
from __future__ import annotations

import pytest

from engine_core.protocol import EngineCoreOutput
from frontend.detokenizer import ChoiceState, IncrementalDetokenizer, find_stop_string
from frontend.errors import BadRequestError, InternalServerError
from frontend.tokenizer import TokenizerInfo
from tests.frontend.conftest import CANNED_TEXT, model_dir


@pytest.fixture(scope="module")
def tokenizer() -> TokenizerInfo:
    return TokenizerInfo(str(model_dir("llama")))


def make_state(tokenizer: TokenizerInfo, stop: list[str] | None = None, include: bool = False,
               skip_special_tokens: bool = True) -> ChoiceState:
    prompt = tokenizer.encode("Say something:", add_special_tokens=False)
    return ChoiceState(index=0, request_id="r-0", prompt_index=0,
                       detokenizer=IncrementalDetokenizer(tokenizer, prompt, skip_special_tokens),
                       stop=stop or [], include_stop_str_in_output=include)


def feed(state: ChoiceState, token_ids: list[int], finish: str | None = "length",
         stop_reason: int | str | None = None) -> list[str]:
    """One output per token; the last one finishes. Returns the text pieces the client would see."""
    pieces = []
    for position, token_id in enumerate(token_ids):
        last = position == len(token_ids) - 1
        delta = state.process(EngineCoreOutput("r-0", [token_id], finish_reason=finish if last else None,
                                               stop_reason=stop_reason if last else None))
        pieces.append(delta.text)
        if delta.finish_reason is not None:
            break
    return pieces


def test_multibyte_characters_never_split(tokenizer: TokenizerInfo) -> None:
    token_ids = tokenizer.encode(CANNED_TEXT, add_special_tokens=False)
    assert len(token_ids) > len(CANNED_TEXT.split())  # some characters span several tokens
    state = make_state(tokenizer)
    pieces = feed(state, token_ids)
    assert all("\ufffd" not in piece for piece in pieces)
    assert "".join(pieces) == CANNED_TEXT == state.text
    assert "" in pieces  # a token holding half a character produced no text yet


def test_detokenizer_flushes_incomplete_bytes_at_the_end(tokenizer: TokenizerInfo) -> None:
    token_ids = tokenizer.encode("a 日", add_special_tokens=False)
    detokenizer = IncrementalDetokenizer(tokenizer, [], skip_special_tokens=True)
    text = "".join(detokenizer.step(token_id) for token_id in token_ids[:-1])
    assert "\ufffd" not in text
    assert text + detokenizer.flush() == tokenizer.decode(token_ids[:-1])


def test_stop_string_truncates_and_finishes(tokenizer: TokenizerInfo) -> None:
    state = make_state(tokenizer, stop=["日本"])
    pieces = feed(state, tokenizer.encode(CANNED_TEXT, add_special_tokens=False))
    assert state.finish_reason == "stop" and state.stop_reason == "日本"
    assert state.text == CANNED_TEXT[:CANNED_TEXT.index("日本")]
    assert "".join(pieces) == state.text


def test_stop_string_included_on_request(tokenizer: TokenizerInfo) -> None:
    state = make_state(tokenizer, stop=["world"], include=True)
    feed(state, tokenizer.encode(CANNED_TEXT, add_special_tokens=False))
    assert state.text == "Hello world"


def test_text_that_might_start_a_stop_string_is_held_back(tokenizer: TokenizerInfo) -> None:
    state = make_state(tokenizer, stop=["wor!"])  # "wor" appears, "wor!" never does
    pieces = feed(state, tokenizer.encode("Hello world", add_special_tokens=False), finish=None)
    assert "".join(pieces) == "Hello wo"  # the last len("wor!") - 1 characters are held back
    final = state.process(EngineCoreOutput("r-0", [], finish_reason="length"))
    assert final.text == "rld" and final.finish_reason == "length"


def test_eos_token_is_not_part_of_the_text(tokenizer: TokenizerInfo) -> None:
    state = make_state(tokenizer, skip_special_tokens=False)
    token_ids = tokenizer.encode("Hi", add_special_tokens=False) + [2]
    feed(state, token_ids, finish="stop", stop_reason=2)
    assert state.text == "Hi" and state.token_ids == token_ids and state.stop_reason == 2


def test_earliest_stop_string_wins() -> None:
    assert find_stop_string("abc def ghi", 11, ["ghi", "def"]) == (4, "def")
    assert find_stop_string("abc def", 1, ["abc"]) is None  # ended before the new text


def test_engine_errors_map_to_status() -> None:
    state = ChoiceState(0, "r", 0, detokenizer=None)  # type: ignore[arg-type]
    with pytest.raises(BadRequestError):
        state.process(EngineCoreOutput("r", [], finish_reason="error",
                                       stop_reason="the prompt has 900 tokens, more than the maximum context length"))
    with pytest.raises(InternalServerError, match="boom"):
        state.process(EngineCoreOutput("r", [], finish_reason="error", stop_reason="boom"))
