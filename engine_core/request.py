"""`Request`: the engine core's mutable view of one generation or pooling request. It never leaves this process.

Token regions of a request (one list, `all_token_ids`):

```
 |<-------------- prompt -------------->|<------ outputs ------>|
 |<------ num_computed_tokens ------>|                          |   KV already in the cache
 |<------- num_tokens_known_to_worker ------------------->|     |   the worker holds these ids
                                                                ^ num_tokens
```
The scheduler's one invariant: `num_computed_tokens` catches up to `num_tokens`. A step that brings it level
samples one more token, so a decoding request always sits exactly one token behind.
"""
from __future__ import annotations

import enum
from typing import Any

from engine_core.block_hash import BlockHash
from engine_core.protocol import (AudioInput, EngineCoreOutput, EngineCoreRequest, MultiModalItem, PoolingOutput,
                                  PoolingParams, RepetitionDetection, SamplingParams, TokenLogprobs)


class RequestStatus(enum.IntEnum):
    WAITING = enum.auto()
    WAITING_FOR_REMOTE_KV = enum.auto()  # blocks allocated; a KV connector is filling them from another instance
    RUNNING = enum.auto()
    PREEMPTED = enum.auto()
    # Everything from here on is finished (see `is_finished`).
    FINISHED_STOPPED = enum.auto()
    FINISHED_LENGTH = enum.auto()
    FINISHED_ABORTED = enum.auto()
    FINISHED_ERROR = enum.auto()

    @property
    def is_finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED

    @property
    def finish_reason(self) -> str | None:
        """The OpenAI-facing finish reason ("stop" | "length" | "abort" | "error"), None while unfinished."""
        return _FINISH_REASONS.get(self)


_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
    RequestStatus.FINISHED_ERROR: "error",
}


class Request:
    """Mutable per-request state owned by the scheduler (tokens, progress, KV blocks, status)."""

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        eos_token_id: int | None,
        arrival_time: float,
        priority: int = 0,
        cache_salt: str | None = None,
        client_index: int = 0,
        kv_transfer_params: dict[str, Any] | None = None,
        pooling_params: PoolingParams | None = None,
        audio: AudioInput | None = None,
        mm_items: list[MultiModalItem] | None = None,
    ) -> None:
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.output_token_ids: list[int] = []
        self.all_token_ids: list[int] = list(prompt_token_ids)  # prompt + outputs, always in step
        self.sampling_params = sampling_params
        self.eos_token_id = eos_token_id
        self.arrival_time = arrival_time
        self.priority = priority
        self.cache_salt = cache_salt
        self.client_index = client_index
        self.kv_transfer_params = kv_transfer_params  # from the client (see engine_core/kv_transfer.py)
        self.kv_transfer_params_out: dict[str, Any] | None = None  # for the response: a producer's hand-off
        self.pooling_params = pooling_params  # a pooling request: finishes with its pooled result, no tokens
        self.audio = audio  # encoder-decoder speech: sent to the worker with every (re)start
        self.mm_items = mm_items or []  # images: sent to the worker with every (re)start; hashed into blocks

        self.status = RequestStatus.WAITING
        self.stop_reason: int | str | None = None
        self.num_computed_tokens = 0
        # Tokens of `all_token_ids` the worker holds; 0 = the worker does not know this request (never sent,
        # or told to forget it after preemption). The next diff carries `all_token_ids[this:]`.
        self.num_tokens_known_to_worker = 0
        # Prefix-cache hit (in tokens) when the request was first scheduled; -1 until then.
        self.num_cached_tokens = -1

        self.block_ids: list[int] = []  # KV blocks in token order; owned by the KV cache manager
        self.block_hashes: list[BlockHash] = []  # one per full block of `all_token_ids`, filled lazily
        self.num_committed_blocks = 0  # leading blocks whose KV is computed and offered to the prefix cache
        # With sampling_params.prompt_logprobs: one entry per prompt token (None first), filled as the prompt runs
        # and sent (then dropped) with the first output. While pending, the prompt must be computed, not looked up
        # in the prefix cache.
        self.prompt_logprobs: list[TokenLogprobs | None] | None = (
            [None] * len(self.prompt_token_ids) if sampling_params.prompt_logprobs is not None else None)

    @classmethod
    def from_engine_core_request(cls, req: EngineCoreRequest) -> Request:
        return cls(
            request_id=req.request_id,
            prompt_token_ids=req.prompt_token_ids,
            sampling_params=req.sampling_params,
            eos_token_id=req.eos_token_id,
            arrival_time=req.arrival_time,
            priority=req.priority,
            cache_salt=req.cache_salt,
            client_index=req.client_index,
            kv_transfer_params=req.kv_transfer_params,
            pooling_params=req.pooling_params,
            audio=req.audio,
            mm_items=req.mm_items,
        )

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    @property
    def priority_key(self) -> tuple[int, float]:
        """Lower sorts first: scheduled earlier, preempted later."""
        return (self.priority, self.arrival_time)

    def append_output_token_id(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)

    def record_prompt_logprobs(self, first_position: int, entries: list[TokenLogprobs | None] | None) -> None:
        """Entries for the prompt tokens after `first_position` (logits at position p score token p + 1)."""
        if self.prompt_logprobs is None or not entries:
            return
        start = first_position + 1
        entries = entries[:max(0, len(self.prompt_logprobs) - start)]
        self.prompt_logprobs[start:start + len(entries)] = entries

    def take_prompt_logprobs(self) -> list[TokenLogprobs | None] | None:
        """The prompt logprobs for the request's first output; None afterwards (and without prompt_logprobs)."""
        prompt_logprobs, self.prompt_logprobs = self.prompt_logprobs, None
        return prompt_logprobs

    def make_output(self, token_ids: list[int], logprobs: list[TokenLogprobs] | None = None,
                    pooling_output: PoolingOutput | None = None) -> EngineCoreOutput:
        """This step's news for the frontend: new tokens, and the finish reason once finished."""
        return EngineCoreOutput(
            self.request_id, token_ids, new_logprobs=logprobs, finish_reason=self.status.finish_reason,
            stop_reason=self.stop_reason, num_cached_tokens=max(0, self.num_cached_tokens),
            kv_transfer_params=self.kv_transfer_params_out, prompt_logprobs=self.take_prompt_logprobs(),
            pooling_output=pooling_output)

    def take_unsent_token_ids(self) -> list[int]:
        """Tokens the worker has not seen yet; marks them as sent."""
        unsent = self.all_token_ids[self.num_tokens_known_to_worker:]
        self.num_tokens_known_to_worker = self.num_tokens
        return unsent

    def __repr__(self) -> str:
        return (f"Request({self.request_id!r}, status={self.status.name}, computed={self.num_computed_tokens}/"
                f"{self.num_tokens}, blocks={self.block_ids})")


def check_stop(request: Request, max_len: int) -> tuple[RequestStatus, int | str | None] | None:
    """After a token was appended: the finished status and stop reason, or None to keep generating.

    Order: eos (unless ignore_eos), stop_token_ids (both not before min_tokens outputs), max_tokens, the
    total length reaching `max_len` (max_model_len, or what the KV cache can hold if that is smaller), and
    repetition_detection (not before min_tokens outputs either; like vLLM, on the output tokens only).
    """
    params = request.sampling_params
    last_token_id = request.output_token_ids[-1]
    if request.num_output_tokens >= params.min_tokens:
        if not params.ignore_eos and last_token_id == request.eos_token_id:
            return RequestStatus.FINISHED_STOPPED, None
        if last_token_id in params.stop_token_ids:
            return RequestStatus.FINISHED_STOPPED, last_token_id
    if request.num_output_tokens >= params.max_tokens or request.num_tokens >= max_len:
        return RequestStatus.FINISHED_LENGTH, None
    if params.repetition_detection is not None and request.num_output_tokens >= params.min_tokens:
        repetition = find_repetition(request.output_token_ids, params.repetition_detection)
        if repetition is not None:
            pattern_len, repeats = repetition
            return (RequestStatus.FINISHED_STOPPED,
                    f"repetition detected: pattern of {pattern_len} tokens repeated {repeats} times")
    return None


def find_repetition(token_ids: list[int], detection: RepetitionDetection) -> tuple[int, int] | None:
    """(pattern length, times in a row) when `token_ids` ends in a pattern of min_pattern_len..max_pattern_len
    tokens repeated at least min_repeats times in a row (the shortest such pattern); else None.

    Called after every token, so the common case is cheap: a pattern of length L can only end the sequence if
    the last token equals the one L before it (one comparison per L); only then are whole slices compared."""
    num_tokens, repeats = len(token_ids), detection.min_repeats
    if repeats < 2 or detection.min_pattern_len < 1 or num_tokens < detection.min_pattern_len * repeats:
        return None
    last = token_ids[-1]
    for pattern_len in range(detection.min_pattern_len, detection.max_pattern_len + 1):
        span = pattern_len * repeats
        if span > num_tokens:
            return None
        if token_ids[-1 - pattern_len] != last:
            continue
        tail = token_ids[-span:]
        if tail[pattern_len:] == tail[:-pattern_len]:  # period pattern_len over `repeats` copies
            while span + pattern_len <= num_tokens and (
                    token_ids[-span - pattern_len:-span] == token_ids[-pattern_len:]):
                span += pattern_len
            return pattern_len, span // pattern_len
    return None
