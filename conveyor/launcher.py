"""Starts and stops the process tree: engine core(s) (each starts its workers) and N frontends on one port.

SIGINT/SIGTERM stop everything; every child also dies with its parent (PR_SET_PDEATHSIG), so no orphans stay
behind. A dead engine core does not take the frontends down: they keep answering 503 and failing /health, as
clients and load balancers expect.
"""
from __future__ import annotations

import argparse
import logging
import multiprocessing
import signal
import socket
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
    stop = _stop_on_signals()
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
            return _supervise(cores, [], stop)
        frontends = _start_frontends(spawn, frontend_config_from_args(args), plan.front_door_address,
                                     client_indices=list(range(args.api_server_count)))
        if _wait_for_port(args.host, args.port, frontends, stop):
            logger.info("serving %s on http://%s:%d (%d engine core(s), %d frontend process(es))",
                        base_config.model.served_model_name, args.host, args.port, len(cores), len(frontends))
        return _supervise(cores, frontends, stop)
    finally:
        _stop_all([*frontends, *cores])


def run_frontends(args: argparse.Namespace) -> int:
    """`conveyor frontend`: stateless API servers for an engine that runs elsewhere."""
    from conveyor.config_from_args import frontend_config_from_args
    from frontend.engine_handshake import random_client_index

    configure_logging("launcher")
    _check_port_free(args.host, args.port)
    stop = _stop_on_signals()
    spawn = multiprocessing.get_context("spawn")
    # Frontends started on their own pick random routing ids: several hosts' frontends share one engine.
    frontends = _start_frontends(spawn, frontend_config_from_args(args), args.engine_address,
                                 client_indices=[random_client_index() for _ in range(args.api_server_count)])
    try:
        if _wait_for_port(args.host, args.port, frontends, stop):
            logger.info("serving on http://%s:%d for the engine at %s (%d frontend process(es))", args.host,
                        args.port, args.engine_address, len(frontends))
        return _supervise([], frontends, stop)
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


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    return stop


def _start_frontends(spawn: multiprocessing.context.SpawnContext, frontend_config: FrontendConfig,
                     engine_address: str, client_indices: list[int]) -> list[BaseProcess]:
    from frontend.server import run_frontend

    frontends: list[BaseProcess] = []
    for process_index, client_index in enumerate(client_indices):
        process = spawn.Process(target=run_frontend, name=f"conveyor-frontend{process_index}",
                                args=(frontend_config, engine_address, client_index, process_index))
        process.start()
        frontends.append(process)
    return frontends


def _wait_for_core(core: BaseProcess, ready: Event, stop: threading.Event) -> bool:
    while not ready.wait(timeout=0.2):
        if stop.is_set():
            return False
        if not core.is_alive():
            logger.error("the engine core failed to start (exit code %s); see the log above", core.exitcode)
            return False
    return True


def _wait_for_port(host: str, port: int, frontends: list[BaseProcess], stop: threading.Event) -> bool:
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


def _supervise(cores: list[BaseProcess], frontends: list[BaseProcess], stop: threading.Event) -> int:
    """Wait for a stop signal; report each dead core once; exit when every frontend (headless: core) is gone."""
    reported_dead: set[str] = set()
    while not stop.wait(timeout=0.5):
        for core in cores:
            if not core.is_alive() and core.name not in reported_dead:
                reported_dead.add(core.name)
                logger.error("engine core %s exited (code %s)%s", core.name, core.exitcode,
                             "; frontends now answer 503" if frontends else "")
        if frontends and not any(p.is_alive() for p in frontends):
            logger.error("all frontend processes exited")
            return 1
        if not frontends and not any(core.is_alive() for core in cores):
            return 1
    logger.info("shutting down")
    return 0


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
