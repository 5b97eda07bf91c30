"""The weight-loading loop every model shares: Hugging Face-named tensors, one at a time, into our (fused,
sharded) parameters. Each model says only how names map and which checkpoint tensors it knowingly drops."""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import torch
from torch import nn

from workers.layers.quantized import QuantizedTensor

logger = logging.getLogger("conveyor.loader")

ShardId = str | int | None
Rename = Callable[[str], tuple[str, ShardId]]  # HF name -> (our parameter name, shard id for its load_weight)


def load_hf_weights(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor | QuantizedTensor]], rename: Rename,
                    expected_unused: Callable[[str], bool],
                    take: Callable[[str, torch.Tensor], bool] | None = None) -> set[str]:
    """Copy every tensor into its parameter (through the owning module's `load_weight(param, tensor, shard_id)`
    when it has one: fused q/k/v, tensor-parallel shards); returns the names of parameters nothing filled.

    `expected_unused(name)`: a checkpoint tensor with no parameter that is no surprise (a tied head, a buffer, a
    pretraining head), so no warning. `take(name, tensor)`: a model's own path for a tensor (True: consumed).
    Quantized tensors reach only modules with a `load_weight` (which keep them quantized); others get floats."""
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    for hf_name, checkpoint_tensor in weights:
        name, shard_id = rename(hf_name)
        module_name, _, param_name = name.rpartition(".")
        loader = getattr(model.get_submodule(module_name), "load_weight", None) if name in params else None
        tensor = checkpoint_tensor
        if isinstance(tensor, QuantizedTensor) and loader is None:
            tensor = tensor.dequantize()
        if take is not None and take(name, tensor):  # type: ignore[arg-type]  # quantized only where a loader is
            loaded.add(name)
            continue
        if name not in params:
            if not expected_unused(name):
                logger.warning("ignoring checkpoint tensor %s: no such parameter", hf_name)
            continue
        if loader is not None:
            loader(param_name, tensor, shard_id)
        else:
            params[name].data.copy_(tensor)  # type: ignore[arg-type]
        loaded.add(name)
    return set(dict(model.named_parameters())) - loaded  # after `take`, which may replace a head


def raise_if_missing(missing: set[str]) -> None:
    if missing:
        raise ValueError(f"checkpoint is missing {len(missing)} parameters, e.g. {sorted(missing)[:3]}")
