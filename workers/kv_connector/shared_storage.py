"""SharedStorageConnector: the prefill instance writes a prompt's KV to a shared folder, the decode instance
reads it from there (any filesystem both mount: local disk for one host, NFS and the like for several).

Folder layout: `<shared_storage_path>/<storage key>/rank<r>.safetensors`, one tensor per layer
(`[2, num_blocks, block_size, heads, head_dim]`); the key is a hash of the prompt tokens, so both instances
derive it alone. Files appear atomically (written aside, then renamed); the consumer waits for its file up to
`transfer_timeout_s` and deletes it after loading (a hand-off, not a cache).
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from engine_core.config import KVTransferConfig, ParallelConfig
from engine_core.protocol import KVLoad, KVSave
from workers.kv_connector.base import KVConnectorWorker, KVTransferError

logger = logging.getLogger("conveyor.kv_connector")

_POLL_S = 0.01


class SharedStorageConnectorWorker(KVConnectorWorker):
    def __init__(self, config: KVTransferConfig, parallel: ParallelConfig, tp_rank: int,
                 kv_caches: list[torch.Tensor]) -> None:
        super().__init__(config, parallel, tp_rank, kv_caches)
        self.root = Path(str(config.kv_connector_extra_config["shared_storage_path"]))
        self.root.mkdir(parents=True, exist_ok=True)
        logger.info("KV hand-off through %s", self.root)

    def _file(self, key: str) -> Path:
        return self.root / key / f"rank{self.tp_rank}.safetensors"

    def register_save(self, save: KVSave) -> None:
        # Copy now, on this thread: once the step's forward runs the scheduler has not freed the blocks yet, but
        # the copy must not race a later reuse, and the file write can then happen in the background.
        layers = self.read_blocks(save.block_ids)
        self._pool.submit(self._write, save, layers)

    def _write(self, save: KVSave, layers: list[torch.Tensor]) -> None:
        path = self._file(save.storage_key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            staging = path.with_name(f"{path.name}.tmp{os.getpid()}")
            save_file({f"layer{i}": layer.contiguous() for i, layer in enumerate(layers)}, str(staging))
            os.replace(staging, path)
        except OSError as exc:
            logger.error("request %s: writing KV to %s failed: %s", save.request_id, path, exc)
        self.record_sent(save.request_id)  # either way the blocks are no longer needed here

    def load(self, load: KVLoad) -> None:
        if not load.local_block_ids:
            return
        path = self._file(load.storage_key)
        deadline = time.monotonic() + self.config.transfer_timeout_s
        while not path.exists():
            if time.monotonic() > deadline:
                raise KVTransferError(f"{path} did not appear within {self.config.transfer_timeout_s:.0f} s")
            time.sleep(_POLL_S)
        tensors = load_file(str(path))
        layers = [tensors[f"layer{i}"] for i in range(len(tensors))]
        first = layers[0].shape[1] - len(load.local_block_ids)  # the file holds the whole prompt; skip our prefix hit
        if first < 0:
            raise KVTransferError(f"{path} holds {layers[0].shape[1]} blocks, {len(load.local_block_ids)} needed")
        self.write_blocks(load.local_block_ids, [layer[:, first:] for layer in layers])
        path.unlink(missing_ok=True)
        try:
            path.parent.rmdir()
        except OSError:  # other ranks' files are still there
            pass
