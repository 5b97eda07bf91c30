"""What both worker-side connectors share: applying the scheduler's instructions, loads on a thread pool, and
the thread-safe record of finished and failed transfers that goes back with each step's answer.

Loads write into blocks the scheduler has reserved and will not schedule until this rank reports them done, so
they run concurrently with forward passes over other blocks.
"""
from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor

import torch

from engine_core.config import KVTransferConfig, ParallelConfig
from engine_core.protocol import KVConnectorMetadata, KVConnectorOutput, KVLoad, KVSave

logger = logging.getLogger("conveyor.kv_connector")

_LOAD_THREADS = 4


class KVTransferError(RuntimeError):
    pass


class KVConnectorWorker:
    def __init__(self, config: KVTransferConfig, parallel: ParallelConfig, tp_rank: int,
                 kv_caches: list[torch.Tensor]) -> None:
        self.config = config
        self.tp_rank = tp_rank
        self.kv_caches = kv_caches  # per layer [2, num_blocks, block_size, num_kv_heads, head_dim]
        self.port = config.kv_port + parallel.data_parallel_rank * parallel.tensor_parallel_size + tp_rank
        self._lock = threading.Lock()
        self._finished_sending: list[str] = []
        self._finished_recving: list[str] = []
        self._failed_recving: dict[str, str] = {}
        self._pool = ThreadPoolExecutor(max_workers=_LOAD_THREADS, thread_name_prefix="kv-transfer")

    # ------------------------------------------------------------------ the model runner's calls

    def apply(self, metadata: KVConnectorMetadata | None) -> None:
        """Before the step's forward: start loads, register saves, stop serving released requests."""
        if metadata is None:
            return
        for request_id in metadata.released_request_ids:
            self.release(request_id)
        for save in metadata.saves:
            self.register_save(save)
        for load in metadata.loads:
            self._pool.submit(self._run_load, load)

    def collect(self) -> KVConnectorOutput | None:
        """After the step: what finished since the last call."""
        with self._lock:
            if not (self._finished_sending or self._finished_recving or self._failed_recving):
                return None
            output = KVConnectorOutput(self._finished_sending, self._finished_recving, self._failed_recving)
            self._finished_sending, self._finished_recving, self._failed_recving = [], [], {}
        return output

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ for the connectors

    def register_save(self, save: KVSave) -> None:
        raise NotImplementedError

    def release(self, request_id: str) -> None:
        """The scheduler freed a held request's blocks (lease expired): they may be reused from now on."""

    def load(self, load: KVLoad) -> None:
        """Fill `load.local_block_ids`; raise KVTransferError (or anything) to report a failure."""
        raise NotImplementedError

    def record_sent(self, request_id: str) -> None:
        with self._lock:
            self._finished_sending.append(request_id)

    def read_blocks(self, block_ids: list[int]) -> list[torch.Tensor]:
        """Per layer `[2, len(block_ids), block_size, heads, head_dim]` copies on the CPU."""
        index = torch.tensor(block_ids, dtype=torch.int64, device=self.kv_caches[0].device)
        return [cache.index_select(1, index).cpu() for cache in self.kv_caches]

    def write_blocks(self, block_ids: list[int], layers: list[torch.Tensor]) -> None:
        if len(layers) != len(self.kv_caches):
            raise KVTransferError(f"the producer sent {len(layers)} layers, this model has {len(self.kv_caches)}")
        index = torch.tensor(block_ids, dtype=torch.int64, device=self.kv_caches[0].device)
        for cache, layer in zip(self.kv_caches, layers):
            expected = (2, len(block_ids), *cache.shape[2:])
            if tuple(layer.shape) != expected or layer.dtype != cache.dtype:
                raise KVTransferError(f"the producer's KV has shape {tuple(layer.shape)} {layer.dtype}, this instance "
                                      f"expects {expected} {cache.dtype} (same model, dtype, block size and "
                                      "tensor-parallel size on both sides?)")
            cache.index_copy_(1, index, layer.to(cache.device, non_blocking=False))

    def _run_load(self, load: KVLoad) -> None:
        try:
            self.load(load)
        except Exception as exc:
            logger.warning("request %s: loading KV failed: %s", load.request_id, exc)
            with self._lock:
                self._failed_recving[load.request_id] = f"{type(exc).__name__}: {exc}" \
                    if not isinstance(exc, KVTransferError) else str(exc)
            return
        with self._lock:
            self._finished_recving.append(load.request_id)
