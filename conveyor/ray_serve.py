"""Ray Serve application: Conveyor engine replicas, autoscaled, behind one OpenAI-compatible route.

```
 clients ──HTTP──▶ Serve proxy ──▶ replica ×N (autoscaled on ongoing requests)
                                     └ Conveyor's FastAPI app (every route) ──ZeroMQ──▶ its own engine core
                                                                                        └ workers (mp or Ray)
```
Each replica starts one Conveyor engine (engine core process and its workers, as `conveyor serve` does) from the
same flags as `conveyor serve`, on a fresh ipc:// address, and serves `frontend.app.create_app` through
`@serve.ingress`, so chat, completions, models, tokenize, health and metrics all work. A replica whose engine died
fails Serve's health check and is replaced.

    serve run conveyor.ray_serve:build_app model=/path/to/model tensor_parallel_size=1 \\
        min_replicas=1 max_replicas=4 target_ongoing_requests=8

Python: `serve.run(build_app({"model": "/path/to/model", "num_replicas": 2}))`.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import multiprocessing
import sys
import time
from multiprocessing.process import BaseProcess
from typing import Any

from ray import serve
from ray.serve import Application

logger = logging.getLogger("conveyor.ray_serve")

# Keys of build_app's dict that shape the Serve deployment; every other key is a `conveyor serve` flag.
SERVE_OPTIONS: dict[str, type] = {
    "num_replicas": int, "min_replicas": int, "max_replicas": int, "initial_replicas": int,
    "target_ongoing_requests": float, "max_ongoing_requests": int, "num_cpus": float, "num_gpus": float,
}
DEFAULT_TARGET_ONGOING_REQUESTS = 8.0
# Serve's default (5) would starve continuous batching: let a replica hold many requests at once.
DEFAULT_MAX_ONGOING_REQUESTS = 64
# The HTTP side belongs to Serve (`serve start --http-host/--http-port`), not to the replicas.
_REJECTED_FLAGS = {"host": "the Serve proxy's host (serve start --http-host)",
                   "port": "the Serve proxy's port (serve start --http-port)",
                   "api_server_count": "replicas (num_replicas / min_replicas / max_replicas)",
                   "headless": "nothing (a replica always serves HTTP)",
                   **{key: "multi-host data parallelism (a replica runs all its engines itself)" for key in (
                       "data_parallel_size_local", "data_parallel_start_rank", "data_parallel_address",
                       "data_parallel_rpc_port")}}
_CORE_START_TIMEOUT_S = 1800.0


def build_app(args: dict[str, Any]) -> Application:
    """The Serve application for `serve run conveyor.ray_serve:build_app key=value ...` (or `serve.run`).

    `model` and the other keys are `conveyor serve` flags with underscores (`tensor_parallel_size=2`,
    `max_model_len=512`, `enable_prefix_caching=false`, `distributed_executor_backend=ray`); the keys in
    `SERVE_OPTIONS` size the deployment: `num_replicas` (fixed), or `min_replicas`, `max_replicas`,
    `initial_replicas`, `target_ongoing_requests` (autoscaling); `max_ongoing_requests`; `num_cpus` and
    `num_gpus` reserved per replica (with the mp executor on CUDA set `num_gpus` to the tensor-parallel size)."""
    engine_args = dict(args)
    options = {key: _convert(key, engine_args.pop(key)) for key in list(engine_args) if key in SERVE_OPTIONS}
    argv = engine_argv(engine_args)
    parse_serve_flags(argv)  # fail now, in `serve run`, rather than in every replica
    deployment: Any = ConveyorDeployment  # a serve.Deployment (the decorators hide that from mypy)
    return deployment.options(**deployment_options(options)).bind(argv)


def deployment_options(options: dict[str, Any]) -> dict[str, Any]:
    """Serve deployment options from the SERVE_OPTIONS keys."""
    autoscaling_keys = {"min_replicas", "max_replicas", "initial_replicas", "target_ongoing_requests"}
    target = float(options.get("target_ongoing_requests", DEFAULT_TARGET_ONGOING_REQUESTS))
    result: dict[str, Any] = {
        "max_ongoing_requests": int(options.get("max_ongoing_requests",
                                                max(DEFAULT_MAX_ONGOING_REQUESTS, int(2 * target)))),
        "ray_actor_options": {"num_cpus": options.get("num_cpus", 1.0), "num_gpus": options.get("num_gpus", 0.0)},
    }
    if "num_replicas" in options:
        if autoscaling_keys & set(options):
            raise ValueError("give either num_replicas or min_replicas/max_replicas/target_ongoing_requests")
        result["num_replicas"] = options["num_replicas"]
    elif autoscaling_keys & set(options):
        min_replicas = int(options.get("min_replicas", 1))
        autoscaling: dict[str, Any] = {"min_replicas": min_replicas,
                                       "max_replicas": int(options.get("max_replicas", max(min_replicas, 1))),
                                       "target_ongoing_requests": target}
        if "initial_replicas" in options:
            autoscaling["initial_replicas"] = options["initial_replicas"]
        result["autoscaling_config"] = autoscaling
    else:
        result["num_replicas"] = 1
    return result


def engine_argv(args: dict[str, Any]) -> list[str]:
    """{'model': '/m', 'tensor_parallel_size': '2', 'enable_prefix_caching': 'false'} ->
    ['/m', '--tensor-parallel-size', '2', '--no-enable-prefix-caching'] (flags checked against `conveyor serve`)."""
    actions = {action.dest: action for action in _serve_parser()._actions if action.dest != "help"}
    argv: list[str] = []
    for key, value in args.items():
        if key in _REJECTED_FLAGS:
            raise ValueError(f"{key!r} does not apply to Serve replicas; it is {_REJECTED_FLAGS[key]}")
        if key == "model":
            argv.insert(0, str(value))
            continue
        action = actions.get(key)
        if action is None or not action.option_strings:
            raise ValueError(f"unknown option {key!r}: use `conveyor serve` flag names with underscores "
                             f"(e.g. tensor_parallel_size) or one of {', '.join(SERVE_OPTIONS)}")
        flag = next(option for option in action.option_strings if option.startswith("--"))
        if isinstance(action, argparse.BooleanOptionalAction):
            argv.append(flag if _truthy(key, value) else f"--no-{flag[2:]}")
        elif isinstance(action, argparse._StoreTrueAction):
            if _truthy(key, value):
                argv.append(flag)
        elif action.nargs in ("+", "*"):
            values = value if isinstance(value, (list, tuple)) else str(value).split()
            argv += [flag, *(str(item) for item in values)]
        else:
            argv += [flag, str(value)]
    return argv


def parse_serve_flags(argv: list[str]) -> argparse.Namespace:
    """`conveyor serve ARGV` parsed by the real command line (ValueError instead of exiting)."""
    from conveyor.flags import build_parser

    try:
        return build_parser().parse_args(["serve", *argv])
    except SystemExit as exc:
        raise ValueError(f"invalid conveyor serve flags {argv}") from exc


def _serve_parser() -> argparse.ArgumentParser:
    from conveyor.flags import build_parser

    for action in build_parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices["serve"]
    raise RuntimeError("conveyor's command line has no serve command")


def _truthy(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{key}={value!r}: expected true or false")


def _convert(key: str, value: Any) -> Any:
    try:
        return SERVE_OPTIONS[key](value)
    except (TypeError, ValueError):
        raise ValueError(f"{key}={value!r}: expected a number") from None


@serve.deployment(name="Conveyor")
@serve.ingress()
class ConveyorDeployment:
    """One replica: a Conveyor engine (core process + workers) and Conveyor's FastAPI app in front of it."""

    async def __init__(self, argv: list[str]) -> None:  # type: ignore[misc]  # Serve awaits it
        from conveyor.config_from_args import engine_config_from_args, frontend_config_from_args
        from conveyor.data_parallel import plan_data_parallel
        from engine_core.core import run_engine_core

        _log_to_stderr()
        args = parse_serve_flags(argv)
        base, _ = await asyncio.to_thread(engine_config_from_args, args, "")
        plan = plan_data_parallel(args, base)  # not headless: every engine of this replica on a fresh ipc:// address
        spawn = multiprocessing.get_context("spawn")
        self._cores: list[BaseProcess] = []
        readies = []
        # Started from this (long-lived) thread: the cores' parent-death signal follows the thread that forked them.
        for config in plan.local_engines:
            ready = spawn.Event()
            core = spawn.Process(target=run_engine_core, args=(config, ready),
                                 name=f"conveyor-core{config.parallel.data_parallel_rank}")
            core.start()
            self._cores.append(core)
            readies.append(ready)
        try:
            await asyncio.to_thread(self._wait_for_cores, readies)
            self._app, self._engine_client = await asyncio.to_thread(
                _build_frontend, frontend_config_from_args(args), plan.front_door_address)
        except BaseException:
            self._stop_cores()
            raise
        logger.info("replica serving %s (engine at %s)", base.model.served_model_name, plan.front_door_address)

    def __serve_build_asgi_app__(self) -> Any:
        return self._app

    def _wait_for_cores(self, readies: list[Any]) -> None:
        deadline = time.monotonic() + _CORE_START_TIMEOUT_S
        for core, ready in zip(self._cores, readies):
            while not ready.wait(timeout=0.2):
                if not core.is_alive():
                    raise RuntimeError(f"the engine core failed to start (exit code {core.exitcode}); "
                                       "see the replica's log")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the engine core was not ready after {_CORE_START_TIMEOUT_S:.0f} s")

    def check_health(self) -> None:
        """Serve's periodic health check: a replica whose engine died is replaced."""
        dead = [core.name for core in self._cores if not core.is_alive()]
        if dead:
            raise RuntimeError(f"engine core process(es) exited: {', '.join(dead)}")
        if self._engine_client.is_dead:
            raise RuntimeError(f"engine dead: {self._engine_client.dead_reason}")

    def __del__(self) -> None:
        self._stop_cores()

    def _stop_cores(self) -> None:
        for core in getattr(self, "_cores", []):
            if core.is_alive():
                core.terminate()  # the core shuts its workers down
        deadline = time.monotonic() + 15.0
        for core in getattr(self, "_cores", []):
            core.join(timeout=max(0.1, deadline - time.monotonic()))
            if core.is_alive():
                core.kill()
                core.join(timeout=2.0)


def _build_frontend(frontend_config: Any, engine_address: str) -> tuple[Any, Any]:
    """What `frontend.server.run_frontend` builds, without uvicorn: Serve's proxy sends the HTTP requests."""
    from frontend.app import create_app
    from frontend.engine_client import ZmqEngineClient
    from frontend.engine_handshake import fetch_engine_info, model_config_from_info

    info = fetch_engine_info(engine_address, 0)
    client = ZmqEngineClient(info.engine_addresses, 0)
    return create_app(model_config_from_info(info.model), frontend_config, client), client


def _log_to_stderr() -> None:
    """Conveyor's INFO lines in the replica's log (Serve configures only its own loggers)."""
    conveyor_logger = logging.getLogger("conveyor")
    conveyor_logger.setLevel(logging.INFO)
    if not conveyor_logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s replica %(levelname)s %(name)s: %(message)s",
                                               "%H:%M:%S"))
        conveyor_logger.addHandler(handler)
        conveyor_logger.propagate = False


__all__ = ["ConveyorDeployment", "build_app", "deployment_options", "engine_argv"]
