"""Starts the worker processes, broadcasts each step to every rank, and collects rank 0's answer.

Each rank has its own PUSH socket (no slow-joiner loss as with PUB/SUB); the same encoded bytes go to all.
Results come back on one PULL socket. While waiting, the executor watches the workers so a dead worker becomes
`EngineDeadError` instead of a hang. Ranks are local processes (`--distributed-executor-backend mp`, ipc://
sockets) or Ray actors in a placement group (`ray`, tcp:// sockets on the core's node IP; engine_core/ray_workers.py).
"""
from __future__ import annotations

import logging
import multiprocessing
import time
from typing import Any

import msgspec
import zmq

from engine_core.config import EngineConfig
from engine_core.process_utils import free_tcp_port, new_ipc_address
from engine_core.protocol import (InitializeCache, KVConnectorOutput, ModelRunnerOutput, SchedulerOutput, Shutdown,
                                  WorkerFailure, WorkerReady, worker_to_core_decoder)
from engine_core.worker_group import EngineDeadError, WorkerGroup
from workers.worker import WorkerAddresses, run_worker

logger = logging.getLogger("conveyor.executor")

_POLL_MS = 200


class ProcessWorkers:
    """One local process per rank (multiprocessing spawn), reached over ipc:// sockets."""

    def __init__(self) -> None:
        self._spawn = multiprocessing.get_context("spawn")
        self._processes: list[multiprocessing.process.BaseProcess] = []

    def bind(self, socket: zmq.Socket[bytes], name: str) -> str:
        address = new_ipc_address(name)
        socket.bind(address)
        return address

    def distributed_init_method(self, port: int) -> str:
        return f"tcp://127.0.0.1:{port or free_tcp_port()}"

    def start(self, rank: int, worker_args: tuple[Any, ...]) -> None:
        process = self._spawn.Process(target=run_worker, name=f"conveyor-worker{rank}", args=worker_args)
        process.start()
        self._processes.append(process)

    def dead(self) -> list[str]:
        return [f"worker process died: {p.name}" for p in self._processes if not p.is_alive()]

    def stop(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        for process in self._processes:
            process.join(timeout=max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                process.kill()
                process.join(timeout=2.0)


def _make_worker_group(config: EngineConfig, startup_timeout_s: float) -> WorkerGroup:
    backend = config.parallel.distributed_executor_backend
    if backend == "ray":
        from engine_core.ray_workers import RayWorkers  # imports ray: only with --distributed-executor-backend ray

        return RayWorkers(config.parallel, startup_timeout_s)
    if backend != "mp":
        raise ValueError(f"unknown distributed executor backend {backend!r} (mp or ray)")
    return ProcessWorkers()


class _KVTransferAggregator:
    """A transfer is finished for the scheduler once every rank reported it (each moves its own heads);
    it failed if any rank failed."""

    def __init__(self, num_ranks: int) -> None:
        self._num_ranks = num_ranks
        self._sending: dict[str, int] = {}
        self._recving: dict[str, int] = {}
        self._failures: dict[str, str] = {}

    def merge(self, outputs: list[KVConnectorOutput | None]) -> KVConnectorOutput | None:
        sent: list[str] = []
        received: list[str] = []
        failed: dict[str, str] = {}
        for output in outputs:
            if output is None:
                continue
            sent += self._count(self._sending, output.finished_sending)
            for request_id, reason in output.failed_recving.items():
                self._failures.setdefault(request_id, reason)
            for request_id in self._count(self._recving, [*output.finished_recving, *output.failed_recving]):
                if request_id in self._failures:
                    failed[request_id] = self._failures.pop(request_id)
                else:
                    received.append(request_id)
        return KVConnectorOutput(sent, received, failed) if sent or received or failed else None

    def _count(self, counts: dict[str, int], request_ids: list[str]) -> list[str]:
        done = []
        for request_id in request_ids:
            counts[request_id] = counts.get(request_id, 0) + 1
            if counts[request_id] == self._num_ranks:
                del counts[request_id]
                done.append(request_id)
        return done


class Executor:
    """Owns the worker ranks (processes or Ray actors) of one engine core."""

    def __init__(self, config: EngineConfig, startup_timeout_s: float = 900.0) -> None:
        self._tp_size = config.parallel.tensor_parallel_size
        self._context = zmq.Context()
        self._encoder = msgspec.msgpack.Encoder()
        self._step_sockets: list[zmq.Socket[bytes]] = []
        self._kv_transfers = _KVTransferAggregator(self._tp_size)
        self._workers = _make_worker_group(config, startup_timeout_s)
        try:
            self._results = self._context.socket(zmq.PULL)
            results_address = self._workers.bind(self._results, "results")
            init_method = self._workers.distributed_init_method(config.parallel.distributed_init_port)
            for rank in range(self._tp_size):
                steps = self._context.socket(zmq.PUSH)
                self._step_sockets.append(steps)
                addresses = WorkerAddresses(self._workers.bind(steps, f"steps{rank}"), results_address, init_method)
                self._workers.start(rank, (config.model, config.cache, config.parallel, rank, addresses))
            self.num_blocks = self._handshake(config, startup_timeout_s)
        except BaseException:
            self._workers.stop(timeout_s=0.0)  # no half-started engine left behind (Ray actors outlive us)
            self._context.destroy(linger=0)
            raise

    def _handshake(self, config: EngineConfig, timeout_s: float) -> int:
        """Wait for every rank's WorkerReady, agree on the smallest block count, tell all ranks."""
        ready: dict[int, WorkerReady] = {}
        deadline = time.monotonic() + timeout_s
        while len(ready) < self._tp_size:
            if time.monotonic() > deadline:
                raise EngineDeadError(f"workers not ready after {timeout_s:.0f} s")
            message = self._receive()
            if isinstance(message, WorkerReady):
                ready[message.rank] = message
        num_blocks = min(worker.num_blocks for worker in ready.values())
        self.logits_processors = list(ready[0].logits_processors)  # what frontends may let requests select
        if config.cache.num_blocks_override:
            num_blocks = config.cache.num_blocks_override
        self._broadcast(InitializeCache(num_blocks=num_blocks))
        logger.info("%d worker(s) ready on %s; %d KV blocks of %d tokens (%s)", self._tp_size, ready[0].device,
                    num_blocks, config.cache.block_size, ready[0].kv_cache_dtype)
        return num_blocks

    def execute(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        """Run one step on all ranks; return rank 0's samples with every rank's error and KV-transfer news."""
        self._broadcast(scheduler_output)
        by_rank: dict[int, ModelRunnerOutput] = {}
        while len(by_rank) < self._tp_size:
            message = self._receive()
            if isinstance(message, ModelRunnerOutput):
                by_rank[message.rank] = message
        if self._tp_size == 1:
            return by_rank[0]
        error = next((output.error for output in by_rank.values() if output.error is not None), None)
        kv_output = self._kv_transfers.merge([output.kv_connector_output for output in by_rank.values()])
        return msgspec.structs.replace(by_rank[0], error=error, kv_connector_output=kv_output)

    def check_alive(self) -> None:
        dead = self._workers.dead()
        if dead:
            raise EngineDeadError("; ".join(dead))

    def _broadcast(self, message: msgspec.Struct, flags: int = 0) -> None:
        """Send to every rank. A dead rank's PUSH socket has no peer and would block forever: wait in slices,
        checking the workers in between, so a death becomes EngineDeadError."""
        payload = self._encoder.encode(message)
        for socket in self._step_sockets:
            try:
                socket.send(payload, flags=zmq.NOBLOCK, copy=False)
                continue
            except zmq.Again:
                if flags & zmq.NOBLOCK:
                    raise
            while not socket.poll(_POLL_MS, zmq.POLLOUT):
                self.check_alive()
            socket.send(payload, flags=flags, copy=False)

    def _receive(self) -> WorkerReady | ModelRunnerOutput:
        """Next message from any rank; raises EngineDeadError on a failure report or a dead process."""
        while not self._results.poll(_POLL_MS):
            self.check_alive()
        message = worker_to_core_decoder.decode(self._results.recv())
        if isinstance(message, WorkerFailure):
            raise EngineDeadError(f"worker {message.rank} failed: {message.message}")
        return message

    def shutdown(self) -> None:
        """Ask workers to exit, then make sure they did."""
        try:
            self._broadcast(Shutdown(), flags=zmq.NOBLOCK)  # a dead worker must not block shutdown
        except zmq.ZMQError:
            pass
        self._workers.stop(timeout_s=5.0)
        self._context.destroy(linger=0)
