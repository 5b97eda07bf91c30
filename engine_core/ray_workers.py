"""Tensor-parallel ranks as Ray actors (`--distributed-executor-backend ray`), so one engine can span nodes.

```
 engine core (Ray driver) ── placement group: one bundle per rank ({"CPU": 1}, or {"GPU": 1} on CUDA), PACK
   │ PUSH tcp://<core node IP>:port, one per rank          ▲ PULL tcp://<core node IP>:port
   ▼                                                       │
 RayWorker actor rank r ── RayWorker.run() = workers.worker.run_worker (blocks in the actor until Shutdown)
```
The step protocol is the one of local processes; only the addresses differ (tcp:// on the core's node IP instead
of ipc://), and torch.distributed's rendezvous is on rank 0's node. The core joins a running cluster (RAY_ADDRESS,
or the one `ray start` left on this machine) or else starts a local one. A finished `run()` (the actor died, its
node went away, or the worker returned) makes `dead()` report the rank, which the executor turns into
`EngineDeadError`. `stop()` kills the actors and removes the placement group.

This module imports ray but never torch: torch loads in the actor, inside `run_worker`, after the environment
(CUDA_VISIBLE_DEVICES, thread counts) is set.
"""
from __future__ import annotations

import logging
import os
import socket
import time
from typing import Any

import ray
import zmq
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from engine_core.config import ParallelConfig
from engine_core.worker_group import EngineDeadError
from workers.worker import run_worker

logger = logging.getLogger("conveyor.ray")

PLACEMENT_STRATEGY_ENV = "CONVEYOR_RAY_PLACEMENT_STRATEGY"  # PACK (default) | SPREAD | STRICT_PACK | STRICT_SPREAD
# Passed on to the actors: they start from the raylet's environment, not the core's.
_FORWARDED_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "CONVEYOR_LOG_LEVEL", "CONVEYOR_CACHE", "HF_HUB_OFFLINE",
                  "TOKENIZERS_PARALLELISM", "NCCL_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME", "NCCL_DEBUG")
_PROGRESS_LOG_INTERVAL_S = 30.0


class RayWorker:
    """One rank. Created in a placement-group bundle; `run` blocks for the engine's lifetime."""

    def node_info(self) -> tuple[str, str, list[str]]:
        """(node IP, node id, GPU ids Ray gave this actor)."""
        context = ray.get_runtime_context()
        gpu_ids = [str(gpu) for gpu in context.get_accelerator_ids().get("GPU", [])]
        return _node_ip_address(), context.get_node_id(), gpu_ids

    def free_port(self) -> int:
        """A free TCP port on this actor's node (rank 0: torch.distributed's rendezvous)."""
        with socket.socket() as probe:
            probe.bind(("", 0))
            return int(probe.getsockname()[1])

    def run(self, worker_args: tuple[Any, ...], env: dict[str, str], local_device_index: int | None) -> None:
        os.environ.update(env)
        options: dict[str, Any] = {"local_device_index": local_device_index, "in_ray_actor": True}
        run_worker(*worker_args, **options)


_RayWorkerActor = ray.remote(RayWorker)


def connect(parallel_config: ParallelConfig) -> bool:
    """Join the Ray cluster (RAY_ADDRESS, or one `ray start` left on this machine), else start a local one.
    True when this call connected (so `ray.shutdown()` is ours to call)."""
    if ray.is_initialized():
        return False
    try:
        ray.init(address="auto", log_to_driver=True, configure_logging=False)
        logger.info("joined the Ray cluster at %s", ray.get_runtime_context().gcs_address)
    except ConnectionError:
        if os.environ.get("RAY_ADDRESS"):
            raise
        num_cpus = None
        if parallel_config.device != "cuda":  # every CPU rank takes a {"CPU": 1} bundle
            num_cpus = max(os.cpu_count() or 1, parallel_config.tensor_parallel_size)
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=True, configure_logging=False)
        logger.info("no Ray cluster found: started a local one (%s CPUs)", num_cpus or "all")
    return True


class RayWorkers:
    """The executor's `WorkerGroup` over Ray actors: one actor per rank in one placement group."""

    def __init__(self, parallel_config: ParallelConfig, startup_timeout_s: float) -> None:
        self._owns_connection = connect(parallel_config)
        self._node_ip = _node_ip_address()
        tp_size = parallel_config.tensor_parallel_size
        use_gpu = parallel_config.device == "cuda"
        bundle = {"GPU": 1.0} if use_gpu else {"CPU": 1.0}
        strategy = os.environ.get(PLACEMENT_STRATEGY_ENV, "PACK")
        self._actors: list[Any] = []
        self._runs: dict[Any, int] = {}  # ObjectRef of run() -> rank
        self._placement_group = placement_group([dict(bundle) for _ in range(tp_size)], strategy=strategy)
        try:
            self._wait_for_placement_group(bundle, tp_size, strategy, startup_timeout_s)
            for rank in range(tp_size):
                options: dict[str, Any] = {"num_cpus": 0, "num_gpus": 1} if use_gpu else {"num_cpus": 1}
                self._actors.append(_RayWorkerActor.options(
                    name=None, max_restarts=0, max_concurrency=1,
                    scheduling_strategy=PlacementGroupSchedulingStrategy(
                        placement_group=self._placement_group, placement_group_bundle_index=rank),
                    **options).remote())
            infos: list[tuple[str, str, list[str]]] = ray.get(
                [actor.node_info.remote() for actor in self._actors], timeout=startup_timeout_s)
        except BaseException:
            self.stop(timeout_s=0.0)
            raise
        self._rank0_ip = infos[0][0]
        self._device_env = self._visible_devices(infos) if use_gpu else [({}, None)] * tp_size
        logger.info("%d Ray worker actor(s) on node(s) %s (placement strategy %s)", tp_size,
                    ", ".join(sorted({ip for ip, _, _ in infos})), strategy)

    def _wait_for_placement_group(self, bundle: dict[str, float], count: int, strategy: str,
                                  timeout_s: float) -> None:
        started = time.monotonic()
        while True:
            ready, _ = ray.wait([self._placement_group.ready()], timeout=_PROGRESS_LOG_INTERVAL_S)
            if ready:
                return
            waited = time.monotonic() - started
            message = (f"the Ray cluster has no room for {count} x {bundle} ({strategy}) after {waited:.0f} s; "
                       f"cluster resources: {ray.cluster_resources()}")  # type: ignore[no-untyped-call]
            if waited > timeout_s:
                raise EngineDeadError(message)
            logger.warning("%s; still waiting", message)

    @staticmethod
    def _visible_devices(infos: list[tuple[str, str, list[str]]]) -> list[tuple[dict[str, str], int | None]]:
        """Each rank sees every GPU the engine holds on its node (so NCCL can use peer-to-peer), and picks its own
        by index."""
        by_node: dict[str, list[str]] = {}
        for _, node_id, gpu_ids in infos:
            by_node.setdefault(node_id, []).extend(gpu_ids)
        result: list[tuple[dict[str, str], int | None]] = []
        for _, node_id, gpu_ids in infos:
            node_gpus = sorted(set(by_node[node_id]), key=lambda gpu: (len(gpu), gpu))
            result.append(({"CUDA_VISIBLE_DEVICES": ",".join(node_gpus)}, node_gpus.index(gpu_ids[0])))
        return result

    def bind(self, sock: zmq.Socket[bytes], name: str) -> str:
        host = self._node_ip
        if ":" in host:  # IPv6
            sock.setsockopt(zmq.IPV6, 1)
            host = f"[{host}]"
        sock.bind(f"tcp://{host}:*")
        return sock.getsockopt_string(zmq.LAST_ENDPOINT)

    def distributed_init_method(self, port: int) -> str:
        if not port:
            port = ray.get(self._actors[0].free_port.remote())
        host = f"[{self._rank0_ip}]" if ":" in self._rank0_ip else self._rank0_ip
        return f"tcp://{host}:{port}"

    def start(self, rank: int, worker_args: tuple[Any, ...]) -> None:
        env = {name: os.environ[name] for name in _FORWARDED_ENV if name in os.environ}
        device_env, local_device_index = self._device_env[rank]
        ref = self._actors[rank].run.remote(worker_args, {**env, **device_env}, local_device_index)
        self._runs[ref] = rank

    def dead(self) -> list[str]:
        if not self._runs:
            return []
        finished, _ = ray.wait(list(self._runs), num_returns=len(self._runs), timeout=0, fetch_local=False)
        return [f"Ray worker actor of rank {self._runs[ref]} stopped: {_outcome(ref)}" for ref in finished]

    def stop(self, timeout_s: float) -> None:
        """Wait for the ranks to return (after Shutdown), kill the actors, free the placement group, and leave
        the cluster if we joined it."""
        try:
            if self._runs and timeout_s > 0:
                ray.wait(list(self._runs), num_returns=len(self._runs), timeout=timeout_s, fetch_local=False)
            for actor in self._actors:
                ray.kill(actor, no_restart=True)
            remove_placement_group(self._placement_group)
        except Exception as exc:  # shutting down: the cluster may be gone already
            logger.warning("Ray clean-up incomplete: %s", exc)
        finally:
            self._actors, self._runs = [], {}
            if self._owns_connection and ray.is_initialized():
                ray.shutdown()


def _node_ip_address() -> str:
    """This node's address as the Ray cluster knows it (`ray start --node-ip-address`)."""
    return str(ray.util.get_node_ip_address())  # type: ignore[no-untyped-call]


def _outcome(ref: Any) -> str:
    try:
        ray.get(ref, timeout=1.0)
    except Exception as exc:
        return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    return "run() returned"
