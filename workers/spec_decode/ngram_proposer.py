"""Prompt-lookup ("ngram") proposals: guess the next tokens by finding the history's own tail earlier in it.

For one request with token history h (prompt + generated so far, length T):

    h:  . . . [a b c] x y z . . . . . . . [a b c]      <- the last n tokens (the pattern)
              ^ earliest earlier occurrence ^ propose h[s+n : s+n+k] = [x y z ...]

The pattern length n is the LONGEST in [prompt_lookup_min, prompt_lookup_max] that occurs earlier; among the
occurrences of that length the EARLIEST one (smallest start s) wins. "Earlier" means the occurrence ends at or
before T - 2, so at least one token follows it; it may overlap the pattern itself (h = [1 1 1 1], max n = 2
matches at s = 0 and proposes [1 1]). The proposal stops at the end of the history and is cut to k tokens and
to `max_model_len - T` so it never asks for positions the model cannot hold.

This is what vLLM v1's `NgramProposer` returns: it runs a KMP prefix-function over the REVERSED history,
capped at `max_ngram`, keeps the longest match and, on ties, the one found last in reversed order (earliest in
the history). We compute the same answer differently because it runs on every decode step in Python, where a
per-token loop costs ~1 ms for 2,000 tokens: one vectorized comparison finds every position whose token equals
the last one (the candidate occurrence ends), then at most `prompt_lookup_max - 1` further comparisons over the
surviving candidates measure how far each match extends backwards. The work is O(T) numpy plus
O(prompt_lookup_max x candidates).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

TokenHistory = npt.NDArray[np.integer] | Sequence[int]


def propose_ngram(history: TokenHistory, num_speculative_tokens: int, prompt_lookup_min: int,
                  prompt_lookup_max: int, max_model_len: int | None = None) -> list[int]:
    """Up to `num_speculative_tokens` draft tokens for one request; [] when nothing matches.

    `history` is the request's whole token sequence so far (1-D); pass a numpy array on the hot path (a list
    is converted, which costs more than the search).
    """
    tokens = np.asarray(history)
    assert tokens.ndim == 1, tokens.shape
    assert 1 <= prompt_lookup_min <= prompt_lookup_max, (prompt_lookup_min, prompt_lookup_max)
    num_tokens = tokens.shape[0]
    max_new = num_speculative_tokens if max_model_len is None else min(num_speculative_tokens,
                                                                       max_model_len - num_tokens)
    if num_tokens <= prompt_lookup_min or max_new <= 0:
        # An occurrence must end before the last token, so a history of prompt_lookup_min tokens has none.
        return []
    match_end = _earliest_longest_match_end(tokens, prompt_lookup_min, prompt_lookup_max)
    if match_end < 0:
        return []
    start = match_end + 1
    proposal: list[int] = tokens[start:start + max_new].tolist()
    return proposal


def _earliest_longest_match_end(tokens: npt.NDArray[np.integer], min_n: int, max_n: int) -> int:
    """Index of the last token of the earliest occurrence of the longest matching tail, or -1.

    Working with occurrence ENDS lets every candidate be extended in lockstep: a candidate e still matches at
    length m + 1 when tokens[e - m] == tokens[T - 1 - m]. The survivors all match the same length, so their
    starts (end - length + 1) are ordered like their ends: the smallest end is the earliest occurrence.
    """
    last = tokens.shape[0] - 1
    # Ends run up to T - 2: the occurrence must leave a token after it to propose.
    ends = np.flatnonzero(tokens[:last] == tokens[last])  # [num_candidates], ascending
    if ends.size == 0:
        return -1
    matched = 1  # every entry of `ends` matches the last `matched` tokens
    for length in range(1, max_n):
        longer = ends[ends >= length]  # a match of length + 1 must start at or after index 0
        longer = longer[tokens[longer - length] == tokens[last - length]]
        if longer.size == 0:
            break
        ends, matched = longer, length + 1
    return int(ends[0]) if matched >= min_n else -1


@dataclass(frozen=True)
class NgramProposer:
    """The speculative config's ngram settings, bound once; `propose` serves one decode step's batch."""

    num_speculative_tokens: int
    prompt_lookup_min: int
    prompt_lookup_max: int
    max_model_len: int | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.prompt_lookup_min <= self.prompt_lookup_max:
            raise ValueError(f"need 1 <= prompt_lookup_min ({self.prompt_lookup_min}) <= prompt_lookup_max "
                             f"({self.prompt_lookup_max})")
        if self.num_speculative_tokens < 1:
            raise ValueError(f"num_speculative_tokens must be >= 1, got {self.num_speculative_tokens}")

    def propose_one(self, history: TokenHistory) -> list[int]:
        """Draft tokens for one request's history ([] when no earlier occurrence of its tail)."""
        return propose_ngram(history, self.num_speculative_tokens, self.prompt_lookup_min,
                             self.prompt_lookup_max, self.max_model_len)

    def propose(self, histories: Sequence[TokenHistory]) -> list[list[int]]:
        """Draft tokens for each request of a batch, in batch order.

        A loop over requests: each search is a handful of vectorized numpy calls, and histories have
        different lengths, so padding them into one array would copy every token every step.
        """
        return [self.propose_one(history) for history in histories]
