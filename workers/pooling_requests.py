"""The model runner's side of pooling requests (`NewRequestData.pooling_params`): they never sample.

Rank 0 keeps the hidden rows of a request's partial prefill chunks; the step whose slice reaches the end of its
prompt pools them all (`workers.layers.pooler`) into `ModelRunnerOutput.pooling_outputs`. An encoder step (BERT)
may also carry per-request segment ids (`token_type_ids`).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from engine_core.config import PoolerConfig
from engine_core.protocol import PoolingOutput, PoolingParams
from workers.layers.pooler import PoolingError, pool


@dataclass
class PoolingState:
    params: PoolingParams
    held_rows: list[torch.Tensor] = field(default_factory=list)  # rank 0: [n_i, hidden] of earlier prefill chunks


@dataclass
class PoolingSpan:
    """A pooling request's rows in this step's flattened batch."""

    index: int  # into the step's request list
    row_start: int
    row_end: int
    completes: bool  # the slice reaches the end of the prompt: pool after this forward


@dataclass
class PoolingSlice:
    """What pooling needs of one scheduled request: its whole prompt and this step's part of it."""

    request_id: str
    token_ids: Sequence[int]
    start: int  # first token of this step's slice
    length: int  # tokens scheduled this step
    pooling: PoolingState | None


def token_type_ids(slices: list[PoolingSlice], num_types: int,
                   request_errors: dict[str, str]) -> torch.Tensor | None:
    """[num_tokens] BERT segment ids when some request of an encoder step carries them (zeros elsewhere), else
    None; a request whose list does not match its tokens fails alone."""
    if not any(s.pooling is not None and s.pooling.params.token_type_ids for s in slices):
        return None
    type_ids: list[int] = []
    for s in slices:
        given = s.pooling.params.token_type_ids if s.pooling is not None else None
        if given and (len(given) != len(s.token_ids) or not 0 <= min(given) <= max(given) < num_types):
            request_errors[s.request_id] = (f"token_type_ids must be {len(s.token_ids)} values (one per token) "
                                            f"in 0..{num_types - 1}")
            given = None
        type_ids.extend(given[s.start:s.start + s.length] if given else [0] * s.length)
    return torch.tensor(type_ids, dtype=torch.int64)  # [num_tokens]


def pool_step(slices: list[PoolingSlice], spans: list[PoolingSpan], hidden: torch.Tensor,
              pooler_config: PoolerConfig, head: Callable[[torch.Tensor], torch.Tensor] | None,
              request_errors: dict[str, str]) -> list[PoolingOutput | None] | None:
    """Rank 0: hold the rows of partial prefill chunks; pool the requests whose prompt this step completes.
    None when the step finishes no pooling request."""
    outputs: list[PoolingOutput | None] = [None] * len(slices)
    for span in spans:
        s = slices[span.index]
        pooling = s.pooling
        assert pooling is not None
        rows = hidden[span.row_start:span.row_end]  # [n, hidden]
        if not span.completes:
            pooling.held_rows.append(rows.clone())  # a copy: a view would keep the whole step's hidden alive
            continue
        if pooling.held_rows:
            rows = torch.cat([*pooling.held_rows, rows])  # [num_prompt_tokens, hidden]
            pooling.held_rows = []
        if s.request_id in request_errors:
            continue
        if rows.shape[0] != len(s.token_ids):
            request_errors[s.request_id] = (f"pooling needs every prompt row computed here, got {rows.shape[0]} "
                                            f"of {len(s.token_ids)} (a prefix-cache hit?)")
        else:
            try:
                outputs[span.index] = pool(rows, pooler_config, pooling.params, head)
            except PoolingError as exc:
                request_errors[s.request_id] = str(exc)
    return outputs if any(output is not None for output in outputs) else None
