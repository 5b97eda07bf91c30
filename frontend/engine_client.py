"""Async client of the engine core: one ZeroMQ DEALER socket, one reader task, one queue per request.

```
 generate(req) ──encode──▶ DEALER ══════▶ ROUTER (engine core)
      ▲                       │
 queue[request_id] ◀── reader task ◀── EngineCoreOutputs (outputs, scheduler_stats, engine_dead)
                              └── watchdog: no message for `heartbeat_timeout_s` => engine dead
```
With data parallelism there is one DEALER (and one reader task) per engine core.
Invariants: a request id has a queue exactly while its `generate()` runs; a `generate()` that ends before its
request finished (client gone, stop string matched, cancellation) aborts the request in the engine. Once the
engine is dead, waiting requests fail and new ones answer 503 at once. It stays dead, unless the client was made
with `reconnect_model` (`conveyor frontend --engine-address`): then, while rank 0's socket is connected, it asks
the engine at that address who it is each second, and an engine serving that same model is used again.
"""
from __future__ import annotations

import asyncio
import logging
import struct
import time
from dataclasses import dataclass
from typing import AsyncIterator, Protocol, Union

import zmq
import zmq.asyncio

from engine_core.protocol import (AbortRequest, ClientHello, EngineCoreOutput, EngineCoreRequest, EngineInfo,
                                  FrontendMessage, ModelInfo, SchedulerStats, engine_outputs_decoder,
                                  frontend_message_encoder)
from frontend.errors import BadRequestError, EngineDeadError

logger = logging.getLogger("conveyor.frontend")

DEFAULT_HEARTBEAT_TIMEOUT_S = 5.0  # the core sends something at least every 1 s
_RECONNECT_HELLO_INTERVAL_S = 1.0  # while dead and connected: how often to ask the engine who it is
_REFUSED_HELLO_INTERVAL_S = 10.0  # after an engine with another model answered: ask less often

_QueueItem = Union[EngineCoreOutput, EngineDeadError]


class EngineClient(Protocol):
    """What routers and serving code need from an engine; tests may substitute any implementation."""

    client_index: int

    @property
    def is_dead(self) -> bool: ...

    @property
    def dead_reason(self) -> str | None: ...

    @property
    def engine_stats(self) -> list[SchedulerStats | None]:
        """The latest stats of each engine core, by data-parallel rank."""
        ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def generate(self, request: EngineCoreRequest) -> AsyncIterator[EngineCoreOutput]:
        """Submit `request` and yield its outputs; the last one has `finish_reason` set.

        Raises `EngineDeadError` if the engine is or becomes dead. Closing the iterator early aborts the request.
        """
        ...

    async def abort(self, request_ids: list[str]) -> None: ...


@dataclass
class _EngineConnection:
    """One data-parallel engine core as this frontend sees it."""

    rank: int
    address: str
    socket: zmq.asyncio.Socket
    last_message_time: float
    stats: SchedulerStats | None = None
    sent_since_stats: int = 0  # requests sent after the latest stats, which cannot count them yet
    connected: bool = True  # kept current by a socket monitor only when reconnecting (rank 0)

    @property
    def load(self) -> int:
        reported = 0 if self.stats is None else self.stats.num_running_reqs + self.stats.num_waiting_reqs
        return reported + self.sent_since_stats


class ZmqEngineClient:
    """`EngineClient` over ZeroMQ; each engine core (one per data-parallel rank) binds a ROUTER at its address.

    A request goes to the least-loaded engine (running + waiting, from the stats every output and heartbeat
    carries, plus what this frontend sent since); ties rotate so equal engines share the work.
    """

    def __init__(self, engine_addresses: str | list[str], client_index: int,
                 heartbeat_timeout_s: float = DEFAULT_HEARTBEAT_TIMEOUT_S,
                 reconnect_model: ModelInfo | None = None) -> None:
        self.engine_addresses = [engine_addresses] if isinstance(engine_addresses, str) else list(engine_addresses)
        self.client_index = client_index
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self._queues: dict[str, asyncio.Queue[_QueueItem]] = {}
        self._engine_of_request: dict[str, _EngineConnection] = {}
        self._engines: list[_EngineConnection] = []
        self._next_tie_break = 0
        self._dead_reason: str | None = None
        self._context: zmq.asyncio.Context | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._reconnect_model = reconnect_model  # None: once dead, dead for good
        self._next_hello_time = 0.0
        self._client_message: str | None = None  # what failed requests are told, when not the engine's death

    @property
    def is_dead(self) -> bool:
        return self._dead_reason is not None

    @property
    def dead_reason(self) -> str | None:
        return self._dead_reason

    @property
    def engine_stats(self) -> list[SchedulerStats | None]:
        """The latest stats of each engine, by data-parallel rank."""
        return [engine.stats for engine in self._engines]

    @property
    def num_in_flight(self) -> int:
        return len(self._queues)

    async def start(self) -> None:
        """Connect to every engine, say hello (so it sends us heartbeats), start the readers and the watchdog."""
        self._context = zmq.asyncio.Context()
        now = time.monotonic()
        for rank, address in enumerate(self.engine_addresses):
            sock = self._context.socket(zmq.DEALER)
            sock.setsockopt(zmq.ROUTING_ID, self.client_index.to_bytes(4, "little"))
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDHWM, 0)
            sock.setsockopt(zmq.RCVHWM, 0)
            engine = _EngineConnection(rank, address, sock, now)
            if rank == 0 and self._reconnect_model is not None:
                # Monitored from before the first connection, so `connected` never misses an event.
                engine.connected = False
                monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED)
                self._tasks.append(asyncio.create_task(self._reconnect_loop(engine, monitor),
                                                       name="engine-reconnect"))
            sock.connect(address)
            self._engines.append(engine)
            self._send_nowait(engine, ClientHello(self.client_index))
            self._tasks.append(asyncio.create_task(self._read_loop(engine), name=f"engine-reader-{rank}"))
        self._tasks.append(asyncio.create_task(self._watch_heartbeats(), name="engine-watchdog"))
        logger.info("frontend %d connected to %d engine core(s): %s", self.client_index, len(self._engines),
                    ", ".join(self.engine_addresses))

    async def close(self) -> None:
        """Abort what is still running, stop the tasks and close the sockets."""
        if not self.is_dead:
            self._abort_in_engines(list(self._queues))
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        for engine in self._engines:
            engine.socket.close(linger=100)
        self._engines = []
        if self._context is not None:
            self._context.term()
            self._context = None

    async def generate(self, request: EngineCoreRequest) -> AsyncIterator[EngineCoreOutput]:
        if self._dead_reason is not None:
            raise EngineDeadError(self._dead_message())
        request_id = request.request_id
        if request_id in self._queues:
            raise BadRequestError(f"request id {request_id!r} is already in use by a running request",
                                  param="request_id")
        queue: asyncio.Queue[_QueueItem] = asyncio.Queue()
        self._queues[request_id] = queue
        engine = self._least_loaded_engine()
        self._engine_of_request[request_id] = engine
        finished = False
        try:
            engine.sent_since_stats += 1
            self._send_nowait(engine, request)
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
            self._engine_of_request.pop(request_id, None)
            if not finished and not self.is_dead:
                self._send_nowait(engine, AbortRequest([request_id]))

    async def abort(self, request_ids: list[str]) -> None:
        if not self.is_dead:
            self._abort_in_engines(request_ids)

    def declare_dead(self, reason: str) -> None:
        """Fail every request in flight now (aborting it in the engine) and every later one, for good (no
        reconnect): the server is going away (the engine process exited, or the shutdown timeout ran out)."""
        self._reconnect_model = None
        if self._dead_reason is None:
            logger.warning("failing %d request(s) in flight: %s", len(self._queues), reason)
        self._declare_dead(reason, client_message=reason)

    # ------------------------------------------------------------------ internals

    def _least_loaded_engine(self) -> _EngineConnection:
        count = len(self._engines)
        start, self._next_tie_break = self._next_tie_break, (self._next_tie_break + 1) % count
        return min((self._engines[(start + offset) % count] for offset in range(count)), key=lambda e: e.load)

    def _abort_in_engines(self, request_ids: list[str]) -> None:
        by_engine: dict[int, list[str]] = {}
        for request_id in request_ids:
            engine = self._engine_of_request.get(request_id)
            if engine is not None:
                by_engine.setdefault(engine.rank, []).append(request_id)
        for rank, ids in by_engine.items():
            self._send_nowait(self._engines[rank], AbortRequest(ids))

    def _send_nowait(self, engine: _EngineConnection, message: FrontendMessage) -> None:
        """Queue one single-frame message; never blocks (unbounded high-water mark)."""
        future = engine.socket.send(frontend_message_encoder.encode(message), copy=False)
        future.add_done_callback(_log_send_failure)  # type: ignore[attr-defined]

    async def _read_loop(self, engine: _EngineConnection) -> None:
        while True:
            frame = await engine.socket.recv(copy=False)
            engine.last_message_time = time.monotonic()
            try:
                outputs = engine_outputs_decoder.decode(frame.buffer)
            except Exception as exc:  # a bad message must not kill the reader
                logger.warning("dropping an undecodable message from engine %d: %s", engine.rank, exc)
                continue
            if outputs.scheduler_stats is not None:
                engine.stats, engine.sent_since_stats = outputs.scheduler_stats, 0
            for output in outputs.outputs:
                queue = self._queues.get(output.request_id)
                if queue is not None:  # else: aborted by us; late outputs are expected
                    queue.put_nowait(output)
            if outputs.engine_dead:
                self._declare_dead(f"engine core {engine.rank} reported that it died")
            elif outputs.engine_info is not None and engine.rank == 0:
                self._maybe_revive(outputs.engine_info)

    async def _watch_heartbeats(self) -> None:
        interval_s = min(0.5, self.heartbeat_timeout_s / 4)
        while True:  # not only while alive: a reconnected engine is watched again
            slept_from = time.monotonic()
            await asyncio.sleep(interval_s)
            if time.monotonic() - slept_from > 2 * interval_s + 0.5 or self._dead_reason is not None:
                continue  # our own event loop was blocked: let the readers drain what arrived meanwhile
            for engine in self._engines:
                silent_s = time.monotonic() - engine.last_message_time
                if silent_s > self.heartbeat_timeout_s:
                    self._declare_dead(f"no message from engine core {engine.rank} for {silent_s:.1f} s")
                    break

    def _declare_dead(self, reason: str, client_message: str | None = None) -> None:
        """Fail every waiting request; from now on every request answers 503."""
        if self._dead_reason is not None:
            return
        if client_message is None:
            logger.error("engine is dead (%s); %d request(s) in flight fail, new ones answer 503",
                         reason, len(self._queues))
        self._abort_in_engines(list(self._queues))  # in case only heartbeats stopped: free the blocks
        self._dead_reason = reason
        self._client_message = client_message
        error = EngineDeadError(self._dead_message())
        for queue in self._queues.values():
            queue.put_nowait(error)

    async def _reconnect_loop(self, rank0: _EngineConnection, monitor: zmq.asyncio.Socket) -> None:
        """While dead: keep rank 0's connection state current, and ask the engine there who it is (only while
        connected, so no questions pile up in ZeroMQ's queue while nobody listens)."""
        hello_task = asyncio.create_task(self._hello_while_dead(rank0))
        try:
            while True:
                frames = await monitor.recv_multipart()
                event = struct.unpack("=hi", frames[0][:6])[0]
                rank0.connected = event == zmq.EVENT_HANDSHAKE_SUCCEEDED
                self._next_hello_time = 0.0  # a new engine may be there: ask at once
        finally:
            hello_task.cancel()
            rank0.socket.disable_monitor()
            monitor.close(linger=0)

    async def _hello_while_dead(self, rank0: _EngineConnection) -> None:
        while True:
            await asyncio.sleep(0.1)
            if (self._dead_reason is not None and self._reconnect_model is not None and rank0.connected
                    and time.monotonic() >= self._next_hello_time):
                self._next_hello_time = time.monotonic() + _RECONNECT_HELLO_INTERVAL_S
                self._send_nowait(rank0, ClientHello(self.client_index, want_engine_info=True))

    def _maybe_revive(self, info: EngineInfo) -> None:
        """An engine answered at rank 0's address while we are dead: serve through it again if it serves the
        same model (our tokenizer, template and limits were built from that) and every rank is known."""
        expected = self._reconnect_model
        if self._dead_reason is None or expected is None or not all(info.engine_addresses):
            return
        if info.model != expected or len(info.engine_addresses) != len(self._engines):
            self._next_hello_time = time.monotonic() + _REFUSED_HELLO_INTERVAL_S
            logger.error("refusing the engine now at %s: it serves %s (%s, max_model_len %d, %d engine(s)), this "
                         "frontend serves %s (%s, max_model_len %d, %d engine(s)); still answering 503",
                         self._engines[0].address, info.model.served_model_name, info.model.model,
                         info.model.max_model_len, len(info.engine_addresses), expected.served_model_name,
                         expected.model, expected.max_model_len, len(self._engines))
            return
        now = time.monotonic()
        for engine, address in zip(self._engines[1:], info.engine_addresses[1:]):
            if address != engine.address:  # a restarted data-parallel rank listens on a new port
                engine.socket.disconnect(engine.address)
                engine.socket.connect(address)
                engine.address = address
        for engine in self._engines:
            engine.stats, engine.sent_since_stats, engine.last_message_time = None, 0, now
            self._send_nowait(engine, ClientHello(self.client_index))  # register for heartbeats
        logger.info("the engine at %s is back (serving %s): serving again", self._engines[0].address,
                    expected.served_model_name)
        self._dead_reason, self._client_message = None, None

    def _dead_message(self) -> str:
        if self._client_message is not None:
            return self._client_message
        return f"the engine is not available ({self._dead_reason}); the server cannot serve requests"


def _log_send_failure(future: asyncio.Future[object]) -> None:
    if not future.cancelled() and future.exception() is not None:
        logger.warning("could not send a message to the engine core: %s", future.exception())
