"""The interface between the executor and wherever the ranks run, and the error that ends the engine.

`engine_core/executor.py` drives a `WorkerGroup`: its own `ProcessWorkers` (local processes) or
`engine_core/ray_workers.py`'s `RayWorkers` (Ray actors). Both sides import this module, never each other.
"""
from __future__ import annotations

from typing import Any, Protocol

import zmq


class EngineDeadError(RuntimeError):
    """A worker died or failed; the engine cannot go on."""


class WorkerGroup(Protocol):
    """Where the ranks run: local processes (`ProcessWorkers`, `--distributed-executor-backend mp`) or Ray actors
    (`engine_core.ray_workers.RayWorkers`, `ray`). Either way each rank runs `run_worker`, so the ZeroMQ step
    protocol is the same."""

    def bind(self, socket: zmq.Socket[bytes], name: str) -> str:
        """Bind `socket` where every rank can reach it; return the address the ranks connect to."""
        ...

    def distributed_init_method(self, port: int) -> str:
        """torch.distributed's init_method (rank 0 listens there); `port` 0 = pick a free one."""
        ...

    def start(self, rank: int, worker_args: tuple[Any, ...]) -> None:
        """Run `run_worker(*worker_args)` as rank `rank`."""
        ...

    def dead(self) -> list[str]:
        """One description per rank that is no longer running (empty while all are)."""
        ...

    def stop(self, timeout_s: float) -> None:
        """Give the ranks `timeout_s` to exit (after `Shutdown`), then kill what is left and free resources."""
        ...
