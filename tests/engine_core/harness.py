"""Factories and a fake worker for driving the scheduler with hand-built runner outputs.

`FakeRunner` plays rank 0: it learns requests only from `SchedulerOutput` diffs (as a real worker must),
keeps a fake paged KV cache (one token id per slot) and checks on every step that the KV a request relies on
still holds that request's tokens, so shared prefix blocks, LRU eviction and preemption bugs surface as
assertion failures. Its "model" is a deterministic function of the whole context, so any scheduling of the
same requests (chunked, preempted, prefix-hit) must produce the same tokens as `reference_output_ids`.
"""
from __future__ import annotations

import itertools
import random
import struct
from collections import defaultdict
from collections.abc import Callable, Iterable

from engine_core.config import CacheConfig, SchedulerConfig
from engine_core.protocol import (
    EngineCoreOutput,
    EngineCoreRequest,
    ModelRunnerOutput,
    PoolingOutput,
    PoolingParams,
    SamplingParams,
    SchedulerOutput,
    TokenLogprobs,
)
from engine_core.scheduler import Scheduler

EOS = 2
_request_counter = itertools.count()


def make_scheduler(num_blocks: int = 64, block_size: int = 4, max_num_batched_tokens: int = 64,
                   max_num_seqs: int = 16, max_model_len: int = 1024, policy: str = "fcfs",
                   enable_prefix_caching: bool = True, enable_chunked_prefill: bool = True,
                   pooling_tasks: tuple[str, ...] = ()) -> Scheduler:
    return Scheduler(
        SchedulerConfig(max_num_batched_tokens=max_num_batched_tokens, max_num_seqs=max_num_seqs,
                        max_model_len=max_model_len, policy=policy, enable_chunked_prefill=enable_chunked_prefill,
                        pooling_tasks=pooling_tasks),
        CacheConfig(block_size=block_size, enable_prefix_caching=enable_prefix_caching),
        num_blocks)


def random_prompt(num_tokens: int, seed: int | float) -> list[int]:
    """Token ids in [10, 1000): never EOS, never a model output (outputs are >= 1000)."""
    rng = random.Random(seed)
    return [rng.randrange(10, 1000) for _ in range(num_tokens)]


def make_request(request_id: str | None = None, num_tokens: int = 8, *, prompt_token_ids: list[int] | None = None,
                 max_tokens: int = 4, eos_token_id: int | None = EOS, priority: int = 0,
                 arrival_time: float | None = None, cache_salt: str | None = None, client_index: int = 0,
                 **sampling: object) -> EngineCoreRequest:
    """One request of `num_tokens` distinct random prompt tokens (or the given ones)."""
    n = next(_request_counter)
    request_id = request_id if request_id is not None else f"req-{n}"
    prompt = prompt_token_ids if prompt_token_ids is not None else random_prompt(num_tokens, seed=n)
    params = SamplingParams(max_tokens=max_tokens, **sampling)  # type: ignore[arg-type]
    return EngineCoreRequest(request_id, prompt, params, eos_token_id,
                             arrival_time=float(n) if arrival_time is None else arrival_time,
                             priority=priority, cache_salt=cache_salt, client_index=client_index)


def make_pooling_request(request_id: str | None = None, num_tokens: int = 8, task: str = "embed",
                         **kwargs: object) -> EngineCoreRequest:
    request = make_request(request_id, num_tokens, **kwargs)  # type: ignore[arg-type]
    return EngineCoreRequest(request.request_id, request.prompt_token_ids, SamplingParams(), None,
                             request.arrival_time, priority=request.priority, cache_salt=request.cache_salt,
                             client_index=request.client_index, pooling_params=PoolingParams(task=task))


def pooled_value(prompt: list[int]) -> PoolingOutput:
    """The fake model's pooled result: the prompt's token sum, as one float32."""
    return PoolingOutput(shape=[1], data=struct.pack("<f", float(sum(prompt))))


def make_requests(num_requests: int, num_tokens: int, **kwargs: object) -> list[EngineCoreRequest]:
    return [make_request(num_tokens=num_tokens, **kwargs) for _ in range(num_requests)]  # type: ignore[arg-type]


def model_token(context: list[int]) -> int:
    """The fake model: a deterministic function of the whole context, always >= 1000."""
    return 1000 + (sum(context) * 31 + len(context) * 7) % 50000


def reference_output_ids(prompt: list[int], max_tokens: int) -> list[int]:
    context = list(prompt)
    for _ in range(max_tokens):
        context.append(model_token(context))
    return context[len(prompt):]


class FakeRunner:
    """A rank-0 worker that learns requests from diffs and checks the KV it is asked to reuse."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.block_size = block_size
        self.kv: list[int | None] = [None] * (num_blocks * block_size)  # slot -> token id whose KV is there
        self.tokens: dict[str, list[int]] = {}
        self.block_ids: dict[str, list[int]] = {}
        self.num_computed: dict[str, int] = {}
        self.forced: dict[str, list[int]] = defaultdict(list)  # request id -> tokens to emit next, in order
        self.fail_next: str | None = None
        self.with_logprobs = False
        self.pooling: set[str] = set()  # requests the scheduler sent with pooling_params

    @classmethod
    def for_scheduler(cls, scheduler: Scheduler) -> FakeRunner:
        return cls(scheduler.kv_cache.num_blocks, scheduler.kv_cache.block_size)

    def execute(self, step: SchedulerOutput) -> ModelRunnerOutput:
        self._apply_diffs(step)
        if self.fail_next is not None:
            message, self.fail_next = self.fail_next, None
            return ModelRunnerOutput([], [], [], error=message)
        request_ids, sampled, logprobs = [], [], []
        pooled: list[PoolingOutput | None] = []
        for request_id, num_tokens in step.num_scheduled_tokens.items():
            token_id = self._run(request_id, num_tokens)
            request_ids.append(request_id)
            if request_id in self.pooling:  # pooling requests never sample
                pooled.append(None if token_id is None else pooled_value(self.tokens[request_id]))
                token_id = None
            else:
                pooled.append(None)
            sampled.append([] if token_id is None else [token_id])
            logprobs.append(None if token_id is None or not self.with_logprobs
                            else [TokenLogprobs(logprob=-0.5, rank=1)])
        return ModelRunnerOutput(request_ids, sampled, logprobs,
                                 pooling_outputs=pooled if any(p is not None for p in pooled) else None)

    def _apply_diffs(self, step: SchedulerOutput) -> None:
        for request_id in step.finished_request_ids:
            assert request_id in self.tokens, f"told to forget unknown {request_id}"
            for table in (self.tokens, self.block_ids, self.num_computed):
                del table[request_id]
            self.pooling.discard(request_id)
        for new in step.new_requests:
            assert new.request_id not in self.tokens, f"{new.request_id} sent as new twice"
            assert new.num_computed_tokens % self.block_size == 0, "prefix hits come in whole blocks"
            self.tokens[new.request_id] = list(new.token_ids)
            self.block_ids[new.request_id] = list(new.block_ids)
            self.num_computed[new.request_id] = new.num_computed_tokens
            if new.pooling_params is not None:
                self.pooling.add(new.request_id)
        for diff in step.cached_requests:
            assert diff.request_id in self.tokens, f"diff for unknown {diff.request_id}"
            assert diff.num_computed_tokens == self.num_computed[diff.request_id], "progress out of sync"
            self.tokens[diff.request_id].extend(diff.new_token_ids)
            self.block_ids[diff.request_id].extend(diff.new_block_ids)
        scheduled = set(step.num_scheduled_tokens)
        assert {r.request_id for r in step.new_requests} <= scheduled
        assert {r.request_id for r in step.cached_requests} <= scheduled
        assert not scheduled & set(step.finished_request_ids)

    def _slot(self, request_id: str, position: int) -> int:
        block_id = self.block_ids[request_id][position // self.block_size]
        return block_id * self.block_size + position % self.block_size

    def _run(self, request_id: str, num_tokens: int) -> int | None:
        tokens, start = self.tokens[request_id], self.num_computed[request_id]
        end = start + num_tokens
        assert end <= len(tokens), f"{request_id}: scheduled past its known tokens"
        assert len(self.block_ids[request_id]) * self.block_size >= end, f"{request_id}: block table too short"
        for position in range(start):  # the KV this step attends to must still be this request's
            assert self.kv[self._slot(request_id, position)] == tokens[position], f"{request_id}: KV clobbered"
        for position in range(start, end):
            self.kv[self._slot(request_id, position)] = tokens[position]
        self.num_computed[request_id] = end
        if end < len(tokens):
            return None
        forced = self.forced.get(request_id)
        return forced.pop(0) if forced else model_token(tokens)


class Harness:
    """A scheduler plus a fake runner; every call checks the scheduler's integrity afterwards."""

    def __init__(self, scheduler: Scheduler | None = None, **scheduler_kwargs: object) -> None:
        self.scheduler = scheduler if scheduler is not None else make_scheduler(**scheduler_kwargs)  # type: ignore[arg-type]
        self.runner = FakeRunner.for_scheduler(self.scheduler)
        self.outputs: dict[str, list[EngineCoreOutput]] = defaultdict(list)
        self.steps: list[SchedulerOutput] = []

    def add(self, *requests: EngineCoreRequest) -> list[EngineCoreOutput]:
        rejected = [out for req in requests if (out := self.scheduler.add_request(req)) is not None]
        self.scheduler.check_integrity()
        return rejected

    def abort(self, request_ids: Iterable[str]) -> None:
        self.scheduler.abort_requests(request_ids)
        self.scheduler.check_integrity()

    def step(self) -> tuple[SchedulerOutput, dict[int, list[EngineCoreOutput]]]:
        step = self.scheduler.schedule()
        self.scheduler.check_integrity()
        runner_output = self.runner.execute(step)
        by_client = self.scheduler.update_from_output(step, runner_output)
        self.scheduler.check_integrity()
        for outputs in by_client.values():
            for output in outputs:
                assert not self.finished(output.request_id), f"output after finish for {output.request_id}"
                self.outputs[output.request_id].append(output)
        self.steps.append(step)
        return step, by_client

    def run(self, max_steps: int = 10_000, on_step: Callable[[int], object] | None = None) -> int:
        """Step until nothing is left for the workers; returns the number of steps taken."""
        num_steps = 0
        while self.scheduler.has_work_for_workers():
            assert num_steps < max_steps, "no progress"
            self.step()
            num_steps += 1
            if on_step is not None:
                on_step(num_steps)
        return num_steps

    def step_until(self, done: Callable[[SchedulerOutput], bool], max_steps: int = 200) -> SchedulerOutput:
        """Step until `done(step)` holds for a step; returns that step."""
        for _ in range(max_steps):
            step, _ = self.step()
            if done(step):
                return step
        raise AssertionError("condition never reached")

    def token_ids(self, request_id: str) -> list[int]:
        return [t for out in self.outputs[request_id] for t in out.new_token_ids]

    def finished(self, request_id: str) -> bool:
        outputs = self.outputs.get(request_id) or []
        return bool(outputs) and outputs[-1].finished

    def final(self, request_id: str) -> EngineCoreOutput:
        assert self.finished(request_id), f"{request_id} has not finished"
        return self.outputs[request_id][-1]
