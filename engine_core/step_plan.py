"""What one `schedule()` call decides (`StepPlan`), and its diff-only `SchedulerOutput` for the workers: a
request's full data once per (re)start (`NewRequestData`), only new token ids and blocks afterwards."""
from __future__ import annotations

from dataclasses import dataclass, field

from engine_core.encoder_cache import EncoderStepBudget
from engine_core.protocol import CachedRequestData, KVConnectorMetadata, NewRequestData, SchedulerOutput
from engine_core.request import Request


@dataclass
class StepPlan:
    """What one `schedule()` call has decided so far; preemption can withdraw a request from it."""

    token_budget: int
    encoder_budget: EncoderStepBudget
    scheduled: list[Request] = field(default_factory=list)
    num_scheduled_tokens: dict[str, int] = field(default_factory=dict)
    new_block_ids: dict[str, list[int]] = field(default_factory=dict)
    preempted_ids: set[str] = field(default_factory=set)

    def add(self, request: Request, num_tokens: int, new_block_ids: list[int]) -> None:
        assert 0 < num_tokens <= self.token_budget
        self.scheduled.append(request)
        self.num_scheduled_tokens[request.request_id] = num_tokens
        self.new_block_ids[request.request_id] = new_block_ids
        self.token_budget -= num_tokens

    def withdraw(self, request: Request) -> None:
        num_tokens = self.num_scheduled_tokens.pop(request.request_id, 0)
        if num_tokens:
            self.scheduled.remove(request)
            del self.new_block_ids[request.request_id]
            self.token_budget += num_tokens

    def to_scheduler_output(self, finished_ids: list[str], kv_connector_metadata: KVConnectorMetadata | None,
                            free_encoder_hashes: list[str]) -> SchedulerOutput:
        """The step's diffs; marks every scheduled request's tokens as known to the worker."""
        new_requests, cached_requests = [], []
        for request in self.scheduled:
            if request.num_tokens_known_to_worker == 0:
                new_requests.append(NewRequestData(
                    request.request_id, request.take_unsent_token_ids(), request.num_prompt_tokens,
                    request.sampling_params, list(request.block_ids), request.num_computed_tokens,
                    request.eos_token_id, request.pooling_params, request.audio, request.mm_items))
            else:
                cached_requests.append(CachedRequestData(
                    request.request_id, request.take_unsent_token_ids(), self.new_block_ids[request.request_id],
                    request.num_computed_tokens))
        return SchedulerOutput(new_requests, cached_requests, dict(self.num_scheduled_tokens), finished_ids,
                               kv_connector_metadata, free_encoder_hashes)
