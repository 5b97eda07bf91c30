"""Async client of the engine core: one ZeroMQ DEALER socket, one reader task, one queue per request.

```
 generate(req) ──encode──▶ DEALER ══════▶ ROUTER (engine core)
      ▲                       │
 queue[request_id] ◀── reader task ◀── EngineCoreOutputs (outputs, scheduler_stats, engine_dead)
                              └── watchdog: no message for `heartbeat_timeout_s` => engine dead
```
Invariants: a request id has a queue exactly while its `generate()` runs; a `generate()` that ends before its
request finished (client gone, stop string matched, cancellation) aborts the request in the engine. Once the
engine is dead it stays dead: waiting requests fail and new ones answer 503 at once.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import AsyncIterator, Protocol, Union

import zmq
import zmq.asyncio

from engine_core.protocol import (AbortRequest, ClientHello, EngineCoreOutput, EngineCoreRequest, FrontendMessage,
                                  SchedulerStats, engine_outputs_decoder, frontend_message_encoder)
from frontend.errors import EngineDeadError

logger = logging.getLogger("conveyor.frontend")

DEFAULT_HEARTBEAT_TIMEOUT_S = 5.0  # the core sends something at least every 1 s

_QueueItem = Union[EngineCoreOutput, EngineDeadError]


class EngineClient(Protocol):
    """What routers and serving code need from an engine; tests may substitute any implementation."""

    client_index: int

    @property
    def is_dead(self) -> bool: ...

    @property
    def dead_reason(self) -> str | None: ...

    @property
    def scheduler_stats(self) -> SchedulerStats | None: ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def generate(self, request: EngineCoreRequest) -> AsyncIterator[EngineCoreOutput]:
        """Submit `request` and yield its outputs; the last one has `finish_reason` set.

        Raises `EngineDeadError` if the engine is or becomes dead. Closing the iterator early aborts the request.
        """
        ...

    async def abort(self, request_ids: list[str]) -> None: ...


class ZmqEngineClient:
    """`EngineClient` over ZeroMQ; the engine core binds a ROUTER at `engine_address`."""

    def __init__(self, engine_address: str, client_index: int,
                 heartbeat_timeout_s: float = DEFAULT_HEARTBEAT_TIMEOUT_S) -> None:
        self.engine_address = engine_address
        self.client_index = client_index
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self._queues: dict[str, asyncio.Queue[_QueueItem]] = {}
        self._stats: SchedulerStats | None = None
        self._dead_reason: str | None = None
        self._last_message_time = time.monotonic()
        self._context: zmq.asyncio.Context | None = None
        self._socket: zmq.asyncio.Socket | None = None
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def is_dead(self) -> bool:
        return self._dead_reason is not None

    @property
    def dead_reason(self) -> str | None:
        return self._dead_reason

    @property
    def scheduler_stats(self) -> SchedulerStats | None:
        return self._stats

    @property
    def num_in_flight(self) -> int:
        return len(self._queues)

    async def start(self) -> None:
        """Connect, say hello (so the core sends us heartbeats) and start the reader and the watchdog."""
        self._context = zmq.asyncio.Context()
        sock = self._context.socket(zmq.DEALER)
        sock.setsockopt(zmq.ROUTING_ID, self.client_index.to_bytes(4, "little"))
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
        sock.connect(self.engine_address)
        self._socket = sock
        self._last_message_time = time.monotonic()
        self._send_nowait(ClientHello(self.client_index))
        self._tasks = [asyncio.create_task(self._read_loop(), name="engine-reader"),
                       asyncio.create_task(self._watch_heartbeats(), name="engine-watchdog")]
        logger.info("frontend %d connected to the engine core at %s", self.client_index, self.engine_address)

    async def close(self) -> None:
        """Abort what is still running, stop the tasks and close the socket."""
        if self._queues and not self.is_dead:
            self._send_nowait(AbortRequest(list(self._queues)))
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if self._socket is not None:
            self._socket.close(linger=100)
            self._socket = None
        if self._context is not None:
            self._context.term()
            self._context = None

    async def generate(self, request: EngineCoreRequest) -> AsyncIterator[EngineCoreOutput]:
        if self._dead_reason is not None:
            raise EngineDeadError(self._dead_message())
        request_id = request.request_id
        if request_id in self._queues:
            raise ValueError(f"request id {request_id!r} is already running")
        queue: asyncio.Queue[_QueueItem] = asyncio.Queue()
        self._queues[request_id] = queue
        finished = False
        try:
            self._send_nowait(request)
            while not finished:
                item = await queue.get()
                if isinstance(item, EngineDeadError):
                    finished = True  # nothing to abort in a dead engine
                    raise item
                finished = item.finished
                yield item
        finally:
            # No await here: this also runs under cancellation (client disconnected).
            self._queues.pop(request_id, None)
            if not finished and not self.is_dead:
                self._send_nowait(AbortRequest([request_id]))

    async def abort(self, request_ids: list[str]) -> None:
        if request_ids and not self.is_dead:
            self._send_nowait(AbortRequest(list(request_ids)))

    # ------------------------------------------------------------------ internals

    def _send_nowait(self, message: FrontendMessage) -> None:
        """Queue one single-frame message; never blocks (unbounded high-water mark)."""
        assert self._socket is not None, "engine client not started"
        future = self._socket.send(frontend_message_encoder.encode(message), copy=False)
        future.add_done_callback(_log_send_failure)  # type: ignore[attr-defined]

    async def _read_loop(self) -> None:
        assert self._socket is not None
        while True:
            frame = await self._socket.recv(copy=False)
            self._last_message_time = time.monotonic()
            try:
                outputs = engine_outputs_decoder.decode(frame.buffer)
            except Exception as exc:  # a bad message must not kill the reader
                logger.warning("dropping an undecodable message from the engine core: %s", exc)
                continue
            if outputs.scheduler_stats is not None:
                self._stats = outputs.scheduler_stats
            for output in outputs.outputs:
                queue = self._queues.get(output.request_id)
                if queue is not None:  # else: aborted by us; late outputs are expected
                    queue.put_nowait(output)
            if outputs.engine_dead:
                self._declare_dead("the engine core reported that it died")
                return

    async def _watch_heartbeats(self) -> None:
        interval_s = min(0.5, self.heartbeat_timeout_s / 4)
        while self._dead_reason is None:
            slept_from = time.monotonic()
            await asyncio.sleep(interval_s)
            if time.monotonic() - slept_from > 2 * interval_s + 0.5:
                continue  # our own event loop was blocked: let the reader drain what arrived meanwhile
            silent_s = time.monotonic() - self._last_message_time
            if silent_s > self.heartbeat_timeout_s:
                self._declare_dead(f"no message from the engine core for {silent_s:.1f} s")

    def _declare_dead(self, reason: str) -> None:
        """Fail every waiting request; from now on every request answers 503."""
        if self._dead_reason is not None:
            return
        logger.error("engine core is dead (%s); %d request(s) in flight fail, new ones answer 503",
                     reason, len(self._queues))
        if self._queues:  # in case only the heartbeats stopped: free the engine's blocks
            self._send_nowait(AbortRequest(list(self._queues)))
        self._dead_reason = reason
        error = EngineDeadError(self._dead_message())
        for queue in self._queues.values():
            queue.put_nowait(error)

    def _dead_message(self) -> str:
        return f"the engine is not available ({self._dead_reason}); the server cannot serve requests"


def _log_send_failure(future: asyncio.Future[object]) -> None:
    if not future.cancelled() and future.exception() is not None:
        logger.warning("could not send a message to the engine core: %s", future.exception())
