"""Structured outputs on rank 0: one llguidance matcher per constrained request, a token mask per sampling step.

Per step (the model runner calls these three):

    start(rows)   before the forward pass: on a background thread, build the matchers of requests seen for the
                  first time (replaying their generated tokens: a preempted request comes back as new) and fill
                  one bitmask row per constrained sampling row. The mask depends only on tokens known at step
                  start, so it overlaps the forward pass (llguidance releases the GIL, torch too).
    apply(...)    after the logits: join, set the disallowed ids (and ids past the tokenizer's vocabulary, e.g.
                  the model's padding rows) to -inf. A finished grammar allows only the EOS ids.
    advance(...)  after sampling: feed each constrained request its token.

A spec that fails here (it does not compile against the tokenizer, the matcher errs) fails only its request: the
runner returns no token for it and the reason in `ModelRunnerOutput.request_errors`.
"""
from __future__ import annotations

import logging
import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Collection, Sequence

import numpy as np
import torch
from llguidance import LLExecutor, LLMatcher, LLTokenizer

from engine_core.structured_output import GrammarError, grammar_from_spec
from workers.sampling.state import RequestSamplingState

logger = logging.getLogger("conveyor.structured_output")


@dataclass
class _Entry:
    sampling: RequestSamplingState  # identity tells a request re-sent after preemption from the one we know
    matcher: LLMatcher | None
    error: str | None = None


@dataclass
class StepMasks:
    """The masks of one step's constrained rows (row = index into the step's logits)."""

    rows: list[int]
    bitmask: np.ndarray  # [len(rows), words] int32, bit j of word w allows token 32 * w + j
    vocab_size: int  # the tokenizer's; ids at and past it are never allowed
    errors: dict[int, str] = field(default_factory=dict)  # row -> why that request failed
    # CPU: the bitmask already unpacked (on the background thread), [len(rows), vocab_size] True = disallowed
    disallowed: torch.Tensor | None = None


class StructuredOutputs:
    def __init__(self, tokenizer_dir: str, eos_token_ids: Sequence[int], device: torch.device) -> None:
        self._device = device
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="grammar-masks")
        # Building the tokenizer's token trie takes ~0.2 s for a 49k vocabulary: start it now, off the hot path.
        self._tokenizer: Future[LLTokenizer] = self._pool.submit(_load_tokenizer, tokenizer_dir, list(eos_token_ids))
        # Mask threads: one on CPU, where the forward pass wants every core; a few on CUDA for large batches.
        threads = 1 if device.type == "cpu" else max(1, min(8, (os.cpu_count() or 2) // 2))
        self._executor = LLExecutor(num_threads=threads)
        self._entries: dict[str, _Entry] = {}
        self._shifts: torch.Tensor | None = None

    def start(self, rows: list[tuple[str, RequestSamplingState]],
              live_ids: Collection[str]) -> Future[StepMasks] | None:
        """Begin the masks for `rows` (the step's sampling rows, in logits order); None when none is constrained.
        Forgets requests not in `live_ids` (finished, aborted or preempted)."""
        for request_id in [rid for rid in self._entries if rid not in live_ids]:
            del self._entries[request_id]
        constrained = [(row, request_id, state) for row, (request_id, state) in enumerate(rows)
                       if state.params.structured_output is not None]
        if not constrained:
            return None
        return self._pool.submit(self._compute, constrained)

    def apply(self, pending: Future[StepMasks], logits: torch.Tensor) -> dict[int, str]:
        """Wait for the masks and apply them to `logits` [rows, vocab] in place; return row -> error."""
        masks = pending.result()
        if not masks.rows:
            return masks.errors
        num_rows, vocab = len(masks.rows), logits.shape[1]
        columns = min(vocab, masks.vocab_size)
        if masks.disallowed is not None:
            disallowed = masks.disallowed[:, :columns]
        else:  # unpack on the logits' device: the packed mask is 32x smaller to copy
            if self._shifts is None:
                self._shifts = torch.arange(32, dtype=torch.int32, device=logits.device)
            words = torch.from_numpy(masks.bitmask).to(logits.device, non_blocking=True)  # [n, words]
            disallowed = ((words[:, :, None] >> self._shifts) & 1 == 0).reshape(num_rows, -1)[:, :columns]
        every_row = masks.rows == list(range(logits.shape[0]))
        index = None if every_row else torch.tensor(masks.rows, dtype=torch.long, device=logits.device)
        target = logits if index is None else logits.index_select(0, index)  # [n, vocab]
        target[:, :columns].masked_fill_(disallowed, float("-inf"))
        target[:, columns:] = float("-inf")  # model ids past the tokenizer (padding rows): never allowed
        if index is not None:
            logits.index_copy_(0, index, target)
        return masks.errors

    def advance(self, request_id: str, token_id: int) -> str | None:
        """Feed the sampled token to the request's matcher; the error if it does not fit the grammar."""
        entry = self._entries.get(request_id)
        if entry is None or entry.matcher is None:
            return None
        matcher = entry.matcher
        if matcher.is_stopped() and not matcher.is_error():
            return None  # grammar done (ignore_eos keeps sampling the EOS it allows)
        if not matcher.consume_token(token_id):
            entry.error = _matcher_error(matcher, f"token {token_id} does not fit the grammar")
            return entry.error
        return None

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ background thread

    def _compute(self, constrained: list[tuple[int, str, RequestSamplingState]]) -> StepMasks:
        try:
            tokenizer = self._tokenizer.result()
        except Exception as exc:
            message = f"structured output unavailable: the tokenizer did not load ({exc})"
            return StepMasks([], np.empty((0, 0), np.int32), 0, {row: message for row, _, _ in constrained})
        errors: dict[int, str] = {}
        ready: list[tuple[int, LLMatcher]] = []
        for row, request_id, state in constrained:
            entry = self._entries.get(request_id)
            if entry is None or entry.sampling is not state:
                entry = self._entries[request_id] = self._new_entry(tokenizer, state)
            if entry.error is not None or entry.matcher is None:
                errors[row] = entry.error or "structured output: no matcher"
            else:
                ready.append((row, entry.matcher))
        num_words = (tokenizer.vocab_size + 31) // 32
        bitmask = np.full((len(ready), num_words), -1, dtype=np.int32)
        if ready:
            self._executor.unsafe_compute_mask_ptr([(matcher, i) for i, (_, matcher) in enumerate(ready)],
                                                   bitmask.ctypes.data, num_words * 4, len(ready))
        rows = []
        for i, (row, matcher) in enumerate(ready):
            if matcher.is_error():
                errors[row] = _matcher_error(matcher, "the grammar matcher failed")
            else:
                rows.append(i)
        masks = StepMasks([ready[i][0] for i in rows], bitmask[rows], tokenizer.vocab_size, errors)
        if self._device.type == "cpu" and rows:  # unpack here too, still overlapping the forward pass
            bits = np.unpackbits(masks.bitmask.view(np.uint8), axis=1, bitorder="little")[:, :tokenizer.vocab_size]
            masks.disallowed = torch.from_numpy(bits == 0)
        return masks

    @staticmethod
    def _new_entry(tokenizer: LLTokenizer, state: RequestSamplingState) -> _Entry:
        spec = state.params.structured_output
        assert spec is not None
        try:
            grammar = grammar_from_spec(spec)
        except GrammarError as exc:
            return _Entry(state, None, f"invalid structured output ({spec.kind}): {exc}")
        matcher = LLMatcher(tokenizer, grammar, log_level=0)
        if matcher.is_error():
            return _Entry(state, None, _matcher_error(matcher, f"invalid structured output ({spec.kind})"))
        if state.output_token_ids and not matcher.consume_tokens(list(state.output_token_ids)):
            return _Entry(state, None, _matcher_error(matcher, "generated tokens do not replay in the grammar"))
        return _Entry(state, matcher)


def _load_tokenizer(tokenizer_dir: str, eos_token_ids: list[int]) -> LLTokenizer:
    text = (Path(tokenizer_dir) / "tokenizer.json").read_text()
    tokenizer = LLTokenizer(text, eos_token=eos_token_ids or None)
    logger.info("structured outputs: llguidance tokenizer ready (%d tokens, EOS %s)", tokenizer.vocab_size,
                tokenizer.eos_tokens)
    return tokenizer


def _matcher_error(matcher: LLMatcher, fallback: str) -> str:
    detail = matcher.get_error().strip().splitlines()
    return f"structured output: {detail[0] if detail else fallback}"
