"""Scheduler-side half of a KV connector: which prompt KV comes from another instance, and which stays here for one.

```
 prefill instance (producer)                                   decode instance (consumer)
 request {"do_remote_decode": true} runs its prompt            request {"do_remote_prefill": true, remote_*}
 finishes -> blocks held, KVSave to workers,                   start -> blocks allocated, KVLoad to workers,
   kv_transfer_params in the response ─────── proxy ─────────▶   status WAITING_FOR_REMOTE_KV (no compute)
 workers serve the pull / write the files                      workers report finished_recving (or failed)
 finished_sending (or lease expiry) -> blocks freed            -> runs from the last prompt token on
```
The connector only decides and records; the scheduler owns requests and blocks. Both connectors (ZeroMQ pull
and shared storage) share this half: they differ only in the workers.
"""
from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from engine_core.config import KVTransferConfig
from engine_core.protocol import KVConnectorMetadata, KVConnectorOutput, KVLoad, KVSave
from engine_core.request import Request

logger = logging.getLogger("conveyor.kv_transfer")


def storage_key(token_ids: list[int]) -> str:
    """Shared-storage folder name of a prompt's KV: both instances derive it from the prompt alone."""
    return hashlib.sha256(b"".join(t.to_bytes(4, "little") for t in token_ids)).hexdigest()[:32]


@dataclass
class _HeldRequest:
    request: Request
    expires_at: float  # unix time: after this the blocks are freed even if nobody pulled them


@dataclass
class KVConnectorScheduler:
    config: KVTransferConfig
    block_size: int
    data_parallel_rank: int = 0
    tensor_parallel_size: int = 1
    _pending: KVConnectorMetadata = field(default_factory=KVConnectorMetadata)
    held: dict[str, _HeldRequest] = field(default_factory=dict)

    @property
    def uses_storage(self) -> bool:
        return self.config.kv_connector == "SharedStorageConnector"

    # ------------------------------------------------------------------ consumer

    def num_external_tokens(self, request: Request, num_local_cached_tokens: int) -> int:
        """Prompt tokens after the local prefix hit whose KV a producer holds for this request (0: none)."""
        params = request.kv_transfer_params
        if not self.config.is_consumer or not params or not params.get("do_remote_prefill"):
            return 0
        try:
            num_remote = self.num_remote_tokens(request)
            num_blocks = len(params["remote_block_ids"])
        except (KeyError, TypeError, ValueError):
            logger.warning("request %s: incomplete kv_transfer_params %s; computing the prompt here",
                           request.request_id, sorted(params))
            return 0
        if num_blocks * self.block_size < num_remote:
            logger.warning("request %s: %d remote blocks cannot hold %d tokens (block size differs?); computing "
                           "the prompt here", request.request_id, num_blocks, num_remote)
            return 0
        return max(0, num_remote - num_local_cached_tokens)

    def num_remote_tokens(self, request: Request) -> int:
        """Leading prompt tokens whose KV the producer holds (all of the request's remote blocks cover them)."""
        params = request.kv_transfer_params or {}
        return min(int(params["remote_num_tokens"]), request.num_prompt_tokens)

    def start_load(self, request: Request, num_local_blocks: int) -> None:
        """Blocks are allocated: ask the workers to fill those after the local prefix with the remote KV."""
        params = request.kv_transfer_params or {}
        remote_block_ids = [int(b) for b in params["remote_block_ids"]]
        num_remote = self.num_remote_tokens(request)
        num_blocks = -(-num_remote // self.block_size)
        self._pending.loads.append(KVLoad(
            request_id=request.request_id,
            local_block_ids=request.block_ids[num_local_blocks:num_blocks],
            remote_engine_id=str(params.get("remote_engine_id", "")),
            remote_request_id=str(params.get("remote_request_id", "")),
            remote_block_ids=remote_block_ids[num_local_blocks:num_blocks],
            remote_host=str(params.get("remote_host", "")), remote_port=int(params.get("remote_port", 0)),
            storage_key=storage_key(request.prompt_token_ids[:num_remote]) if self.uses_storage else ""))

    # ------------------------------------------------------------------ producer

    def request_finished(self, request: Request) -> dict[str, Any] | None:
        """A request ended normally. If a decode instance will take it over, hold its prompt blocks (the caller
        must not free them) and return the kv_transfer_params for the response; else None."""
        params = request.kv_transfer_params
        if not self.config.is_producer or not params or not params.get("do_remote_decode"):
            return None
        num_tokens = request.num_prompt_tokens
        block_ids = request.block_ids[:-(-num_tokens // self.block_size)]
        expires_at = time.time() + self.config.lease_s
        self.held[request.request_id] = _HeldRequest(request, expires_at)
        key = storage_key(request.prompt_token_ids) if self.uses_storage else ""
        self._pending.saves.append(KVSave(request.request_id, block_ids, key))
        return {
            "do_remote_prefill": True, "do_remote_decode": False,
            "remote_engine_id": self.config.engine_id, "remote_request_id": request.request_id,
            "remote_block_ids": block_ids, "remote_host": self.config.kv_ip,
            "remote_port": self.config.kv_port + self.data_parallel_rank * self.tensor_parallel_size,
            "remote_num_tokens": num_tokens, "remote_blocks_expiry_time": expires_at,
            "remote_block_size": self.block_size,
        }

    def expired(self, now: float) -> list[Request]:
        """Held requests whose lease ran out; the workers are told to stop serving them."""
        expired = [held.request for held in self.held.values() if held.expires_at <= now]
        for request in expired:
            del self.held[request.request_id]
            self._pending.released_request_ids.append(request.request_id)
            logger.info("request %s: nobody pulled its KV within %.0f s; blocks freed", request.request_id,
                        self.config.lease_s)
        return expired

    def take_sent(self, output: KVConnectorOutput) -> list[Request]:
        """Held requests whose KV the workers finished sending (or writing): their blocks can go."""
        return [held.request for request_id in output.finished_sending
                if (held := self.held.pop(request_id, None)) is not None]

    @property
    def num_held_blocks(self) -> int:
        return sum(len(held.request.block_ids) for held in self.held.values())

    # ------------------------------------------------------------------ per step

    def has_pending_metadata(self) -> bool:
        pending = self._pending
        return bool(pending.loads or pending.saves or pending.released_request_ids)

    def take_metadata(self) -> KVConnectorMetadata | None:
        if not self.has_pending_metadata():
            return None
        metadata, self._pending = self._pending, KVConnectorMetadata()
        return metadata

    def next_lease_expiry(self) -> float | None:
        return min((held.expires_at for held in self.held.values()), default=None)
