"""Sizing and allocating the paged KV cache: one `[2, num_blocks, block_size, num_kv_heads, head_dim]` tensor per
layer (0 = keys, 1 = values), `num_kv_heads` being this rank's share."""
from __future__ import annotations

from typing import Protocol

import torch


class _CacheShape(Protocol):
    num_layers: int
    num_kv_heads: int
    head_dim: int


def kv_cache_bytes_per_block(model: _CacheShape, block_size: int, dtype: torch.dtype) -> int:
    """Bytes one block takes across all layers (keys and values)."""
    element_size = torch.empty((), dtype=dtype).element_size()
    return 2 * model.num_layers * block_size * model.num_kv_heads * model.head_dim * element_size


def allocate_kv_caches(model: _CacheShape, num_blocks: int, block_size: int, dtype: torch.dtype,
                       device: torch.device) -> list[torch.Tensor]:
    """Zero-filled caches: padding slots read by batched decode are masked out, but must hold finite values
    (NaN * 0 is NaN), so fresh memory is zeroed rather than left uninitialized."""
    shape = (2, num_blocks, block_size, model.num_kv_heads, model.head_dim)
    return [torch.zeros(shape, dtype=dtype, device=device) for _ in range(model.num_layers)]
