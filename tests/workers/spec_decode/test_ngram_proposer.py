"""Ngram proposer: longest tail first, earliest occurrence, truncation, and a brute-force reference."""
from __future__ import annotations

import numpy as np
import pytest

from workers.spec_decode.ngram_proposer import NgramProposer, propose_ngram


def reference(history: list[int], k: int, min_n: int, max_n: int) -> list[int]:
    """The rule written out: for n from max_n down to min_n, the earliest start s whose n tokens equal the
    last n and end before the last token; propose what follows."""
    num_tokens = len(history)
    for n in range(max_n, min_n - 1, -1):
        if n >= num_tokens:
            continue
        tail = history[-n:]
        for start in range(num_tokens - n):  # start + n - 1 <= num_tokens - 2
            if history[start:start + n] == tail:
                return history[start + n:start + n + k]
    return []


def test_longest_n_wins_over_an_earlier_shorter_match() -> None:
    # tail [9 1 2]: the 3-gram occurs at 3..5 (followed by 8); the 2-gram [1 2] occurs earlier at 0 (then 7).
    history = np.array([1, 2, 7, 9, 1, 2, 8, 5, 9, 1, 2])
    assert propose_ngram(history, 3, 2, 3) == [8, 5, 9]


def test_falls_back_to_shorter_n() -> None:
    # [4 1 2] never occurred before; [1 2] did, followed by 7.
    history = np.array([1, 2, 7, 3, 4, 1, 2])
    assert propose_ngram(history, 2, 2, 3) == [7, 3]
    assert propose_ngram(history, 2, 3, 3) == []  # no fallback below prompt_lookup_min


def test_empty_when_no_match() -> None:
    assert propose_ngram(np.arange(100), 5, 1, 4) == []


def test_never_proposes_past_the_end() -> None:
    assert propose_ngram(np.array([1, 2, 3, 1, 2]), 5, 2, 2) == [3, 1, 2]
    # Occurrences may overlap the tail itself: [1 1 1] at 0..2 leaves one token after it.
    assert propose_ngram(np.array([1, 1, 1, 1]), 5, 2, 3) == [1]
    assert propose_ngram(np.array([1, 1, 1, 1]), 5, 2, 2) == [1, 1]


def test_k_truncation_and_max_model_len() -> None:
    history = np.array([5, 6, 1, 2, 3, 4, 9, 5, 6])
    assert propose_ngram(history, 2, 2, 2) == [1, 2]
    assert propose_ngram(history, 10, 2, 2) == [1, 2, 3, 4, 9, 5, 6]
    assert propose_ngram(history, 10, 2, 2, max_model_len=12) == [1, 2, 3]  # room for 3 more positions
    assert propose_ngram(history, 10, 2, 2, max_model_len=9) == []


def test_earliest_of_several_occurrences_wins() -> None:
    # [1 2] occurs three times before the tail, followed by 10, 20 and 30: the first one wins, as in vLLM.
    history = np.array([1, 2, 10, 1, 2, 20, 1, 2, 30, 1, 2])
    assert propose_ngram(history, 2, 2, 2) == [10, 1]


def test_history_shorter_than_min() -> None:
    assert propose_ngram(np.array([3]), 4, 2, 3) == []
    assert propose_ngram(np.array([3, 3]), 4, 2, 3) == []  # length == min: the tail is the whole history
    assert propose_ngram(np.array([], dtype=np.int64), 4, 1, 3) == []


def test_matches_the_written_rule_on_random_histories() -> None:
    rng = np.random.default_rng(0)
    for _ in range(500):
        history = rng.integers(0, int(rng.integers(1, 5)), int(rng.integers(1, 30))).tolist()
        min_n = int(rng.integers(1, 4))
        max_n = int(rng.integers(min_n, 6))
        k = int(rng.integers(1, 6))
        assert propose_ngram(np.array(history, dtype=np.int32), k, min_n, max_n) == \
            reference(history, k, min_n, max_n), (history, k, min_n, max_n)


def test_batched_equals_per_request_and_accepts_lists() -> None:
    proposer = NgramProposer(num_speculative_tokens=3, prompt_lookup_min=1, prompt_lookup_max=3)
    histories = [np.array([1, 2, 3, 1, 2]), np.array([7]), np.array([4, 5, 6]), np.array([9, 8, 9])]
    assert proposer.propose(histories) == [[3, 1, 2], [], [], [8, 9]]
    assert proposer.propose_one([1, 2, 3, 1, 2]) == [3, 1, 2]
    assert proposer.propose([]) == []


def test_rejects_bad_settings() -> None:
    with pytest.raises(ValueError):
        NgramProposer(num_speculative_tokens=3, prompt_lookup_min=3, prompt_lookup_max=2)
    with pytest.raises(ValueError):
        NgramProposer(num_speculative_tokens=0, prompt_lookup_min=1, prompt_lookup_max=2)
