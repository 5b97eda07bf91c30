"""The engine core process: one explicit loop over input -> schedule -> execute -> publish.

```
 frontends ──DEALER──▶ ROUTER (I/O thread) ──queue──▶ main loop ──▶ Executor ──▶ workers
     ▲                      │ heartbeats + stats           │
     └──────────────────────┴──── inproc PUSH/PULL ◀────────┘ EngineCoreOutputs per client
```
The I/O thread owns the ROUTER socket: it decodes input, sends outputs, and sends every registered frontend a
heartbeat (with the latest stats) each second, so frontends can tell a live engine from a dead one even while a
long forward pass runs. If the loop fails, every frontend gets the `engine_dead` sentinel before the process exits.
"""
from __future__ import annotations

import logging
import queue
import signal
import threading
import time
from typing import Iterable, Protocol

import msgspec
import zmq

from engine_core.config import EngineConfig
from engine_core.executor import Executor
from engine_core.kv_transfer import KVConnectorScheduler
from engine_core.model_info import describe_model
from engine_core.process_utils import become_child_process, configure_logging
from engine_core.protocol import (AbortRequest, ClientHello, EngineCoreOutput, EngineCoreOutputs, EngineCoreRequest,
                                  EngineInfo, EngineRegistration, FrontendMessage, SchedulerStats,
                                  frontend_message_decoder, frontend_message_encoder)
from engine_core.scheduler import Scheduler
from engine_core.worker_group import EngineDeadError

logger = logging.getLogger("conveyor.core")

class EventLike(Protocol):
    def set(self) -> None: ...


HEARTBEAT_INTERVAL_S = 1.0
STATS_LOG_INTERVAL_S = 10.0
_BROADCAST = -1  # pseudo client index: send to every registered frontend


def client_identity(client_index: int) -> bytes:
    """The ZeroMQ routing id a frontend with this index uses (it sets it on its DEALER socket)."""
    return client_index.to_bytes(4, "little")


class FrontendIO:
    """Background thread that owns the frontend-facing ROUTER socket.

    On data-parallel rank 0 it also answers `ClientHello(want_engine_info=True)` with `engine_info` and keeps
    its table of engine addresses current as other ranks register.
    """

    def __init__(self, context: zmq.Context[zmq.Socket[bytes]], address: str,
                 engine_info: EngineInfo | None = None) -> None:
        self.inputs: queue.Queue[FrontendMessage] = queue.Queue()
        self.latest_stats = SchedulerStats()
        self._engine_info = engine_info
        self._context = context
        self._router = context.socket(zmq.ROUTER)
        self._router.setsockopt(zmq.ROUTER_MANDATORY, 0)  # drop output for a frontend that went away
        # A frontend reconnects with the same routing id after its start-up handshake: let it take over.
        self._router.setsockopt(zmq.ROUTER_HANDOVER, 1)
        self._router.bind(address)
        self._outbox_address = f"inproc://outbox-{id(self)}"
        self._outbox_pull = context.socket(zmq.PULL)
        self._outbox_pull.bind(self._outbox_address)
        self._outbox_push = context.socket(zmq.PUSH)  # used by the main thread only
        self._outbox_push.connect(self._outbox_address)
        self._encoder = msgspec.msgpack.Encoder()
        self._clients: set[bytes] = set()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="frontend-io", daemon=True)
        self._thread.start()

    def send(self, client_index: int, outputs: EngineCoreOutputs) -> None:
        """Queue outputs for one frontend (main thread)."""
        self._outbox_push.send_multipart([client_index.to_bytes(4, "little", signed=True),
                                          self._encoder.encode(outputs)])

    def broadcast(self, outputs: EngineCoreOutputs) -> None:
        self.send(_BROADCAST, outputs)

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=2.0)

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._router, zmq.POLLIN)
        poller.register(self._outbox_pull, zmq.POLLIN)
        next_heartbeat = time.monotonic()
        while not self._stopping.is_set():
            events = dict(poller.poll(timeout=int(HEARTBEAT_INTERVAL_S * 250)))
            if self._router in events:
                self._receive_all()
            if self._outbox_pull in events:
                self._send_all()
            if time.monotonic() >= next_heartbeat:
                next_heartbeat = time.monotonic() + HEARTBEAT_INTERVAL_S
                heartbeat = self._encoder.encode(EngineCoreOutputs(scheduler_stats=self.latest_stats))
                for identity in self._clients:
                    self._router.send_multipart([identity, heartbeat])
        self._send_all()  # flush the last outputs (the dead-engine sentinel among them)

    def _receive_all(self) -> None:
        while True:
            try:
                identity, payload = self._router.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                message = frontend_message_decoder.decode(payload)
            except msgspec.DecodeError as exc:
                logger.warning("dropping undecodable frontend message: %s", exc)
                continue
            if isinstance(message, EngineRegistration):
                self._register_engine(message)
                continue
            self._clients.add(identity)
            if isinstance(message, ClientHello):
                if message.want_engine_info and self._engine_info is not None:
                    reply = EngineCoreOutputs(scheduler_stats=self.latest_stats, engine_info=self._engine_info)
                    self._router.send_multipart([identity, self._encoder.encode(reply)])
            else:
                self.inputs.put(message)

    def _register_engine(self, registration: EngineRegistration) -> None:
        addresses = self._engine_info.engine_addresses if self._engine_info is not None else []
        if not 0 < registration.dp_rank < len(addresses):
            logger.warning("ignoring a registration from data-parallel rank %d (this engine expects ranks 1..%d)",
                           registration.dp_rank, len(addresses) - 1)
            return
        if addresses[registration.dp_rank] != registration.address:
            logger.info("data-parallel engine %d registered at %s", registration.dp_rank, registration.address)
        addresses[registration.dp_rank] = registration.address

    def _send_all(self) -> None:
        while True:
            try:
                target, payload = self._outbox_pull.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            index = int.from_bytes(target, "little", signed=True)
            identities = list(self._clients) if index == _BROADCAST else [client_identity(index)]
            for identity in identities:
                self._router.send_multipart([identity, payload])


class StatsLogger:
    """One concise log line every STATS_LOG_INTERVAL_S while the engine is busy."""

    def __init__(self, enabled: bool = True) -> None:
        self._enabled = enabled  # False: --disable-log-stats
        self._last_time = time.monotonic()
        self._last = SchedulerStats()
        self._generated_tokens = 0

    def record(self, stats: SchedulerStats, num_generated_tokens: int) -> None:
        if not self._enabled:
            return
        self._generated_tokens += num_generated_tokens
        elapsed = time.monotonic() - self._last_time
        if elapsed < STATS_LOG_INTERVAL_S:
            return
        if stats.num_steps != self._last.num_steps:
            queries = stats.prefix_cache_queries - self._last.prefix_cache_queries
            hits = stats.prefix_cache_hits - self._last.prefix_cache_hits
            logger.info("running %d, waiting %d reqs | generation %.1f tok/s | %.1f steps/s | KV cache %.1f%% | "
                        "prefix cache hit rate %.1f%% | preemptions %d", stats.num_running_reqs,
                        stats.num_waiting_reqs, self._generated_tokens / elapsed,
                        (stats.num_steps - self._last.num_steps) / elapsed, 100 * stats.kv_cache_usage,
                        100 * hits / queries if queries else 0.0, stats.num_preemptions)
        self._last_time, self._last, self._generated_tokens = time.monotonic(), stats, 0


class EngineCore:
    """Scheduler + executor + the loop that drives them."""

    def __init__(self, config: EngineConfig) -> None:
        self._config = config
        self._executor = Executor(config)
        self._scheduler = Scheduler(config.scheduler, config.cache, self._executor.num_blocks,
                                    *self._kv_connector(config))
        self._context = zmq.Context()
        self._io = FrontendIO(self._context, config.engine_address,
                              self._engine_info(config, self._executor.logits_processors))
        if config.dp_master_address:
            self._register_with_master(config)
        self._stats_logger = StatsLogger(config.log_stats)
        self._running = True

    @staticmethod
    def _kv_connector(config: EngineConfig) -> tuple[KVConnectorScheduler | None, str]:
        kv_transfer = config.cache.kv_transfer
        if kv_transfer is None:
            return None, "recompute"
        logger.info("KV transfer: %s as %s (engine id %s)", kv_transfer.kv_connector, kv_transfer.kv_role,
                    kv_transfer.engine_id)
        connector = KVConnectorScheduler(kv_transfer, config.cache.block_size, config.parallel.data_parallel_rank,
                                         config.parallel.tensor_parallel_size)
        return connector, kv_transfer.kv_load_failure_policy

    @staticmethod
    def _engine_info(config: EngineConfig, logits_processors: list[str]) -> EngineInfo | None:
        """Rank 0 answers frontends' start-up questions; other ranks only serve requests."""
        if config.parallel.data_parallel_rank != 0:
            return None
        addresses = [config.engine_address] + [""] * (config.parallel.data_parallel_size - 1)
        return EngineInfo(model=describe_model(config.model, logits_processors), engine_addresses=addresses)

    def _register_with_master(self, config: EngineConfig) -> None:
        """Tell data-parallel rank 0 where frontends reach this core (queued by ZeroMQ until rank 0 is up)."""
        self._master = self._context.socket(zmq.DEALER)
        self._master.setsockopt(zmq.LINGER, 0)
        self._master.connect(config.dp_master_address)
        self._master.send(frontend_message_encoder.encode(
            EngineRegistration(config.parallel.data_parallel_rank, config.engine_address)))

    def stop(self) -> None:
        self._running = False

    def run(self) -> None:
        """The busy loop. Blocks for input only when there is nothing to run."""
        while self._running:
            self._scheduler.expire_kv_leases(time.time())
            idle = not self._scheduler.has_work_for_workers()
            # KV transfers in flight: the workers report progress only when asked, so ask again soon.
            transfer_poll_s = self._scheduler.transfer_poll_interval()
            self._process_inputs(self._take_inputs(timeout_s=(transfer_poll_s or HEARTBEAT_INTERVAL_S) if idle else 0))
            run_step = self._scheduler.has_work_for_workers() or transfer_poll_s is not None
            outputs_by_client = self._step() if run_step else {}
            stats = self._scheduler.make_stats()
            for client_index, outputs in outputs_by_client.items():
                self._io.send(client_index, EngineCoreOutputs(outputs=outputs, scheduler_stats=stats))
            self._io.latest_stats = stats
            self._stats_logger.record(stats, sum(len(output.new_token_ids) for outputs in outputs_by_client.values()
                                                 for output in outputs))

    def _take_inputs(self, timeout_s: float) -> list[FrontendMessage]:
        """Everything queued; waits up to `timeout_s` for the first message when nothing is queued."""
        messages: list[FrontendMessage] = []
        if timeout_s > 0:
            try:
                messages.append(self._io.inputs.get(timeout=timeout_s))
            except queue.Empty:
                self._executor.check_alive()
                return messages
        while True:
            try:
                messages.append(self._io.inputs.get_nowait())
            except queue.Empty:
                return messages

    def _process_inputs(self, messages: Iterable[FrontendMessage]) -> None:
        for message in messages:
            if isinstance(message, EngineCoreRequest):
                rejected = self._scheduler.add_request(message)
                if rejected is not None:
                    self._io.send(message.client_index, EngineCoreOutputs(outputs=[rejected]))
            elif isinstance(message, AbortRequest):
                self._scheduler.abort_requests(message.request_ids)

    def _step(self) -> dict[int, list[EngineCoreOutput]]:
        """Schedule and execute one step; returns its outputs grouped by frontend."""
        scheduler_output = self._scheduler.schedule()
        runner_output = self._executor.execute(scheduler_output)
        return self._scheduler.update_from_output(scheduler_output, runner_output)

    def publish_dead(self, reason: str) -> None:
        logger.error("engine dead: %s", reason)
        self._io.broadcast(EngineCoreOutputs(engine_dead=True))

    def shutdown(self) -> None:
        self._io.stop()
        self._executor.shutdown()
        self._context.destroy(linger=500)


def run_engine_core(config: EngineConfig, ready_event: EventLike | None = None) -> None:
    """Process entry point: build the engine, signal readiness, loop until SIGTERM or death (exit code 1)."""
    # Ctrl-C reaches the whole process group: the launcher drains the frontends first, then stops us with SIGTERM.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    suffix = str(config.parallel.data_parallel_rank) if config.parallel.data_parallel_size > 1 else ""
    become_child_process(f"conveyor-core{suffix}")
    configure_logging(f"core{suffix}")
    core = EngineCore(config)
    signal.signal(signal.SIGTERM, lambda *_: core.stop())
    if ready_event is not None:
        ready_event.set()
    logger.info("engine core ready at %s", config.engine_address)
    try:
        core.run()
    except EngineDeadError as exc:
        core.publish_dead(str(exc))
        raise SystemExit(1)
    except Exception as exc:
        logger.exception("engine core loop failed")
        core.publish_dead(f"{type(exc).__name__}: {exc}")
        raise SystemExit(1)
    finally:
        core.shutdown()

