"""Drives a real ModelRunner without an engine core: `RunnerDriver` plays the scheduler's part (block allocation,
diffs, feeding samples back). Shared by the worker tests (runner, model parity, pooling, sampling, Whisper)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from engine_core.config import CacheConfig, ModelConfig
from engine_core.protocol import (CachedRequestData, ModelRunnerOutput, MultiModalItem, NewRequestData, SamplingParams,
                                  SchedulerOutput)
from workers.model_runner import ModelRunner

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

GREEDY = SamplingParams(temperature=0.0, logprobs=0, max_tokens=1000)


@dataclass
class _DriverRequest:
    token_ids: list[int]
    num_prompt_tokens: int
    params: SamplingParams
    block_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    sent: bool = False  # the runner has seen it (NewRequestData went out)
    unsent_token_ids: list[int] = field(default_factory=list)
    unsent_block_ids: list[int] = field(default_factory=list)
    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list[float] = field(default_factory=list)
    mm_items: list[MultiModalItem] = field(default_factory=list)


class RunnerDriver:
    """A minimal scheduler stand-in: owns the block free list, builds SchedulerOutputs, feeds samples back."""

    def __init__(self, runner: ModelRunner, num_blocks: int) -> None:
        self.runner, self.block_size = runner, runner.block_size
        self.free_blocks = list(range(num_blocks))
        self.requests: dict[str, _DriverRequest] = {}
        self.finished: list[str] = []

    def add(self, request_id: str, token_ids: list[int], params: SamplingParams = GREEDY,
            cached_block_ids: list[int] | None = None, num_prompt_tokens: int | None = None,
            mm_items: list[MultiModalItem] | None = None) -> None:
        """`cached_block_ids`: full blocks whose KV already holds this request's first tokens (prefix hit)."""
        cached = list(cached_block_ids or [])
        self.requests[request_id] = _DriverRequest(
            list(token_ids), len(token_ids) if num_prompt_tokens is None else num_prompt_tokens, params,
            block_ids=cached, num_computed_tokens=len(cached) * self.block_size, unsent_block_ids=list(cached),
            mm_items=list(mm_items or []))

    def step(self, num_scheduled: dict[str, int]) -> ModelRunnerOutput:
        new, cached = [], []
        for request_id, num_tokens in num_scheduled.items():
            request = self.requests[request_id]
            self._allocate(request, request.num_computed_tokens + num_tokens)
            if not request.sent:
                new.append(NewRequestData(request_id, list(request.token_ids), request.num_prompt_tokens,
                                          request.params, list(request.block_ids), request.num_computed_tokens,
                                          mm_items=request.mm_items))
                request.sent = True
            else:
                cached.append(CachedRequestData(request_id, request.unsent_token_ids, request.unsent_block_ids,
                                                request.num_computed_tokens))
            request.unsent_token_ids, request.unsent_block_ids = [], []
        output = self.runner.execute(SchedulerOutput(new, cached, dict(num_scheduled), self.finished))
        self.finished = []
        assert output.request_ids == list(num_scheduled)
        for request_id, sampled, logprobs in zip(output.request_ids, output.sampled_token_ids, output.logprobs):
            request = self.requests[request_id]
            request.num_computed_tokens += num_scheduled[request_id]
            reached_end = request.num_computed_tokens == len(request.token_ids)
            failed = request_id in (output.request_errors or {})
            assert len(sampled) == (1 if reached_end and not failed else 0), (request_id, sampled)
            for token_id in sampled:
                request.token_ids.append(token_id)
                request.unsent_token_ids.append(token_id)
                request.output_token_ids.append(token_id)
                if logprobs is not None:
                    request.output_logprobs.append(logprobs[0].logprob)
        return output

    def _allocate(self, request: _DriverRequest, num_tokens: int) -> None:
        while len(request.block_ids) * self.block_size < num_tokens:
            block_id = self.free_blocks.pop(0)
            request.block_ids.append(block_id)
            request.unsent_block_ids.append(block_id)

    def finish(self, request_ids: list[str], keep_blocks: bool = False) -> None:
        """Tell the runner to forget them (next step); their outputs stay readable in `requests`."""
        for request_id in request_ids:
            request = self.requests[request_id]
            if not keep_blocks:
                self.free_blocks.extend(request.block_ids)
            self.finished.append(request_id)

    def generate(self, request_ids: list[str], max_new_tokens: int, chunk: int | None = None) -> None:
        """Schedule every listed request each step (prefill chunks of at most `chunk` tokens) until each has
        `max_new_tokens` outputs."""
        while True:
            active = [r for r in request_ids if len(self.requests[r].output_token_ids) < max_new_tokens]
            if not active:
                return
            schedule = {}
            for request_id in active:
                request = self.requests[request_id]
                remaining = len(request.token_ids) - request.num_computed_tokens
                schedule[request_id] = min(remaining, chunk) if chunk else remaining
            self.step(schedule)


def make_runner(model_path: str, block_size: int = 16, num_blocks: int = 256, dtype: str = "float32",
                max_model_len: int = 512, kv_cache_dtype: str = "auto") -> tuple[ModelRunner, RunnerDriver]:
    model_config = ModelConfig(model=model_path, served_model_name="test", tokenizer_dir=model_path,
                               architecture="", dtype=dtype, max_model_len=max_model_len)
    cache_config = CacheConfig(block_size=block_size, cache_dtype=kv_cache_dtype, num_blocks_override=num_blocks)
    runner = ModelRunner(model_config, cache_config, torch.device("cpu"))
    runner.initialize_cache(runner.determine_num_blocks())
    return runner, RunnerDriver(runner, num_blocks)


def prompt_ids(length: int, seed: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, 49152, (length,), generator=generator).tolist()


def isolated_greedy(model_path: str, token_ids: list[int], max_new_tokens: int) -> list[int]:
    """Greedy tokens of one request alone, prefilled in one step (block size 16)."""
    _, driver = make_runner(model_path, num_blocks=64)
    driver.add("solo", token_ids)
    driver.generate(["solo"], max_new_tokens)
    return driver.requests["solo"].output_token_ids
