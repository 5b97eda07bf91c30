"""Worker-side halves of the KV connectors (disaggregated prefill/decode); the scheduler-side half is
engine_core/kv_transfer.py."""
from __future__ import annotations

import torch

from engine_core.config import KVTransferConfig, ParallelConfig
from workers.kv_connector.base import KVConnectorWorker


def make_kv_connector(config: KVTransferConfig, parallel: ParallelConfig, tp_rank: int,
                      kv_caches: list[torch.Tensor]) -> KVConnectorWorker:
    if config.kv_connector == "SharedStorageConnector":
        from workers.kv_connector.shared_storage import SharedStorageConnectorWorker

        return SharedStorageConnectorWorker(config, parallel, tp_rank, kv_caches)
    from workers.kv_connector.zmq_pull import ZmqPullConnectorWorker

    return ZmqPullConnectorWorker(config, parallel, tp_rank, kv_caches)
