"""Starts and stops the process tree: engine core (which starts its workers) and N frontends on one port.

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

from engine_core.process_utils import configure_logging, new_ipc_address

logger = logging.getLogger("conveyor.launcher")


def serve(args: argparse.Namespace) -> int:
    from conveyor.cli import engine_config_from_args
    from engine_core.core import run_engine_core
    from frontend.server import run_frontend

    configure_logging("launcher")
    engine_config, frontend_config = engine_config_from_args(args, new_ipc_address("engine"))
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    spawn = multiprocessing.get_context("spawn")
    ready = spawn.Event()
    core = spawn.Process(target=run_engine_core, args=(engine_config, ready), name="conveyor-core")
    core.start()
    frontends: list[BaseProcess] = []
    try:
        if not _wait_for_core(core, ready, stop):
            return 1
        for index in range(frontend_config.api_server_count):
            process = spawn.Process(target=run_frontend, name=f"conveyor-frontend{index}",
                                    args=(engine_config.model, frontend_config, engine_config.engine_address, index))
            process.start()
            frontends.append(process)
        if _wait_for_port(frontend_config.host, frontend_config.port, frontends, stop):
            logger.info("serving %s on http://%s:%d (%d frontend process(es))",
                        engine_config.model.served_model_name, frontend_config.host, frontend_config.port,
                        len(frontends))
        return _supervise(core, frontends, stop)
    finally:
        _stop_all([*frontends, core])


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


def _supervise(core: BaseProcess, frontends: list[BaseProcess], stop: threading.Event) -> int:
    """Wait for a stop signal; report a dead core once; exit when every frontend is gone."""
    reported_core_death = False
    while not stop.wait(timeout=0.5):
        if not core.is_alive() and not reported_core_death:
            reported_core_death = True
            logger.error("engine core exited (code %s); frontends now answer 503", core.exitcode)
        if not any(p.is_alive() for p in frontends):
            logger.error("all frontend processes exited")
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
