"""Worker process entry: device, torch.distributed, model, KV cache, then the serve loop.

One process per tensor-parallel rank. Every rank receives every `SchedulerOutput` (the executor sends the same
bytes to each) and runs the forward pass; rank 0 samples and answers with a `ModelRunnerOutput`.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import traceback
from dataclasses import dataclass
from typing import TYPE_CHECKING

import msgspec
import zmq

from engine_core.config import CacheConfig, ModelConfig, ParallelConfig
from engine_core.process_utils import become_child_process, configure_logging
from engine_core.protocol import (InitializeCache, ModelRunnerOutput, SchedulerOutput, Shutdown, WorkerFailure,
                                  WorkerReady, core_to_worker_decoder)

if TYPE_CHECKING:  # torch loads only inside the worker process, after spawn
    import torch

    from workers.distributed import tensor_parallel
    from workers.model_runner import ModelRunner

logger = logging.getLogger("conveyor.worker")


@dataclass(frozen=True)
class WorkerAddresses:
    """ZeroMQ addresses the executor bound: one input per rank, one shared output."""

    input_address: str
    output_address: str
    distributed_init_method: str  # e.g. tcp://127.0.0.1:PORT, used only when tensor_parallel_size > 1


def run_worker(model_config: ModelConfig, cache_config: CacheConfig, parallel_config: ParallelConfig,
               rank: int, addresses: WorkerAddresses, local_device_index: int | None = None,
               in_ray_actor: bool = False) -> None:
    """Process entry point (multiprocessing spawn target), or the body of a Ray actor's method (Ray executor).

    `local_device_index`: the CUDA device this rank uses among the visible ones (default: `rank`); Ray actors
    see only their own node's GPUs. `in_ray_actor`: return instead of ending the process (Ray kills the actor)."""
    become_child_process(f"conveyor-w{rank}")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; the core shuts us down
    configure_logging(f"worker{rank}")
    context = zmq.Context()
    results = context.socket(zmq.PUSH)
    results.connect(addresses.output_address)
    encoder = msgspec.msgpack.Encoder()
    steps: zmq.Socket[bytes] | None = None
    try:
        runner = _start_runner(model_config, cache_config, parallel_config, rank, addresses,
                               rank if local_device_index is None else local_device_index)
        from workers.sampling.logits_processors import registered_names

        results.send(encoder.encode(WorkerReady(rank=rank, num_blocks=runner.determine_num_blocks(),
                                                device=str(runner.device),
                                                kv_cache_dtype=str(runner.kv_cache_dtype).removeprefix("torch."),
                                                logits_processors=registered_names())))
        steps = context.socket(zmq.PULL)
        steps.connect(addresses.input_address)
        _serve(runner, steps, results, encoder, rank, cache_config, parallel_config)
    except Exception as exc:  # report, then exit: the core turns this into a dead-engine sentinel
        logger.error("worker %d failed:\n%s", rank, traceback.format_exc())
        results.send(encoder.encode(WorkerFailure(rank=rank, message=f"{type(exc).__name__}: {exc}")))
    finally:
        if steps is not None:  # every socket must be closed, or context.term() blocks until the core kills us
            steps.close(linger=0)
        results.close(linger=1000)
        context.term()
    logger.info("worker %d stopped", rank)
    if parallel_config.tensor_parallel_size > 1 and not in_ray_actor:
        # Skip interpreter teardown: gloo's (and NCCL's) destructors can SIGABRT ("terminate called ...") a rank
        # whose peer exited first. Nothing is left to release: the sockets are closed and the peers go too.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def _start_runner(model_config: ModelConfig, cache_config: CacheConfig, parallel_config: ParallelConfig,
                  rank: int, addresses: WorkerAddresses, device_index: int) -> ModelRunner:
    import torch

    from workers.distributed import tensor_parallel
    from workers.model_runner import ModelRunner
    from workers.sampling.logits_processors import load_plugins

    load_plugins()  # CONVEYOR_LOGITS_PROCESSORS modules and conveyor.logits_processors entry points
    if parallel_config.num_threads:
        torch.set_num_threads(parallel_config.num_threads)
    device = _choose_device(parallel_config.device, device_index)
    if parallel_config.tensor_parallel_size > 1:
        backend = "nccl" if device.type == "cuda" else "gloo"
        torch.distributed.init_process_group(backend, init_method=addresses.distributed_init_method,
                                             rank=rank, world_size=parallel_config.tensor_parallel_size)
        tensor_parallel.init(rank, parallel_config.tensor_parallel_size, device)
    torch.manual_seed(model_config.seed)
    logger.info("loading %s on %s (dtype %s, quantization %s, %d threads)", model_config.model, device,
                model_config.dtype, model_config.quantization, torch.get_num_threads())
    runner = ModelRunner(model_config, cache_config, device, tp_rank=rank, tp_size=parallel_config.tensor_parallel_size)
    logger.info("worker %d: model loaded, resident memory %.0f MiB (before the KV cache)", rank,
                resident_bytes() / 2**20)
    return runner


def resident_bytes() -> int:
    """This process's resident set size (Linux; elsewhere its peak)."""
    try:
        for line in open("/proc/self/status").read().splitlines():  # noqa: SIM115 (one short read)
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _choose_device(requested: str, index: int) -> torch.device:
    import torch

    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda":
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device(requested)


def _serve(runner: ModelRunner, steps: zmq.Socket[bytes], results: zmq.Socket[bytes],
           encoder: msgspec.msgpack.Encoder, rank: int, cache_config: CacheConfig,
           parallel_config: ParallelConfig) -> None:
    """Run steps until Shutdown. A failing step is answered with an error so only its requests fail.

    Every rank answers every step: rank 0 with the samples, all with their KV-transfer progress (a transfer is
    done only when every rank has done its share) and any error."""
    try:
        while True:
            message = core_to_worker_decoder.decode(steps.recv())
            if isinstance(message, Shutdown):
                return
            if isinstance(message, InitializeCache):
                runner.initialize_cache(message.num_blocks)
                logger.info("KV cache: %d blocks", message.num_blocks)
                if cache_config.kv_transfer is not None:
                    from workers.kv_connector import make_kv_connector

                    runner.kv_connector = make_kv_connector(cache_config.kv_transfer, parallel_config, rank,
                                                            runner.kv_caches)
                continue
            assert isinstance(message, SchedulerOutput)
            try:
                output = runner.execute(message)
            except Exception as exc:
                logger.error("step failed:\n%s", traceback.format_exc())
                output = ModelRunnerOutput(request_ids=[], sampled_token_ids=[], logprobs=[],
                                           error=f"{type(exc).__name__}: {exc}", rank=rank)
            results.send(encoder.encode(output))
    finally:
        if runner.kv_connector is not None:
            runner.kv_connector.close()
