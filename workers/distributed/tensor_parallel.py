"""This worker's tensor-parallel collectives, as the layers call them.

Ranks on one host (CPU, float32 tensors) go through shared memory (shm_comm.py): a few microseconds per call
where gloo's TCP loopback takes tens to hundreds. Everything else (other dtypes, ranks on several hosts, CUDA
with NCCL) goes through torch.distributed.
"""
from __future__ import annotations

import logging

import torch
import torch.distributed as dist

from workers.distributed.shm_comm import ShmCommunicator

logger = logging.getLogger("conveyor.tensor_parallel")

_shm: ShmCommunicator | None = None


def init(rank: int, world: int, device: torch.device) -> None:
    """After torch.distributed.init_process_group, on every rank (collective)."""
    global _shm
    _shm = ShmCommunicator.create(rank, world) if device.type == "cpu" else None
    if rank == 0:
        logger.info("tensor parallel over %d ranks: collectives through %s", world,
                    "shared memory (all ranks on this host)" if _shm is not None else dist.get_backend())


def shm_communicator() -> ShmCommunicator | None:
    """The shared-memory group when every rank is on this host (CPU), else None (one rank, gloo, NCCL)."""
    return _shm


def _shm_takes(x: torch.Tensor) -> bool:
    return _shm is not None and x.dtype == torch.float32 and x.device.type == "cpu" and x.is_contiguous()


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum over the ranks, in place; returns x."""
    if _shm_takes(x):
        assert _shm is not None
        _shm.all_reduce_(x)
    else:
        dist.all_reduce(x)
    return x


def all_gather_last_dim(x: torch.Tensor) -> torch.Tensor:
    """[..., n] on each rank -> [..., world * n], rank order (the vocabulary-parallel logits)."""
    if _shm_takes(x):
        assert _shm is not None
        parts = list(_shm.all_gather(x).unbind(0))
    else:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x)
    return torch.cat(parts, dim=-1)
