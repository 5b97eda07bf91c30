"""Starts the worker processes, broadcasts each step to every rank, and collects rank 0's answer.

Each rank has its own PUSH socket (no slow-joiner loss as with PUB/SUB); the same encoded bytes go to all.
Results come back on one PULL socket. While waiting, the executor watches the worker processes so a dead
worker becomes `EngineDeadError` instead of a hang.
"""
from __future__ import annotations

import logging
import multiprocessing
import time

import msgspec
import zmq

from engine_core.config import EngineConfig
from engine_core.process_utils import free_tcp_port, new_ipc_address
from engine_core.protocol import (InitializeCache, ModelRunnerOutput, SchedulerOutput, Shutdown, WorkerFailure,
                                  WorkerReady, worker_to_core_decoder)
from workers.worker import WorkerAddresses, run_worker

logger = logging.getLogger("conveyor.executor")

_POLL_MS = 200


class EngineDeadError(RuntimeError):
    """A worker died or failed; the engine cannot go on."""


class Executor:
    """Owns the worker processes of one engine core."""

    def __init__(self, config: EngineConfig, startup_timeout_s: float = 900.0) -> None:
        self._tp_size = config.parallel.tensor_parallel_size
        self._context = zmq.Context()
        self._encoder = msgspec.msgpack.Encoder()
        self._results = self._context.socket(zmq.PULL)
        results_address = new_ipc_address("results")
        self._results.bind(results_address)
        self._step_sockets: list[zmq.Socket[bytes]] = []
        self._processes: list[multiprocessing.process.BaseProcess] = []
        init_method = f"tcp://127.0.0.1:{config.parallel.distributed_init_port or free_tcp_port()}"
        spawn = multiprocessing.get_context("spawn")
        for rank in range(self._tp_size):
            steps = self._context.socket(zmq.PUSH)
            steps_address = new_ipc_address(f"steps{rank}")
            steps.bind(steps_address)
            self._step_sockets.append(steps)
            addresses = WorkerAddresses(steps_address, results_address, init_method)
            process = spawn.Process(target=run_worker, name=f"conveyor-worker{rank}",
                                    args=(config.model, config.cache, config.parallel, rank, addresses))
            process.start()
            self._processes.append(process)
        self.num_blocks = self._handshake(config, startup_timeout_s)

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
        if config.cache.num_blocks_override:
            num_blocks = config.cache.num_blocks_override
        self._broadcast(InitializeCache(num_blocks=num_blocks))
        logger.info("%d worker(s) ready on %s; %d KV blocks of %d tokens", self._tp_size, ready[0].device,
                    num_blocks, config.cache.block_size)
        return num_blocks

    def execute(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        """Run one step on all ranks; return rank 0's result."""
        self._broadcast(scheduler_output)
        while True:
            message = self._receive()
            if isinstance(message, ModelRunnerOutput):
                return message

    def check_alive(self) -> None:
        dead = [p.name for p in self._processes if not p.is_alive()]
        if dead:
            raise EngineDeadError(f"worker process died: {', '.join(dead)}")

    def _broadcast(self, message: msgspec.Struct, flags: int = 0) -> None:
        payload = self._encoder.encode(message)
        for socket in self._step_sockets:
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
        deadline = time.monotonic() + 5.0
        for process in self._processes:
            process.join(timeout=max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                process.kill()
                process.join(timeout=2.0)
        self._context.destroy(linger=0)
