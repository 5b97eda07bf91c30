"""The scheduler's side of disaggregated prefill/decode (`engine_core.kv_transfer` connectors): prefills that keep
their blocks for a decode instance to pull, and requests whose prompt KV is being loaded from another instance
(status WAITING_FOR_REMOTE_KV, holding a seat but no token budget) until the workers report the load done or
failed. A mixin of `engine_core.scheduler.Scheduler`, which owns the state named below.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from engine_core.protocol import EngineCoreOutput, KVConnectorOutput
from engine_core.request import Request, RequestStatus

if TYPE_CHECKING:
    from engine_core.kv_cache import KVCacheBlock, KVCacheManager
    from engine_core.kv_transfer import KVConnectorScheduler
    from engine_core.request_queue import RequestQueue

logger = logging.getLogger("conveyor.scheduler")


class RemoteKVMixin:
    """Scheduler methods for KV transfers. Expects the scheduler's attributes below."""

    kv_connector: KVConnectorScheduler | None
    kv_load_failure_policy: str
    kv_cache: KVCacheManager
    waiting: RequestQueue
    running: list[Request]
    requests: dict[str, Request]
    loading: dict[str, Request]  # requests whose KV a connector is loading
    _abandoned_loads: dict[str, Request]  # finished while loading: freed once the workers' load has ended
    _prompt_tokens_transferred: int
    _num_kv_transfers_failed: int

    def transfer_poll_interval(self) -> float | None:
        """How soon to ask the workers again about KV transfers in flight (they report with each step's answer);
        None when none are in flight."""
        if self.loading or self._abandoned_loads:
            return 0.005
        if self.kv_connector is not None and self.kv_connector.held:
            return 0.05
        return None

    def expire_kv_leases(self, now: float) -> None:
        """Free the blocks of prefills nobody pulled within their lease."""
        if self.kv_connector is not None and self.kv_connector.held:
            for request in self.kv_connector.expired(now):
                self.kv_cache.free(request)

    def _hold_for_transfer(self, request: Request, status: RequestStatus) -> bool:
        """A prefill that ended normally and that a decode instance will continue keeps its blocks."""
        if self.kv_connector is None or status not in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH):
            return False
        request.kv_transfer_params_out = self.kv_connector.request_finished(request)
        return request.kv_transfer_params_out is not None

    def _start_loading(self, request: Request, computed_blocks: list[KVCacheBlock], num_cached_tokens: int,
                       num_external_tokens: int) -> bool:
        """Allocate blocks for the prompt KV another instance holds and have the workers fetch it. Takes no
        token budget: the request computes nothing until the KV has arrived."""
        assert self.kv_connector is not None
        if self.kv_cache.allocate_slots(request, num_external_tokens, computed_blocks) is None:
            return False
        started = self.waiting.pop()
        assert started is request, (started, request)
        request.status = RequestStatus.WAITING_FOR_REMOTE_KV
        request.num_computed_tokens = num_cached_tokens
        request.num_cached_tokens = num_cached_tokens
        self.kv_connector.start_load(request, num_local_blocks=len(computed_blocks))
        self.loading[request.request_id] = request
        return True

    def _finish_loads(self, kv_output: KVConnectorOutput) -> list[Request]:
        """Loaded requests join the running batch from their last prompt token (recomputed for its logits);
        failed ones follow the kv_load_failure_policy. Returns the requests that failed for good."""
        for request_id in [*kv_output.finished_recving, *kv_output.failed_recving]:
            if (abandoned := self._abandoned_loads.pop(request_id, None)) is not None:
                self.kv_cache.free(abandoned)
        failed = []
        for request_id in kv_output.finished_recving:
            if (request := self.loading.pop(request_id, None)) is not None:
                assert self.kv_connector is not None
                # Only what the producer had: its last block may be partial and the prompt may go on past it.
                num_loaded = self.kv_connector.num_remote_tokens(request)
                num_usable = min(num_loaded, request.num_tokens - 1)  # the last token runs here for its logits
                self._prompt_tokens_transferred += num_usable - request.num_computed_tokens
                request.num_computed_tokens = num_usable
                request.status = RequestStatus.RUNNING
                self.running.append(request)
        for request_id, reason in kv_output.failed_recving.items():
            if (request := self.loading.pop(request_id, None)) is not None:
                self._num_kv_transfers_failed += 1
                self.kv_cache.free(request)
                if self.kv_load_failure_policy == "fail":
                    request.status, request.stop_reason = (RequestStatus.FINISHED_ERROR,
                                                           f"KV transfer from the prefill instance failed: {reason}")
                    del self.requests[request_id]
                    failed.append(request)
                else:  # recompute: forget the transfer and compute the prompt here, first in line
                    logger.warning("request %s: loading its KV failed (%s); computing the prompt here",
                                   request_id, reason)
                    request.kv_transfer_params = None
                    request.num_computed_tokens = 0
                    request.status = RequestStatus.PREEMPTED
                    self.waiting.add_preempted(request)
        return failed

    def _apply_kv_connector_output(self, kv_output: KVConnectorOutput | None,
                                   outputs: dict[int, list[EngineCoreOutput]]) -> None:
        if kv_output is None or self.kv_connector is None:
            return
        for request in self.kv_connector.take_sent(kv_output):
            self.kv_cache.free(request)
        for request in self._finish_loads(kv_output):
            outputs[request.client_index].append(request.make_output([]))

