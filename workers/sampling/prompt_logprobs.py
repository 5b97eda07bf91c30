"""Prompt logprobs (`SamplingParams.prompt_logprobs`): for every prompt token computed in a step, its logprob
under the logits of the position before it, with its rank and the top-k alternatives.

Same convention as sampled-token logprobs (workers/sampling/sampler.py): log_softmax of the RAW logits; rank = 1 + the
number of strictly more likely tokens. A step that runs prompt positions `start .. end-1` of a request yields
entries for prompt tokens `start+1 .. min(end, num_prompt)-1` (logits at position p score token p+1); the first
prompt token has no entry (the scheduler puts None there). Chunked prefill spreads them over several steps; the
scheduler stitches them together by position.

Logits of those rows are computed in slices of `_ROWS_PER_SLICE` so a long prompt does not hold a
[prompt_len, vocab] float32 tensor at once. Every tensor-parallel rank runs `compute_logits` (it all-gathers the
vocabulary shards); only rank 0 turns them into entries.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from engine_core.protocol import TokenLogprobs

_ROWS_PER_SLICE = 256


@dataclass
class PromptLogprobsPlan:
    """Which rows of a step's flattened batch need prompt logprobs, and for which target tokens."""

    rows: list[int] = field(default_factory=list)  # flattened batch rows (positions whose logits score a token)
    targets: list[int] = field(default_factory=list)  # the prompt token each row scores
    num_top: list[int] = field(default_factory=list)  # per row: how many alternatives its request wants
    spans: list[tuple[int, int, int]] = field(default_factory=list)  # (request index, first row, num rows)

    def add(self, request_index: int, token_ids: list[int], num_prompt_tokens: int, start: int, end: int,
            first_row: int, num_top: int) -> None:
        """Positions start..end-1 of this request sit at rows first_row.. of the batch."""
        last = min(end, num_prompt_tokens - 1)  # positions < last score a prompt token
        if last <= start:
            return
        count = last - start
        self.spans.append((request_index, len(self.rows), count))
        self.rows.extend(range(first_row, first_row + count))
        self.targets.extend(token_ids[start + 1:last + 1])
        self.num_top.extend([num_top] * count)


def wants_prompt_logprobs(prompt_logprobs: int | None, num_output_tokens: int, start: int,
                          num_prompt_tokens: int) -> bool:
    """Only before any output exists (the scheduler sends them with the first token; a request restarted after
    preemption with outputs already sent them) and while prompt positions remain to run."""
    return prompt_logprobs is not None and num_output_tokens == 0 and start < num_prompt_tokens - 1


def compute_prompt_logprobs(compute_logits: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor, plan: PromptLogprobsPlan,
                            num_requests: int, is_rank0: bool) -> list[list[TokenLogprobs | None] | None] | None:
    """Per request of the step (None for those without): its entries, in prompt order. Rank 0 only returns them."""
    device = hidden.device
    rows = torch.tensor(plan.rows, dtype=torch.long, device=device)
    targets = torch.tensor(plan.targets, dtype=torch.long, device=device)
    max_top = max(plan.num_top)
    chosen_list: list[float] = []
    rank_list: list[int] = []
    top_values: list[list[float]] = []
    top_ids: list[list[int]] = []
    for begin in range(0, len(plan.rows), _ROWS_PER_SLICE):
        end = begin + _ROWS_PER_SLICE
        logits = compute_logits(hidden.index_select(0, rows[begin:end]))  # [n, vocab] float32, every rank
        if not is_rank0:
            continue
        logprobs = torch.log_softmax(logits.float(), dim=-1)  # [n, vocab]
        chosen = logprobs.gather(1, targets[begin:end, None])  # [n, 1]
        chosen_list += chosen[:, 0].tolist()
        rank_list += ((logprobs > chosen).sum(dim=-1) + 1).tolist()
        if max_top:
            values, ids = logprobs.topk(min(max_top, logprobs.shape[1]), dim=-1)  # [n, max_top] each
            top_values += values.tolist()
            top_ids += ids.tolist()
    if not is_rank0:
        return None
    result: list[list[TokenLogprobs | None] | None] = [None] * num_requests
    for request_index, first, count in plan.spans:
        entries: list[TokenLogprobs | None] = []
        for row in range(first, first + count):
            k = plan.num_top[row]
            entries.append(TokenLogprobs(logprob=chosen_list[row], rank=rank_list[row],
                                         top_token_ids=top_ids[row][:k] if k else [],
                                         top_logprobs=top_values[row][:k] if k else []))
        result[request_index] = entries
    return result
