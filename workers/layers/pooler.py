"""A pooling request's answer from its prompt's final hidden rows: `pool(rows, pooler_config, params, head)`.

    rows [num_prompt_tokens, hidden] --(pooling_type: CLS first row | MEAN | LAST row)--> pooled [hidden]
      embed:          pooled[:dimensions] -> L2-normalize?                 -> shape [n]
      token_embed:    every row, same                                      -> shape [num_tokens, n]
      classify/score: head(pooled) -> softmax/sigmoid unless use_activation is False -> shape [num_labels]
      token_classify: head(every row) -> same activation per row           -> shape [num_tokens, num_labels]

Everything is computed in float32 and leaves as little-endian float32 bytes (`PoolingOutput`).
"""
from __future__ import annotations

import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F

from engine_core.config import PoolerConfig
from engine_core.protocol import PoolingOutput, PoolingParams

Head = Callable[[torch.Tensor], torch.Tensor]  # [n, hidden] -> [n, num_labels] float32 raw scores


class PoolingError(ValueError):
    """A request the model cannot answer (wrong task for the model, bad `dimensions`): that request fails alone."""


def pool(rows: torch.Tensor, config: PoolerConfig, params: PoolingParams, head: Head | None) -> PoolingOutput:
    """rows: [num_prompt_tokens, hidden], the model's final hidden states of the whole prompt, in order."""
    rows = rows.float()  # [T, hidden]
    task = params.task
    if task == "embed":
        return _to_output(_embed(_pooled(rows, config.pooling_type), config, params))  # [n]
    if task == "token_embed":
        return _to_output(_embed(rows, config, params))  # [T, n]
    if task in ("classify", "score"):
        return _to_output(_classify(_pooled(rows, config.pooling_type).unsqueeze(0), config, params, head)[0])
    if task == "token_classify":
        return _to_output(_classify(rows, config, params, head))  # [T, num_labels]
    raise PoolingError(f"unknown pooling task {task!r}")


def _pooled(rows: torch.Tensor, pooling_type: str) -> torch.Tensor:
    """[T, hidden] -> [hidden]."""
    if pooling_type == "CLS":
        return rows[0]
    if pooling_type == "LAST":
        return rows[-1]
    if pooling_type == "MEAN":
        return rows.mean(dim=0)
    raise PoolingError(f"unknown pooling_type {pooling_type!r}")


def _embed(vectors: torch.Tensor, config: PoolerConfig, params: PoolingParams) -> torch.Tensor:
    """[..., hidden] -> [..., n]: keep the first `dimensions` values, then L2-normalize (matryoshka order)."""
    if params.dimensions is not None:
        if not 0 < params.dimensions <= vectors.shape[-1]:
            raise PoolingError(f"dimensions must be between 1 and {vectors.shape[-1]}, got {params.dimensions}")
        vectors = vectors[..., : params.dimensions]
    normalize = params.normalize if params.normalize is not None else (
        params.use_activation if params.use_activation is not None else config.normalize)
    return F.normalize(vectors, p=2.0, dim=-1) if normalize else vectors


def _classify(vectors: torch.Tensor, config: PoolerConfig, params: PoolingParams, head: Head | None) -> torch.Tensor:
    """[n, hidden] -> [n, num_labels]: the model's head, then its activation unless use_activation is False."""
    if head is None:
        raise PoolingError("this model has no classification head (it serves embed and token_embed)")
    scores = head(vectors).float()  # [n, num_labels]
    if params.use_activation is False:
        return scores
    if config.classifier_activation == "sigmoid":
        return torch.sigmoid(scores)
    if config.classifier_activation == "softmax":
        return torch.softmax(scores, dim=-1)
    raise PoolingError(f"unknown classifier_activation {config.classifier_activation!r}")


def _to_output(values: torch.Tensor) -> PoolingOutput:
    array = values.detach().to("cpu", torch.float32).contiguous().numpy()
    if sys.byteorder == "big":
        array = array.byteswap()
    return PoolingOutput(shape=list(array.shape), data=array.tobytes())
