"""Acceptance counters of speculative decoding, counted the way vLLM's Prometheus metrics count them.

    vllm:spec_decode_num_drafts                 requests that carried at least one draft token, per step
    vllm:spec_decode_num_draft_tokens           draft tokens verified
    vllm:spec_decode_num_accepted_tokens        draft tokens accepted (the bonus/recovered token is not one)
    vllm:spec_decode_num_accepted_tokens_per_pos[i]   drafts whose token at position i (0-based) was accepted

Acceptance is a prefix, so position i counts every request that accepted more than i tokens. Torch-free:
the engine core aggregates these from the per-request counts `RejectionSampler` returns.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SpecDecodingStats:
    """Counters of one step (or any window); `observe_draft` once per request that had drafts."""

    num_spec_tokens: int  # the configured k: length of the per-position counters
    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    num_accepted_tokens_per_pos: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.num_accepted_tokens_per_pos:
            self.num_accepted_tokens_per_pos = [0] * self.num_spec_tokens

    def observe_draft(self, num_draft_tokens: int, num_accepted_tokens: int) -> None:
        """Count one request's verification (mutates the counters). A request without drafts is no draft."""
        assert 0 <= num_accepted_tokens <= num_draft_tokens <= self.num_spec_tokens, (
            num_accepted_tokens, num_draft_tokens, self.num_spec_tokens)
        if num_draft_tokens == 0:
            return
        self.num_drafts += 1
        self.num_draft_tokens += num_draft_tokens
        self.num_accepted_tokens += num_accepted_tokens
        for pos in range(num_accepted_tokens):
            self.num_accepted_tokens_per_pos[pos] += 1

    def observe_batch(self, num_draft_tokens: list[int], num_accepted_tokens: list[int]) -> None:
        """Count every request of one step: its k_i and the accepted count the rejection sampler returned."""
        for num_draft, num_accepted in zip(num_draft_tokens, num_accepted_tokens, strict=True):
            self.observe_draft(num_draft, num_accepted)
