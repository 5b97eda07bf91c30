"""Starts, supervises and stops the process tree: engine core(s) (each starts its workers) and N frontends.

```
 SIGTERM/SIGINT ─▶ SIGTERM to each frontend (each drains: 503 to new requests, in-flight ones get up to
                   --shutdown-timeout s) ─▶ frontends gone ─▶ SIGTERM to the cores (they stop their workers) ─▶ exit 0
 a second signal ─▶ SIGKILL to every child at once ─▶ exit 1
 an engine core exits by itself (it, or one of its workers, died) ─▶ SIGUSR1 to each frontend (it fails its
                   in-flight requests and exits) ─▶ the other cores are stopped ─▶ exit 1, so a supervisor
                   (systemd, Kubernetes) restarts the server
```
Every child also dies with its parent (PR_SET_PDEATHSIG), so no orphans stay behind. `conveyor frontend` (no
cores here) outlives its engine instead: its frontends answer 503 and reconnect when the engine is back.
"""
from __future__ import annotations

import argparse
import atexit
import logging
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from multiprocessing.process import BaseProcess
from multiprocessing.synchronize import Event

from engine_core.config import EngineConfig, FrontendConfig
from engine_core.process_utils import configure_logging

logger = logging.getLogger("conveyor.launcher")


def serve(args: argparse.Namespace) -> int:
    """`conveyor serve`: the engine core(s) this host runs and, unless --headless, the frontends."""
    from conveyor.config_from_args import engine_config_from_args, frontend_config_from_args
    from conveyor.data_parallel import plan_data_parallel
    from engine_core.core import run_engine_core

    configure_logging("launcher")
    if not args.headless:
        _check_port_free(args.host, args.port)  # before the minutes a model load can take
    base_config, _ = engine_config_from_args(args, engine_address="")
    _log_serving_mode(base_config)
    plan = plan_data_parallel(args, base_config)
    stop = _StopSignals()
    spawn = multiprocessing.get_context("spawn")
    cores: list[BaseProcess] = []
    frontends: list[BaseProcess] = []
    try:
        readies = []
        for config in plan.local_engines:
            ready = spawn.Event()
            rank = config.parallel.data_parallel_rank
            core = spawn.Process(target=run_engine_core, args=(config, ready),
                                 name=f"conveyor-core{rank}" if len(plan.local_engines) > 1 else "conveyor-core")
            core.start()
            cores.append(core)
            readies.append(ready)
        if not all(_wait_for_core(core, ready, stop) for core, ready in zip(cores, readies)):
            return 1
        if args.headless:
            logger.info("headless engine serving %s; frontends connect with: conveyor frontend --engine-address %s",
                        base_config.model.served_model_name, plan.front_door_address)
            return _supervise(cores, [], stop, drain_s=0.0)
        frontend_config = frontend_config_from_args(args)
        frontends = _start_frontends(spawn, frontend_config, plan.front_door_address,
                                     client_indices=list(range(args.api_server_count)), reconnect=False)
        if _wait_for_port(args.host, args.port, frontends, stop):
            logger.info("serving %s on http://%s:%d (%d engine core(s), %d frontend process(es))",
                        base_config.model.served_model_name, args.host, args.port, len(cores), len(frontends))
        return _supervise(cores, frontends, stop, frontend_config.shutdown_timeout_s)
    finally:
        _stop_all([*frontends, *cores])


def run_frontends(args: argparse.Namespace) -> int:
    """`conveyor frontend`: stateless API servers for an engine that runs elsewhere."""
    from conveyor.config_from_args import frontend_config_from_args
    from frontend.engine_handshake import random_client_index

    configure_logging("launcher")
    _check_port_free(args.host, args.port)
    stop = _StopSignals()
    spawn = multiprocessing.get_context("spawn")
    frontend_config = frontend_config_from_args(args)
    # Frontends started on their own pick random routing ids: several hosts' frontends share one engine.
    frontends = _start_frontends(spawn, frontend_config, args.engine_address,
                                 client_indices=[random_client_index() for _ in range(args.api_server_count)],
                                 reconnect=True)
    try:
        if _wait_for_port(args.host, args.port, frontends, stop):
            logger.info("serving on http://%s:%d for the engine at %s (%d frontend process(es))", args.host,
                        args.port, args.engine_address, len(frontends))
        return _supervise([], frontends, stop, frontend_config.shutdown_timeout_s)
    finally:
        _stop_all(frontends)


def _log_serving_mode(config: EngineConfig) -> None:
    model, pooler = config.model, config.model.pooler
    if pooler is None:
        logger.info("%s (%s): runner generate, max_model_len %d", model.served_model_name, model.architecture,
                    model.max_model_len)
        return
    logger.info("%s (%s): runner pooling%s, tasks %s, %s pooling, %s, max_model_len %d",
                model.served_model_name, model.architecture,
                f" (converted: {model.convert})" if model.convert != "none" else "", ", ".join(pooler.tasks),
                pooler.pooling_type, f"{pooler.num_labels} label(s)" if pooler.num_labels else
                f"{pooler.embedding_size} dimensions{' normalized' if pooler.normalize else ''}", model.max_model_len)


def _check_port_free(host: str, port: int) -> None:
    """Our frontends share their port with SO_REUSEPORT, which would also let them share it with another server
    already there: refuse that, as a plain bind would."""
    family = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT leftovers are fine
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise SystemExit(f"cannot serve on {host}:{port}: {exc.strerror} (another server is using it?)") from None


class _StopSignals:
    """SIGTERM/SIGINT: the first asks for a graceful stop (`requested`), a second one for an immediate one."""

    def __init__(self) -> None:
        self.requested = threading.Event()
        self.immediate = threading.Event()
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, _frame: object) -> None:
        if self.requested.is_set():
            logger.warning("second stop signal (%s): stopping at once", signal.Signals(signum).name)
            self.immediate.set()
        self.requested.set()

    def is_set(self) -> bool:  # the `threading.Event` face the start-up waits use
        return self.requested.is_set()


def _start_frontends(spawn: multiprocessing.context.SpawnContext, frontend_config: FrontendConfig,
                     engine_address: str, client_indices: list[int], reconnect: bool) -> list[BaseProcess]:
    from frontend.server import run_frontend

    if len(client_indices) > 1:
        _share_metrics_between_frontends()
    frontends: list[BaseProcess] = []
    for process_index, client_index in enumerate(client_indices):
        process = spawn.Process(target=run_frontend, name=f"conveyor-frontend{process_index}",
                                args=(frontend_config, engine_address, client_index, process_index, reconnect))
        process.start()
        frontends.append(process)
    return frontends


def _share_metrics_between_frontends() -> None:
    """Prometheus' multiprocess mode for the API servers about to start (they inherit the variable): each keeps its
    counters in files under one fresh folder, and a scrape of any of them sums all (frontend/metrics.py). The
    folder goes when this process exits."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):  # the operator chose a folder
        return
    folder = tempfile.mkdtemp(prefix="conveyor-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = folder
    atexit.register(shutil.rmtree, folder, ignore_errors=True)


def _wait_for_core(core: BaseProcess, ready: Event, stop: _StopSignals) -> bool:
    while not ready.wait(timeout=0.2):
        if stop.is_set():
            return False
        if not core.is_alive():
            logger.error("the engine core failed to start (exit code %s); see the log above", core.exitcode)
            return False
    return True


def _wait_for_port(host: str, port: int, frontends: list[BaseProcess], stop: _StopSignals) -> bool:
    while not stop.is_set():
        if not any(p.is_alive() for p in frontends):
            logger.error("the frontend process(es) exited during start-up")
            return False
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.1)
    return False


def _supervise(cores: list[BaseProcess], frontends: list[BaseProcess], stop: _StopSignals, drain_s: float) -> int:
    """Run until a stop signal (drain, exit 0), a core's exit (fail the frontends' requests, exit 1), or the end of
    every frontend (exit 1). A single frontend's death is survived: the others keep serving the port."""
    while not stop.is_set():
        multiprocessing.connection.wait([p.sentinel for p in [*cores, *frontends] if p.is_alive()], timeout=0.2)
        dead_core = next((core for core in cores if not core.is_alive()), None)
        if dead_core is not None:
            logger.error("engine core %s exited (code %s): stopping the server (exit code 1) so that a supervisor "
                         "restarts it", dead_core.name, dead_core.exitcode)
            _stop_after_engine_death(frontends, cores)
            return 1
        if frontends and not any(p.is_alive() for p in frontends):
            logger.error("all frontend processes exited")
            return 1
    logger.info("shutting down%s", f": in-flight requests get up to {drain_s:g} s" if frontends else "")
    _signal_all(frontends, signal.SIGTERM)
    _wait_all(frontends, drain_s + _FRONTEND_EXIT_S, stop)
    _signal_all(cores, signal.SIGTERM)  # only now: draining requests needed the engine
    _wait_all(cores, _CORE_EXIT_S, stop)
    return 1 if stop.immediate.is_set() else 0


_FRONTEND_EXIT_S = 10.0  # past the drain: aborting what is left, uvicorn's shutdown, closing the engine client
_CORE_EXIT_S = 15.0  # the core stops its workers (up to 5 s each before it kills them)


def _stop_after_engine_death(frontends: list[BaseProcess], cores: list[BaseProcess]) -> None:
    """The engine is gone: frontends fail their in-flight requests (streams end with an error event) and exit."""
    _signal_all(frontends, signal.SIGUSR1)
    _wait_all(frontends, _FRONTEND_EXIT_S, None)
    _signal_all(cores, signal.SIGTERM)  # the other data-parallel engines
    _wait_all(cores, _CORE_EXIT_S, None)


def _signal_all(processes: list[BaseProcess], signum: int) -> None:
    for process in processes:
        if process.is_alive() and process.pid is not None:
            try:
                os.kill(process.pid, signum)
            except ProcessLookupError:
                pass


def _wait_all(processes: list[BaseProcess], timeout_s: float, stop: _StopSignals | None) -> None:
    """Wait for every process to exit; SIGKILL what is left after `timeout_s`, or at once on a second signal."""
    deadline = time.monotonic() + timeout_s
    while any(p.is_alive() for p in processes) and time.monotonic() < deadline:
        if stop is not None and stop.immediate.is_set():
            break
        multiprocessing.connection.wait([p.sentinel for p in processes if p.is_alive()], timeout=0.1)
    for process in processes:
        if process.is_alive():
            logger.warning("killing %s (still running)", process.name)
            process.kill()
            process.join(timeout=2.0)


def _stop_all(processes: list[BaseProcess]) -> None:
    for process in processes:
        if process.is_alive():
            process.terminate()
    deadline = time.monotonic() + 10.0
    for process in processes:
        process.join(timeout=max(0.1, deadline - time.monotonic()))
        if process.is_alive():
            process.kill()
            process.join(timeout=2.0)
