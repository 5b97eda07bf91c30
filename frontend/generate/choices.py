"""Fan a validated request out into engine requests (prompts x n) and turn their outputs into choice deltas.

Choice `i` of an API request with id `ID` is engine request `ID-i`; with several prompts, choices are numbered
prompt-major (`prompt_index * n + j`) and the seed of sample `j` is `seed + j`.
"""
from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from contextlib import aclosing
from dataclasses import dataclass
from typing import AsyncIterator

from engine_core.protocol import EngineCoreRequest, MultiModalItem
from frontend.detokenizer import ChoiceDelta, ChoiceState, IncrementalDetokenizer, TokenRecord
from frontend.errors import BadRequestError
from frontend.generate.protocol import SamplingRequest
from frontend.generate.sampling import build_sampling_params
from frontend.request_log import log_engine_request
from frontend.state import FrontendState
from frontend.streaming import merge_async_iterators


@dataclass
class Choice:
    """One engine request and the output-side state of the choice it produces."""

    engine_request: EngineCoreRequest
    state: ChoiceState
    prompt_token_ids: list[int]


def api_request_id(prefix: str, request: SamplingRequest, headers: Mapping[str, str]) -> str:
    """The response id: the request's `request_id` (vLLM), else an X-Request-Id header, else a random one."""
    base = request.request_id or headers.get("x-request-id") or uuid.uuid4().hex
    return f"{prefix}-{base}"


def truncate_prompt(token_ids: list[int], truncate_prompt_tokens: int | None, max_model_len: int) -> list[int]:
    """vLLM's truncate_prompt_tokens: keep the last k tokens (-1: as many as the context holds)."""
    if truncate_prompt_tokens is None:
        return token_ids
    keep = max_model_len if truncate_prompt_tokens == -1 else truncate_prompt_tokens
    if keep > max_model_len:
        raise BadRequestError(f"truncate_prompt_tokens ({keep}) is larger than the maximum context length "
                              f"({max_model_len})", param="truncate_prompt_tokens")
    return token_ids[-keep:] if keep else token_ids[:0]


async def every_n_tokens(deltas: AsyncIterator[ChoiceDelta], interval: int) -> AsyncIterator[ChoiceDelta]:
    """vLLM's stream_interval: merge each choice's deltas until it has `interval` tokens (or finished)."""
    if interval <= 1:
        async for delta in deltas:
            yield delta
        return
    pending: dict[int, ChoiceDelta] = {}
    async for delta in deltas:
        held = pending.pop(delta.index, None)
        if held is not None:
            delta.text = held.text + delta.text
            delta.tokens = held.tokens + delta.tokens
        if len(delta.tokens) >= interval or delta.finish_reason is not None:
            yield delta
        else:
            pending[delta.index] = delta


def make_choices(frontend: FrontendState, request: SamplingRequest, request_id: str,
                 prompts: list[list[int]], max_tokens: list[int], logprobs: int | None,
                 mm_items: list[MultiModalItem] | None = None) -> list[Choice]:
    """Engine requests for every prompt x n; `max_tokens[p]` is already checked against the context length.
    `mm_items`: the images of a single prompt (chat)."""
    arrival_time = time.time()
    choices: list[Choice] = []
    for prompt_index, prompt_token_ids in enumerate(prompts):
        for sample_index in range(request.n):
            index = prompt_index * request.n + sample_index
            params = build_sampling_params(request, frontend.generation_defaults, frontend.eos, frontend.tokenizer,
                                           max_tokens=max_tokens[prompt_index], logprobs=logprobs,
                                           seed_offset=sample_index,
                                           logits_processor_names=frontend.model_config.logits_processors)
            engine_request = EngineCoreRequest(
                request_id=f"{request_id}-{index}", prompt_token_ids=prompt_token_ids, sampling_params=params,
                eos_token_id=frontend.eos.eos_token_id, arrival_time=arrival_time, priority=request.priority,
                cache_salt=request.cache_salt, client_index=frontend.engine.client_index,
                kv_transfer_params=request.kv_transfer_params, mm_items=mm_items or [])
            detokenizer = IncrementalDetokenizer(frontend.tokenizer, prompt_token_ids, request.skip_special_tokens)
            state = ChoiceState(index=index, request_id=engine_request.request_id, prompt_index=prompt_index,
                                detokenizer=detokenizer, stop=request.stop_strings,
                                include_stop_str_in_output=request.include_stop_str_in_output)
            choices.append(Choice(engine_request, state, prompt_token_ids))
    return choices


async def _run_choice(frontend: FrontendState, choice: Choice) -> AsyncIterator[ChoiceDelta]:
    """Deltas of one choice; returning early (stop string) closes the engine stream, which aborts it."""
    start = choice.engine_request.arrival_time
    first_token_time: float | None = None
    log_engine_request(frontend, choice.engine_request)
    async with aclosing(frontend.engine.generate(choice.engine_request)) as outputs:  # type: ignore[type-var]
        async for output in outputs:
            delta = choice.state.process(output)
            if first_token_time is None and output.new_token_ids:
                first_token_time = time.time()
                frontend.metrics.observe_first_token(first_token_time - start)
            yield delta
            if delta.finish_reason is not None:
                frontend.metrics.observe_finished(
                    len(choice.prompt_token_ids), len(choice.state.token_ids), delta.finish_reason,
                    time.time() - start, None if first_token_time is None else first_token_time - start)
                return


async def run_choices(frontend: FrontendState, choices: list[Choice]) -> AsyncIterator[ChoiceDelta]:
    """Deltas of all choices, interleaved as they arrive. A delta always has text or a finish reason: tokens
    whose text is still held back ride along with the next delta that has text, keeping logprobs aligned."""
    held: dict[int, list[TokenRecord]] = {}
    async for _, delta in merge_async_iterators([_run_choice(frontend, choice) for choice in choices]):
        if not delta.text and delta.finish_reason is None:
            held.setdefault(delta.index, []).extend(delta.tokens)
            continue
        if delta.index in held:
            delta.tokens = held.pop(delta.index) + delta.tokens
        yield delta


def kv_transfer_params(choices: list[Choice]) -> dict[str, object]:
    """`{"kv_transfer_params": ...}` for a response body when a prefill instance returned some, else {}."""
    params = next((choice.state.kv_transfer_params for choice in choices if choice.state.kv_transfer_params), None)
    return {} if params is None else {"kv_transfer_params": params}


def usage(choices: list[Choice]) -> dict[str, object]:
    """Prompt tokens count once per prompt (not per sample); cached tokens from each prompt's first sample."""
    first_of_prompt: dict[int, Choice] = {}
    for choice in choices:
        first_of_prompt.setdefault(choice.state.prompt_index, choice)
    prompt_tokens = sum(len(choice.prompt_token_ids) for choice in first_of_prompt.values())
    cached_tokens = sum(choice.state.num_cached_tokens for choice in first_of_prompt.values())
    completion_tokens = sum(len(choice.state.token_ids) for choice in choices)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}
