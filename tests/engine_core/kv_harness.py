"""Disaggregated prefill/decode, scheduler side: the harness of tests/engine_core/test_kv_transfer*.py (no
processes, hand-built worker answers).

A producer `Harness` (kv_producer) runs prompts with {"do_remote_decode": true} and hands out kv_transfer_params;
a consumer `Harness` (kv_consumer) gets requests carrying those params. `KVRunner` is the tests' fake worker with
a fake connector: it records the step's KVConnectorMetadata, and when a test says a load finished it copies the
producer runner's fake KV (one token id per slot) of `remote_block_ids` into `local_block_ids`. `FakeRunner`'s own
check (the KV a step attends to must hold the request's tokens) then proves that the consumer runs from the right
blocks, and that the producer kept them intact until the pull. The Harness checks the scheduler's integrity after
every call.
"""
from __future__ import annotations

import zlib
from typing import Any

import msgspec

from engine_core.config import CacheConfig, KVTransferConfig, SchedulerConfig
from engine_core.kv_transfer import KVConnectorScheduler
from engine_core.protocol import EngineCoreRequest, KVConnectorOutput, KVLoad, ModelRunnerOutput, SchedulerOutput
from engine_core.scheduler import Scheduler
from tests.engine_core.harness import FakeRunner, Harness, make_request, random_prompt

BLOCK_SIZE = 4
KV_PORT = 30000


def prompt_of(num_tokens: int, name: str) -> list[int]:
    """Distinct random prompt tokens, the same for the same name."""
    return random_prompt(num_tokens, seed=zlib.crc32(name.encode()))


def make_kv_scheduler(role: str, *, policy: str = "recompute", num_blocks: int = 64, max_num_seqs: int = 16,
                      max_num_batched_tokens: int = 64, dp_rank: int = 0, tp: int = 1,
                      extra: dict[str, Any] | None = None) -> Scheduler:
    config = KVTransferConfig(kv_connector="ZmqPullConnector", kv_role=role, kv_ip="10.0.0.7", kv_port=KV_PORT,
                              engine_id=f"{role}-engine", kv_load_failure_policy=policy,
                              kv_connector_extra_config=dict(extra or {}))
    connector = KVConnectorScheduler(config, BLOCK_SIZE, data_parallel_rank=dp_rank, tensor_parallel_size=tp)
    return Scheduler(SchedulerConfig(max_num_batched_tokens=max_num_batched_tokens, max_num_seqs=max_num_seqs,
                                     max_model_len=1024),
                     CacheConfig(block_size=BLOCK_SIZE, enable_prefix_caching=True), num_blocks,
                     kv_connector=connector, kv_load_failure_policy=policy)


def with_params(req: EngineCoreRequest, params: dict[str, Any] | None) -> EngineCoreRequest:
    return msgspec.structs.replace(req, kv_transfer_params=params)


class KVRunner(FakeRunner):
    """FakeRunner plus a fake worker-side connector, driven by the test."""

    peer: FakeRunner | None = None  # the producer's runner: where loads copy the KV from

    def __init__(self, num_blocks: int, block_size: int) -> None:
        super().__init__(num_blocks, block_size)
        self.loads: dict[str, KVLoad] = {}  # in flight
        self.loaded_ids: set[str] = set()  # requests whose KV arrived by transfer (start mid-block)
        self.pending = KVConnectorOutput()  # reported with the next step's answer

    def execute(self, step: SchedulerOutput) -> ModelRunnerOutput:
        if step.kv_connector_metadata is not None:
            for load in step.kv_connector_metadata.loads:
                assert load.request_id not in self.loads, f"{load.request_id} loaded twice"
                self.loads[load.request_id] = load
        output = super().execute(step)
        report, self.pending = self.pending, KVConnectorOutput()
        if report.finished_sending or report.finished_recving or report.failed_recving:
            output = msgspec.structs.replace(output, kv_connector_output=report)
        return output

    def _apply_diffs(self, step: SchedulerOutput) -> None:
        # A loaded request starts at its last prompt token, not on a block boundary as a prefix hit does.
        new = [msgspec.structs.replace(n, num_computed_tokens=0) if n.request_id in self.loaded_ids else n
               for n in step.new_requests]
        super()._apply_diffs(msgspec.structs.replace(step, new_requests=new))
        for n in step.new_requests:
            if n.request_id in self.loaded_ids:
                self.num_computed[n.request_id] = n.num_computed_tokens

    def finish_load(self, request_id: str) -> None:
        """The pull succeeded: copy the producer's blocks, report finished_recving next step."""
        load = self.loads.pop(request_id)
        assert self.peer is not None and len(load.local_block_ids) == len(load.remote_block_ids)
        bs = self.block_size
        for local, remote in zip(load.local_block_ids, load.remote_block_ids):
            self.kv[local * bs:(local + 1) * bs] = self.peer.kv[remote * bs:(remote + 1) * bs]
        self.loaded_ids.add(request_id)
        self.pending = msgspec.structs.replace(self.pending,
                                               finished_recving=[*self.pending.finished_recving, request_id])

    def fail_load(self, request_id: str, reason: str = "producer unreachable") -> None:
        self.loads.pop(request_id)
        self.pending = msgspec.structs.replace(self.pending,
                                               failed_recving={**self.pending.failed_recving, request_id: reason})

    def finish_sending(self, *request_ids: str) -> None:
        self.pending = msgspec.structs.replace(self.pending,
                                               finished_sending=[*self.pending.finished_sending, *request_ids])


def kv_harness(role: str, **kwargs: Any) -> tuple[Harness, KVRunner]:
    h = Harness(scheduler=make_kv_scheduler(role, **kwargs))
    runner = KVRunner(h.scheduler.kv_cache.num_blocks, BLOCK_SIZE)
    h.runner = runner
    return h, runner


def prefill_remotely(producer: Harness, request_id: str, prompt: list[int]) -> dict[str, Any]:
    """Run a prefill-for-remote-decode on the producer; return the kv_transfer_params of its response."""
    producer.add(with_params(make_request(request_id, prompt_token_ids=prompt, max_tokens=1),
                             {"do_remote_decode": True}))
    producer.step_until(lambda _: producer.finished(request_id))
    params = producer.final(request_id).kv_transfer_params
    assert params is not None
    return params


def pd_pair(**consumer_kwargs: Any) -> tuple[Harness, KVRunner, Harness, KVRunner]:
    producer, producer_runner = kv_harness("kv_producer")
    consumer, consumer_runner = kv_harness("kv_consumer", **consumer_kwargs)
    consumer_runner.peer = producer_runner
    return producer, producer_runner, consumer, consumer_runner
