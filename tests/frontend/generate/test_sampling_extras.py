"""Request fields of vLLM's sampling extras -> SamplingParams, and the 400s (naming the parameter) for bad values."""
from __future__ import annotations

from typing import Any

import pytest

from engine_core.protocol import RepetitionDetection, SamplingParams, TokenLogprobs
from frontend.errors import BadRequestError, engine_error
from frontend.generate.logprobs import prompt_logprobs_json
from frontend.generate.protocol import CompletionRequest
from frontend.generate.sampling import build_sampling_params
from frontend.generation_config import EosConfig
from frontend.tokenizer import TokenizerInfo
from tests.frontend.conftest import model_dir

PROCESSORS = ("ban_tokens", "force_tokens")


@pytest.fixture(scope="module")
def tokenizer() -> TokenizerInfo:
    return TokenizerInfo(str(model_dir("llama")))


def params_for(tokenizer: TokenizerInfo, **fields: Any) -> SamplingParams:
    request = CompletionRequest(prompt="x", **fields)
    return build_sampling_params(request, {}, EosConfig(2, ()), tokenizer, max_tokens=8, logprobs=None,
                                 seed_offset=0, logits_processor_names=PROCESSORS)


def bad_request(tokenizer: TokenizerInfo, **fields: Any) -> BadRequestError:
    with pytest.raises(BadRequestError) as info:
        params_for(tokenizer, **fields)
    return info.value


def test_no_extras_leave_the_defaults(tokenizer: TokenizerInfo) -> None:
    params = params_for(tokenizer)
    assert params.allowed_token_ids is None and params.bad_words_token_ids == [] and params.prompt_logprobs is None
    assert params.repetition_detection is None and params.logits_processors == []
    assert params.logits_processor_args is None


def test_allowed_token_ids(tokenizer: TokenizerInfo) -> None:
    assert params_for(tokenizer, allowed_token_ids=[9, 3, 9]).allowed_token_ids == [3, 9]
    assert bad_request(tokenizer, allowed_token_ids=[]).param == "allowed_token_ids"
    error = bad_request(tokenizer, allowed_token_ids=[1, tokenizer.vocab_size])
    assert error.param == "allowed_token_ids" and str(tokenizer.vocab_size) in error.message


def test_bad_words_are_tokenized_with_and_without_a_leading_space(tokenizer: TokenizerInfo) -> None:
    params = params_for(tokenizer, bad_words=["hello", "  world peace"])
    plain, spaced = tokenizer.encode("hello", False), tokenizer.encode(" hello", False)
    assert params.bad_words_token_ids[:2] == [plain, spaced]
    assert tokenizer.encode("world peace", False) in params.bad_words_token_ids
    assert tokenizer.encode(" world peace", False) in params.bad_words_token_ids
    assert bad_request(tokenizer, bad_words=["ok", "   "]).param == "bad_words"


def test_prompt_logprobs(tokenizer: TokenizerInfo) -> None:
    assert params_for(tokenizer, prompt_logprobs=0).prompt_logprobs == 0
    assert params_for(tokenizer, prompt_logprobs=20).prompt_logprobs == 20
    error = bad_request(tokenizer, prompt_logprobs=-1)
    assert error.param == "prompt_logprobs" and "whole vocabulary" in error.message
    assert bad_request(tokenizer, prompt_logprobs=2, stream=True).param == "prompt_logprobs"
    assert params_for(tokenizer, prompt_logprobs=0, stream=True).prompt_logprobs is None


@pytest.mark.parametrize("spec, expected", [
    ({}, RepetitionDetection()),
    ({"min_pattern_len": 2, "max_pattern_len": 5, "min_repeats": 3}, RepetitionDetection(2, 5, 3)),
    ({"max_pattern_size": 4, "min_count": 2}, RepetitionDetection(1, 4, 2)),  # vLLM's names
    ({"min_pattern_size": 0, "max_pattern_size": 4, "min_count": 3}, RepetitionDetection(1, 4, 3)),
    ({"max_pattern_size": 0, "min_count": 3}, None),  # vLLM: 0 disables
    ({"min_pattern_len": 30}, RepetitionDetection(30, 30, 10)),
])
def test_repetition_detection(tokenizer: TokenizerInfo, spec: dict[str, Any],
                              expected: RepetitionDetection | None) -> None:
    assert params_for(tokenizer, repetition_detection=spec).repetition_detection == expected


@pytest.mark.parametrize("spec", [
    {"min_pattern_len": 0}, {"min_pattern_len": 5, "max_pattern_len": 4}, {"max_pattern_len": 5000},
    {"min_repeats": 1}, {"min_repeats": 100000}, {"min_repeats": "3"}, {"min_repeats": True}, {"pattern": 3},
    {"min_repeats": 3, "min_count": 4},
])
def test_repetition_detection_out_of_range(tokenizer: TokenizerInfo, spec: dict[str, Any]) -> None:
    assert bad_request(tokenizer, repetition_detection=spec).param == "repetition_detection"


def test_vllm_xargs_select_processors(tokenizer: TokenizerInfo) -> None:
    params = params_for(tokenizer, vllm_xargs={"logits_processors": ["ban_tokens"], "banned_token_ids": [5]})
    assert params.logits_processors == ["ban_tokens"] and params.logits_processor_args == {"banned_token_ids": [5]}
    params = params_for(tokenizer, vllm_xargs={"logits_processors": "force_tokens", "forced_token_ids": [1]})
    assert params.logits_processors == ["force_tokens"]
    params = params_for(tokenizer, vllm_xargs={"something": 1})  # no processor selected: nothing to pass
    assert params.logits_processors == [] and params.logits_processor_args is None
    error = bad_request(tokenizer, vllm_xargs={"logits_processors": ["nope"]})
    assert error.param == "vllm_xargs" and "nope" in error.message and "ban_tokens" in error.message
    for selected in ([], [3], "", {"a": 1}):
        assert bad_request(tokenizer, vllm_xargs={"logits_processors": selected}).param == "vllm_xargs"


def test_unknown_names_pass_when_the_engine_did_not_list_any(tokenizer: TokenizerInfo) -> None:
    request = CompletionRequest(prompt="x", vllm_xargs={"logits_processors": ["later_checked"]})
    params = build_sampling_params(request, {}, EosConfig(2, ()), tokenizer, max_tokens=8, logprobs=None,
                                   seed_offset=0)
    assert params.logits_processors == ["later_checked"]


def test_worker_side_argument_errors_are_400s() -> None:
    error = engine_error("invalid vllm_xargs for logits processor 'ban_tokens': 'banned_token_ids' must be ...")
    assert isinstance(error, BadRequestError) and error.param == "vllm_xargs"
    assert engine_error("logits processor 'x' failed: RuntimeError: boom").status_code == 500


def test_prompt_logprobs_json_shape(tokenizer: TokenizerInfo) -> None:
    prompt = tokenizer.encode("Hello world", False)
    assert len(prompt) == 2
    entries: list[TokenLogprobs | None] = [
        None, TokenLogprobs(logprob=-2.5, rank=3, top_token_ids=[7, prompt[1]], top_logprobs=[-0.1, -2.5])]
    body = prompt_logprobs_json(tokenizer, prompt, entries)
    assert body is not None and body[0] is None
    position = body[1]
    assert position is not None and list(position) == [str(prompt[1]), "7"]  # the actual token first
    assert position[str(prompt[1])] == {"logprob": -2.5, "rank": 3, "decoded_token": tokenizer.token_text(prompt[1])}
    assert position["7"] == {"logprob": -0.1, "rank": 1, "decoded_token": tokenizer.token_text(7)}
    as_ids = prompt_logprobs_json(tokenizer, prompt, entries, as_token_ids=True)
    assert as_ids is not None and as_ids[1] is not None and as_ids[1]["7"]["decoded_token"] == "token_id:7"
    assert prompt_logprobs_json(tokenizer, prompt, None) is None
