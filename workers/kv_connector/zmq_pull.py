"""ZmqPullConnector: the decode instance's workers pull prompt KV straight from the prefill instance's workers.

```
 consumer rank r ── DEALER ── KVPullRequest(engine_id, request_id, block_ids) ──▶ ROUTER producer rank r
                 ◀──────────── KVPullResponse + one frame per layer ─────────────  (kv_port + dp*tp + r)
```
The producer serves a request's blocks once (then reports it sent, so its scheduler frees them) and only while
the scheduler holds them: a released (lease expired) request is refused. A pull that arrives before the
producer heard of the request (the response can reach the consumer before the producer's next step) waits
briefly. On CUDA the blocks are staged through host memory.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

import msgspec
import torch
import zmq

from engine_core.config import KVTransferConfig, ParallelConfig
from engine_core.protocol import (KVLoad, KVPullRequest, KVPullResponse, KVSave, kv_pull_request_decoder,
                                  kv_pull_response_decoder)
from workers.kv_connector.base import KVConnectorWorker, KVTransferError

logger = logging.getLogger("conveyor.kv_connector")

_POLL_MS = 10
_DTYPES = {str(dtype): dtype for dtype in (torch.float32, torch.bfloat16, torch.float16)}


@dataclass
class _DeferredPull:
    identity: bytes
    pull: KVPullRequest
    deadline: float


class ZmqPullConnectorWorker(KVConnectorWorker):
    def __init__(self, config: KVTransferConfig, parallel: ParallelConfig, tp_rank: int,
                 kv_caches: list[torch.Tensor]) -> None:
        super().__init__(config, parallel, tp_rank, kv_caches)
        self._context = zmq.Context()
        self._encoder = msgspec.msgpack.Encoder()
        self._servable: dict[str, list[int]] = {}  # request id -> its prompt blocks, while the scheduler holds them
        self._stopping = threading.Event()
        self._server: threading.Thread | None = None
        if config.is_producer:
            router = self._context.socket(zmq.ROUTER)
            router.setsockopt(zmq.LINGER, 0)
            router.bind(f"tcp://{config.kv_ip}:{self.port}")
            self._server = threading.Thread(target=self._serve, args=(router,), name="kv-pull-server", daemon=True)
            self._server.start()
            logger.info("serving KV pulls on tcp://%s:%d", config.kv_ip, self.port)

    def register_save(self, save: KVSave) -> None:
        with self._lock:
            self._servable[save.request_id] = list(save.block_ids)

    def release(self, request_id: str) -> None:
        with self._lock:  # after this returns no pull can read the blocks: the scheduler may reuse them
            self._servable.pop(request_id, None)

    def close(self) -> None:
        self._stopping.set()
        if self._server is not None:
            self._server.join(timeout=2.0)
        super().close()
        self._context.destroy(linger=0)

    # ------------------------------------------------------------------ producer

    def _serve(self, router: zmq.Socket[bytes]) -> None:
        deferred: list[_DeferredPull] = []
        while not self._stopping.is_set():
            if router.poll(_POLL_MS):
                identity, payload = router.recv_multipart()
                try:
                    pull = kv_pull_request_decoder.decode(payload)
                except msgspec.DecodeError as exc:
                    self._reply_error(router, identity, f"bad pull request: {exc}")
                    continue
                deferred.append(_DeferredPull(identity, pull, time.monotonic() + self.config.transfer_timeout_s))
            deferred = [item for item in deferred if not self._try_serve(router, item)]
        router.close(linger=0)

    def _try_serve(self, router: zmq.Socket[bytes], item: _DeferredPull) -> bool:
        """Answer one pull if possible; False keeps it waiting for the request's registration."""
        pull = item.pull
        if pull.engine_id != self.config.engine_id:
            self._reply_error(router, item.identity, f"this prefill instance is engine {self.config.engine_id}, "
                                                     f"not {pull.engine_id} (restarted?)")
            return True
        with self._lock:
            block_ids = self._servable.get(pull.request_id)
            if block_ids is None:
                if time.monotonic() < item.deadline:
                    return False
                self._reply_error(router, item.identity, f"request {pull.request_id} is not held here (its lease "
                                                         "expired, or it was pulled already)")
                return True
            if not set(pull.block_ids) <= set(block_ids):
                self._reply_error(router, item.identity, f"blocks {pull.block_ids} are not request "
                                                         f"{pull.request_id}'s")
                return True
            layers = self.read_blocks(pull.block_ids)  # copied under the lock: the blocks cannot be reused meanwhile
            del self._servable[pull.request_id]
        header = KVPullResponse(dtype=str(layers[0].dtype), layer_shape=list(layers[0].shape))
        frames: list[Any] = [layer.contiguous().view(torch.uint8).numpy() for layer in layers]  # buffer protocol
        router.send_multipart([item.identity, self._encoder.encode(header), *frames], copy=False)
        self.record_sent(pull.request_id)
        return True

    def _reply_error(self, router: zmq.Socket[bytes], identity: bytes, message: str) -> None:
        logger.warning("refusing a KV pull: %s", message)
        router.send_multipart([identity, self._encoder.encode(KVPullResponse(error=message))])

    # ------------------------------------------------------------------ consumer

    def load(self, load: KVLoad) -> None:
        if not load.local_block_ids:
            return
        address = f"tcp://{load.remote_host}:{load.remote_port + self.tp_rank}"
        socket = self._context.socket(zmq.DEALER)
        socket.setsockopt(zmq.LINGER, 0)
        try:
            socket.connect(address)
            socket.send(self._encoder.encode(KVPullRequest(load.remote_engine_id, load.remote_request_id,
                                                           load.remote_block_ids)))
            if not socket.poll(int(self.config.transfer_timeout_s * 1000)):
                raise KVTransferError(f"no answer from the prefill instance at {address} within "
                                      f"{self.config.transfer_timeout_s:.0f} s")
            header_frame, *layer_frames = socket.recv_multipart()
        finally:
            socket.close(linger=0)
        header = kv_pull_response_decoder.decode(header_frame)
        if header.error is not None:
            raise KVTransferError(f"the prefill instance at {address} refused: {header.error}")
        dtype = _DTYPES.get(header.dtype)
        if dtype is None:
            raise KVTransferError(f"unknown KV dtype {header.dtype!r} from {address}")
        layers = [torch.frombuffer(bytearray(frame), dtype=dtype).view(header.layer_shape) for frame in layer_frames]
        self.write_blocks(load.local_block_ids, layers)
