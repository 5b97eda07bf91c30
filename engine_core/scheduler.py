"""The scheduler: `schedule()` decides one step, `update_from_output()` applies the worker's answer.

One invariant drives everything: each request's `num_computed_tokens` catches up to its `num_tokens`.
A fresh prompt (minus prefix-cache hits), a prompt chunk, a decode (one token) and a recompute after
preemption are the same thing: "run the next min(remaining, budget) tokens". A step's order:

```
 1. running requests, oldest first: decodes take 1 token, mid-prefill ones take min(remaining, budget);
    out of blocks -> preempt (recompute) a victim, possibly the request itself, and retry
 2. waiting requests in policy order (skipped if step 1 preempted anyone): prefix-cache lookup, then
    the rest of the prompt up to the budget; stop at the first that does not fit (no overtaking)
 3. build the diff-only SchedulerOutput: NewRequestData once per (re)start, CachedRequestData afterwards
```
Disaggregated prefill/decode's states (prefills held for a pull, prompts being loaded) are in
`engine_core.kv_loading`; media items' encoder budget and cache in `engine_core.encoder_cache`.
"""
from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable

from engine_core.config import CacheConfig, SchedulerConfig
from engine_core.encoder_cache import EncoderCache, EncoderStepBudget
from engine_core.kv_cache import KVCacheBlock, KVCacheManager
from engine_core.kv_loading import RemoteKVMixin
from engine_core.kv_transfer import KVConnectorScheduler
from engine_core.protocol import (
    EngineCoreOutput,
    EngineCoreRequest,
    ModelRunnerOutput,
    MultiModalItem,
    PoolingOutput,
    SchedulerOutput,
    SchedulerStats,
    TokenLogprobs,
)
from engine_core.request import Request, RequestStatus, check_stop
from engine_core.request_queue import make_request_queue
from engine_core.step_plan import StepPlan

logger = logging.getLogger("conveyor.scheduler")

_NO_SAMPLE = "the worker returned no sampled token for a request whose tokens were all computed"
QUEUE_FULL = "the engine's waiting queue is full"  # frontend.errors answers it 503 with Retry-After
_NO_POOLING_OUTPUT = "the worker returned no pooled result for a pooling request whose prompt was computed"


class Scheduler(RemoteKVMixin):
    """Continuous batching over a paged KV cache with prefix caching, chunked prefill and preemption."""

    def __init__(self, scheduler_config: SchedulerConfig, cache_config: CacheConfig, num_blocks: int,
                 kv_connector: KVConnectorScheduler | None = None, kv_load_failure_policy: str = "recompute") -> None:
        self.config = scheduler_config
        self.kv_connector = kv_connector
        self.kv_load_failure_policy = kv_load_failure_policy
        # Requests whose KV a connector is loading (status WAITING_FOR_REMOTE_KV), and finished ones whose
        # blocks must wait for the workers' load to end before they can be reused.
        self.loading: dict[str, Request] = {}
        self._abandoned_loads: dict[str, Request] = {}
        self.kv_cache = KVCacheManager(num_blocks, cache_config.block_size, cache_config.enable_prefix_caching)
        # A request may never outgrow the whole cache: past that it would preempt itself forever.
        self.max_len = min(scheduler_config.max_model_len, self.kv_cache.capacity_tokens)
        self.requests: dict[str, Request] = {}  # every unfinished request, by id
        self.waiting = make_request_queue(scheduler_config.policy)
        self.running: list[Request] = []  # in the order they (re)started: the tail is preempted first (fcfs)
        self._finished_ids_for_workers: list[str] = []  # sent (and cleared) with the next step
        self._num_steps = 0
        self._num_scheduled_reqs = 0
        self._max_reqs_in_step = 0
        self._num_preemptions = 0
        self._prompt_tokens_computed = 0
        self._prompt_tokens_transferred = 0
        self._num_kv_transfers_failed = 0
        self._mm_items_encoded = 0
        self.encoder_budget = scheduler_config.max_num_encoder_input_tokens or scheduler_config.max_num_batched_tokens
        self.encoder_cache = EncoderCache(scheduler_config.encoder_cache_size or self.encoder_budget)

    # ------------------------------------------------------------------ requests in and out

    def add_request(self, req: EngineCoreRequest) -> EngineCoreOutput | None:
        """Queue a request; return an immediate "error" output instead if it can never run."""
        error = self._validate(req)
        if error is not None:
            return EngineCoreOutput(req.request_id, [], finish_reason="error", stop_reason=error)
        request = Request.from_engine_core_request(req)
        self.requests[request.request_id] = request
        self.waiting.add(request)
        return None

    def abort_requests(self, request_ids: Iterable[str]) -> None:
        """Finish the given requests at once, freeing their blocks; unknown (or finished) ids are ignored."""
        for request_id in request_ids:
            request = self.requests.get(request_id)
            if request is not None:
                self._finish(request, RequestStatus.FINISHED_ABORTED)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def has_work_for_workers(self) -> bool:
        """Something to schedule, or news the workers must hear now."""
        pending_metadata = self.kv_connector is not None and self.kv_connector.has_pending_metadata()
        return bool(self.running or self.waiting or self._finished_ids_for_workers) or pending_metadata

    def _validate(self, req: EngineCoreRequest) -> str | None:
        num_prompt_tokens = len(req.prompt_token_ids)
        if 0 < self.config.max_waiting_requests <= len(self.waiting):
            return (f"{QUEUE_FULL} ({self.config.max_waiting_requests} requests, --max-waiting-requests): retry "
                    "shortly")
        if req.request_id in self.requests:
            return f"request id {req.request_id!r} is already in use"
        if num_prompt_tokens == 0:
            return "the prompt is empty"
        if num_prompt_tokens > self.config.max_model_len:
            return (f"the prompt has {num_prompt_tokens} tokens, more than the maximum context length "
                    f"of {self.config.max_model_len} tokens")
        if num_prompt_tokens > self.kv_cache.capacity_tokens:
            return (f"the prompt has {num_prompt_tokens} tokens, more than the KV cache holds "
                    f"({self.kv_cache.num_blocks} blocks of {self.kv_cache.block_size} tokens)")
        pooling_tasks = self.config.pooling_tasks
        if req.pooling_params is None and pooling_tasks:
            return "this model is served with --runner pooling: it does not generate text"
        if req.pooling_params is not None and req.pooling_params.task not in pooling_tasks:
            return (f"this model does not serve the pooling task {req.pooling_params.task!r}"
                    + (f" (it serves: {', '.join(pooling_tasks)})" if pooling_tasks
                       else ": it is served with --runner generate"))
        return None

    def _finish(self, request: Request, status: RequestStatus, stop_reason: int | str | None = None) -> None:
        """Retire a request: leave the queues, free its blocks (unless a KV transfer still needs them), tell the
        workers next step, forget it."""
        assert status.is_finished
        if request.status == RequestStatus.RUNNING:
            self.running.remove(request)
        elif request.status == RequestStatus.WAITING_FOR_REMOTE_KV:
            del self.loading[request.request_id]
            self._abandoned_loads[request.request_id] = request  # freed once the workers' load has ended
        else:
            self.waiting.remove([request])
        if request.status != RequestStatus.WAITING_FOR_REMOTE_KV and not self._hold_for_transfer(request, status):
            self.kv_cache.free(request)
        self.encoder_cache.release_all(request)
        request.status = status
        request.stop_reason = stop_reason
        if request.num_tokens_known_to_worker:
            self._finished_ids_for_workers.append(request.request_id)
        del self.requests[request.request_id]

    # ------------------------------------------------------------------ schedule

    def schedule(self) -> SchedulerOutput:
        """Decide the next step; mutates request progress, block tables, queues and counters."""
        plan = StepPlan(self.config.max_num_batched_tokens, EncoderStepBudget(self.encoder_budget))
        self._schedule_running(plan)
        if not plan.preempted_ids:  # blocks ran short: let the running requests drain first
            self._schedule_waiting(plan)
        self._record_step(plan)
        return self._build_output(plan)

    def _schedule_running(self, plan: StepPlan) -> None:
        """Give every running request its next tokens (1 for a decode, a chunk for a prefill) while budget lasts."""
        for request in list(self.running):
            if plan.token_budget == 0:
                break
            if request.status != RequestStatus.RUNNING:  # preempted earlier in this loop
                continue
            num_new_tokens = min(request.num_tokens - request.num_computed_tokens, plan.token_budget)
            assert num_new_tokens > 0, request
            num_new_tokens, to_encode = self._fit_media(request, request.num_computed_tokens, num_new_tokens, plan)
            if num_new_tokens == 0:  # its next media item waits for encoder budget or cache space
                continue
            new_block_ids = self._allocate_or_preempt(request, num_new_tokens, plan)
            if new_block_ids is not None:
                self._commit_media(request, request.num_computed_tokens, num_new_tokens, to_encode, plan)
                plan.add(request, num_new_tokens, new_block_ids)

    def _allocate_or_preempt(self, request: Request, num_new_tokens: int, plan: StepPlan) -> list[int] | None:
        """Allocate blocks for a running request, preempting victims until it fits or is itself preempted."""
        while (new_block_ids := self.kv_cache.allocate_slots(request, num_new_tokens)) is None:
            victim = self._pick_running_victim()
            self._preempt(victim, plan)
            if victim is request:
                return None
        return new_block_ids

    def _pick_running_victim(self) -> Request:
        if self.config.policy == "priority":
            return max(self.running, key=lambda r: r.priority_key)
        return self.running[-1]  # fcfs: the most recently started

    def _schedule_waiting(self, plan: StepPlan) -> None:
        """Start waiting requests in policy order while budget, seats and blocks allow. A request loading its KV
        holds a seat: once loaded it joins the running batch directly."""
        while (self.waiting and plan.token_budget > 0
               and len(self.running) + len(self.loading) < self.config.max_num_seqs):
            request = self.waiting.peek()
            if request.request_id in plan.preempted_ids or not self._try_start(request, plan):
                break

    def _try_start(self, request: Request, plan: StepPlan) -> bool:
        """Start `request` (the queue head) from its cached prefix; False (nothing changed) if it does not fit."""
        # Pending prompt logprobs, and pooling (which reads every prompt row's hidden state), need the whole prompt
        # computed here: no prefix-cache hits (vLLM does the same).
        must_compute_prompt = request.prompt_logprobs is not None or request.pooling_params is not None
        computed_blocks, num_cached_tokens = (
            ([], 0) if must_compute_prompt else self.kv_cache.get_computed_blocks(request))
        if self.kv_connector is not None and request.status == RequestStatus.WAITING:
            num_external_tokens = self.kv_connector.num_external_tokens(request, num_cached_tokens)
            if num_external_tokens:
                return self._start_loading(request, computed_blocks, num_cached_tokens, num_external_tokens)
        num_new_tokens = request.num_tokens - num_cached_tokens
        # Without chunked prefill a prompt runs whole, unless it could never fit even in an empty step.
        if not self.config.enable_chunked_prefill and num_new_tokens > plan.token_budget and plan.scheduled:
            return False
        num_new_tokens, to_encode = self._fit_media(request, num_cached_tokens, min(num_new_tokens, plan.token_budget),
                                                    plan)
        if num_new_tokens == 0:
            return False
        new_block_ids = self._allocate_for_waiting(request, num_new_tokens, computed_blocks, plan)
        if new_block_ids is None:
            return False
        self._commit_media(request, num_cached_tokens, num_new_tokens, to_encode, plan)
        started = self.waiting.pop()
        assert started is request, (started, request)
        request.status = RequestStatus.RUNNING
        request.num_computed_tokens = num_cached_tokens
        if request.num_cached_tokens < 0:  # first start: this is what the first output reports
            request.num_cached_tokens = num_cached_tokens
        self.running.append(request)
        plan.add(request, num_new_tokens, new_block_ids)
        return True

    def _allocate_for_waiting(self, request: Request, num_new_tokens: int,
                              computed_blocks: list[KVCacheBlock], plan: StepPlan) -> list[int] | None:
        """Allocate for a waiting request; under the priority policy it may preempt lower-priority runners."""
        while (new_block_ids := self.kv_cache.allocate_slots(request, num_new_tokens, computed_blocks)) is None:
            if self.config.policy != "priority" or not self.running:
                return None
            victim = max(self.running, key=lambda r: r.priority_key)
            if victim.priority <= request.priority:
                return None
            self._preempt(victim, plan)
        return new_block_ids

    def _fit_media(self, request: Request, start: int, num_new_tokens: int,
                   plan: StepPlan) -> tuple[int, list[MultiModalItem]]:
        """The chunk cut before a media item the encoder cannot take this step (`engine_core.encoder_cache`)."""
        if not request.mm_items:
            return num_new_tokens, []
        return self.encoder_cache.fit(request, start, num_new_tokens, plan.encoder_budget)

    def _commit_media(self, request: Request, start: int, num_new_tokens: int, to_encode: list[MultiModalItem],
                      plan: StepPlan) -> None:
        if request.mm_items:
            self.encoder_cache.commit(request, start, num_new_tokens, to_encode, plan.encoder_budget)

    def _preempt(self, request: Request, plan: StepPlan) -> None:
        """Preempt by recompute: drop the request's KV and progress and requeue it at the front of waiting."""
        plan.withdraw(request)
        self.encoder_cache.release_all(request)
        plan.preempted_ids.add(request.request_id)
        self.running.remove(request)
        self.kv_cache.free(request)
        if request.num_tokens_known_to_worker:  # the worker must forget it; a restart resends everything
            self._finished_ids_for_workers.append(request.request_id)
        request.num_tokens_known_to_worker = 0
        request.num_computed_tokens = 0
        request.status = RequestStatus.PREEMPTED
        self.waiting.add_preempted(request)
        self._num_preemptions += 1

    def _build_output(self, plan: StepPlan) -> SchedulerOutput:
        """Turn the plan into diffs; marks every scheduled request's tokens as known to the worker."""
        finished_ids, self._finished_ids_for_workers = self._finished_ids_for_workers, []
        metadata = self.kv_connector.take_metadata() if self.kv_connector is not None else None
        return plan.to_scheduler_output(finished_ids, metadata, self.encoder_cache.take_freed())

    def _record_step(self, plan: StepPlan) -> None:
        if plan.scheduled:
            self._num_steps += 1
            self._num_scheduled_reqs += len(plan.scheduled)
            self._max_reqs_in_step = max(self._max_reqs_in_step, len(plan.scheduled))

    # ------------------------------------------------------------------ update from output

    def update_from_output(self, scheduler_output: SchedulerOutput,
                           runner_output: ModelRunnerOutput) -> dict[int, list[EngineCoreOutput]]:
        """Apply a finished step: advance progress, append samples, finish stopped requests.

        Returns outputs grouped by `client_index`. A request aborted while the step ran is skipped.
        """
        outputs: dict[int, list[EngineCoreOutput]] = defaultdict(list)
        self._apply_kv_connector_output(runner_output.kv_connector_output, outputs)
        if runner_output.error is not None:
            self._fail_step(scheduler_output, runner_output.error, outputs)
            return dict(outputs)
        self._mm_items_encoded += runner_output.num_encoded_items
        index_of = {request_id: i for i, request_id in enumerate(runner_output.request_ids)}
        for request_id, num_tokens in scheduler_output.num_scheduled_tokens.items():
            request = self.requests.get(request_id)
            if request is None or request.status != RequestStatus.RUNNING:
                continue
            self._prompt_tokens_computed += max(0, min(request.num_computed_tokens + num_tokens,
                                                       request.num_prompt_tokens) - request.num_computed_tokens)
            i = index_of.get(request_id)
            if runner_output.prompt_logprobs is not None and i is not None and i < len(runner_output.prompt_logprobs):
                request.record_prompt_logprobs(request.num_computed_tokens, runner_output.prompt_logprobs[i])
            request.num_computed_tokens += num_tokens
            self.kv_cache.cache_full_blocks(request)
            if request.mm_items:
                self.encoder_cache.release_consumed(request)
            # Only a step that brought the request level samples; a mid-prefill chunk has nothing to report.
            if request.num_computed_tokens < request.num_tokens:
                continue
            if request.pooling_params is not None:
                outputs[request.client_index].append(self._finish_pooling(request, runner_output, i))
                continue
            token_ids = runner_output.sampled_token_ids[i] if i is not None else []
            if not token_ids:  # failed on its own (request_errors), or the worker broke the contract: fail it
                error = (runner_output.request_errors or {}).get(request_id, _NO_SAMPLE)
                self._finish(request, RequestStatus.FINISHED_ERROR, error)
                outputs[request.client_index].append(request.make_output([]))
                continue
            logprobs = runner_output.logprobs[i] if i is not None and i < len(runner_output.logprobs) else None
            outputs[request.client_index].append(self._append_sampled(request, token_ids, logprobs))
        return dict(outputs)

    def _finish_pooling(self, request: Request, runner_output: ModelRunnerOutput, i: int | None) -> EngineCoreOutput:
        """A pooling request whose prompt is computed is done: its one output carries the pooled result."""
        pooled = runner_output.pooling_outputs
        result: PoolingOutput | None = pooled[i] if pooled is not None and i is not None and i < len(pooled) else None
        if result is None:
            error = (runner_output.request_errors or {}).get(request.request_id, _NO_POOLING_OUTPUT)
            self._finish(request, RequestStatus.FINISHED_ERROR, error)
            return request.make_output([])
        self._finish(request, RequestStatus.FINISHED_STOPPED)
        return request.make_output([], pooling_output=result)

    def _append_sampled(self, request: Request, token_ids: list[int],
                        logprobs: list[TokenLogprobs] | None) -> EngineCoreOutput:
        """Append sampled tokens up to the first stop; finish the request if one hit."""
        num_kept = 0
        for token_id in token_ids:
            request.append_output_token_id(token_id)
            num_kept += 1
            stop = check_stop(request, self.max_len)
            if stop is not None:
                self._finish(request, *stop)
                break
        return request.make_output(token_ids[:num_kept], None if logprobs is None else logprobs[:num_kept])

    def _fail_step(self, scheduler_output: SchedulerOutput, message: str,
                   outputs: dict[int, list[EngineCoreOutput]]) -> None:
        """The whole step failed: finish every request in it with an "error" output; the engine goes on."""
        for request_id in scheduler_output.num_scheduled_tokens:
            request = self.requests.get(request_id)
            if request is None or request.status != RequestStatus.RUNNING:  # aborted while the step ran
                continue
            self._finish(request, RequestStatus.FINISHED_ERROR, message)
            outputs[request.client_index].append(request.make_output([]))

    # ------------------------------------------------------------------ stats and checks

    def make_stats(self) -> SchedulerStats:
        return SchedulerStats(
            num_running_reqs=len(self.running),
            num_waiting_reqs=len(self.waiting),
            kv_cache_usage=self.kv_cache.usage,
            num_kv_blocks=self.kv_cache.num_blocks,
            prefix_cache_queries=self.kv_cache.prefix_cache_queries,
            prefix_cache_hits=self.kv_cache.prefix_cache_hits,
            num_steps=self._num_steps,
            num_scheduled_reqs=self._num_scheduled_reqs,
            max_reqs_in_step=self._max_reqs_in_step,
            num_preemptions=self._num_preemptions,
            prompt_tokens_computed=self._prompt_tokens_computed,
            prompt_tokens_transferred=self._prompt_tokens_transferred,
            num_kv_transfers_failed=self._num_kv_transfers_failed,
            num_blocks_held_for_transfer=self.kv_connector.num_held_blocks if self.kv_connector is not None else 0,
            mm_items_encoded=self._mm_items_encoded,
            mm_encoder_cache_hits=self.encoder_cache.num_items_reused,
        )

    def check_integrity(self) -> None:
        """Assert the KV pool is consistent and every request sits in exactly one queue with matching state."""
        self.kv_cache.check_integrity()
        block_size = self.kv_cache.block_size
        assert len(self.running) <= self.config.max_num_seqs
        for request in self.running:
            assert request.status == RequestStatus.RUNNING, request
            assert request.num_computed_tokens < request.num_tokens, request
            assert len(request.block_ids) * block_size >= request.num_computed_tokens, request
        for request in self.waiting:
            assert request.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED), request
            assert not request.block_ids and request.num_computed_tokens == 0, request
            assert request.num_tokens_known_to_worker == 0, request
        for request in self.loading.values():
            assert request.status == RequestStatus.WAITING_FOR_REMOTE_KV and request.block_ids, request
        queued = [r.request_id for r in self.running] + [r.request_id for r in self.waiting] + list(self.loading)
        assert sorted(queued) == sorted(self.requests), (queued, list(self.requests))
