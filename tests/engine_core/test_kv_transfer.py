"""Disaggregated prefill/decode, scheduler side: no processes, hand-built worker answers.

A producer `Harness` (kv_producer) runs prompts with {"do_remote_decode": true} and hands out kv_transfer_params;
a consumer `Harness` (kv_consumer) gets requests carrying those params. `KVRunner` is the tests' fake worker with
a fake connector: it records the step's KVConnectorMetadata, and when a test says a load finished it copies the
producer runner's fake KV (one token id per slot) of `remote_block_ids` into `local_block_ids`. `FakeRunner`'s own
check (the KV a step attends to must hold the request's tokens) then proves that the consumer runs from the right
blocks, and that the producer kept them intact until the pull. The Harness checks the scheduler's integrity after
every call.
"""
from __future__ import annotations

import time
import zlib
from typing import Any

import msgspec
import pytest

from engine_core.config import CacheConfig, KVTransferConfig, SchedulerConfig
from engine_core.executor import _KVTransferAggregator
from engine_core.kv_transfer import KVConnectorScheduler
from engine_core.protocol import (
    EngineCoreRequest,
    KVConnectorOutput,
    KVLoad,
    KVSave,
    ModelRunnerOutput,
    SchedulerOutput,
)
from engine_core.request import RequestStatus
from engine_core.scheduler import Scheduler
from tests.engine_core.harness import FakeRunner, Harness, make_request, random_prompt, reference_output_ids

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


# --------------------------------------------------------------------------- producer


def test_producer_holds_prompt_blocks_until_sent() -> None:
    h, runner = kv_harness("kv_producer", dp_rank=1, tp=2)
    prompt = prompt_of(10, "producer")  # 3 blocks of 4, the last one partial
    h.add(with_params(make_request("p", prompt_token_ids=prompt, max_tokens=1), {"do_remote_decode": True}))
    first, _ = h.step()
    prompt_blocks = first.new_requests[0].block_ids[:3]
    final = h.final("p")
    assert final.finish_reason == "length" and final.new_token_ids == reference_output_ids(prompt, 1)
    params = final.kv_transfer_params
    assert params is not None
    assert params["do_remote_prefill"] is True and params["do_remote_decode"] is False
    assert params["remote_block_ids"] == prompt_blocks
    assert params["remote_num_tokens"] == 10
    assert params["remote_port"] == KV_PORT + 1 * 2  # kv_port + dp_rank * tp
    assert params["remote_host"] == "10.0.0.7" and params["remote_engine_id"] == "kv_producer-engine"
    assert params["remote_request_id"] == "p" and params["remote_block_size"] == BLOCK_SIZE

    held_usage = h.scheduler.kv_cache.usage
    assert held_usage > 0 and h.scheduler.make_stats().num_blocks_held_for_transfer == 3
    assert h.scheduler.transfer_poll_interval() is not None
    assert h.scheduler.has_work_for_workers()  # the KVSave must reach the workers
    step, _ = h.step()
    assert step.finished_request_ids == ["p"]
    assert step.kv_connector_metadata is not None
    assert step.kv_connector_metadata.saves == [KVSave("p", prompt_blocks, "")]
    assert not step.kv_connector_metadata.loads and not step.kv_connector_metadata.released_request_ids

    # Other work meanwhile never gets the held blocks, and the held KV stays intact.
    other = make_request("other", num_tokens=9, max_tokens=3)
    h.add(other)
    while not h.finished("other"):
        step, _ = h.step()
        for new in step.new_requests:
            assert not set(new.block_ids) & set(prompt_blocks)
        for cached in step.cached_requests:
            assert not set(cached.new_block_ids) & set(prompt_blocks)
    assert h.final("other").kv_transfer_params is None
    h.step()  # the workers forget "other"
    assert h.scheduler.kv_cache.usage == held_usage
    assert h.scheduler.make_stats().num_blocks_held_for_transfer == 3
    for position, token in enumerate(prompt):
        slot = prompt_blocks[position // BLOCK_SIZE] * BLOCK_SIZE + position % BLOCK_SIZE
        assert runner.kv[slot] == token

    runner.finish_sending("p")
    h.step()
    assert h.scheduler.kv_cache.usage == 0.0
    stats = h.scheduler.make_stats()
    assert stats.num_blocks_held_for_transfer == 0
    assert not h.scheduler.has_work_for_workers() and h.scheduler.transfer_poll_interval() is None
    runner.finish_sending("p")  # a duplicate report is ignored (no double free)
    h.step()
    assert h.scheduler.kv_cache.usage == 0.0


def test_producer_request_without_remote_decode_frees_at_once() -> None:
    h, _ = kv_harness("kv_producer")
    h.add(make_request("plain", num_tokens=10, max_tokens=1))
    h.add(with_params(make_request("flag-off", num_tokens=10, max_tokens=1), {"do_remote_decode": False}))
    h.step()
    for request_id in ("plain", "flag-off"):
        assert h.final(request_id).kv_transfer_params is None
    assert h.scheduler.kv_cache.usage == 0.0
    assert h.scheduler.make_stats().num_blocks_held_for_transfer == 0
    step, _ = h.step()
    assert step.kv_connector_metadata is None


def test_producer_aborted_request_is_not_held() -> None:
    h, _ = kv_harness("kv_producer")
    h.add(with_params(make_request("p", num_tokens=10, max_tokens=5), {"do_remote_decode": True}))
    h.step()
    h.abort(["p"])
    assert h.scheduler.kv_connector is not None and not h.scheduler.kv_connector.held
    assert h.scheduler.kv_cache.usage == 0.0
    step, _ = h.step()
    assert step.kv_connector_metadata is None


# --------------------------------------------------------------------------- lease


def test_lease_expiry_frees_blocks_and_releases() -> None:
    h, runner = kv_harness("kv_producer", extra={"lease_s": 0.0})
    h.add(with_params(make_request("p", num_tokens=10, max_tokens=1), {"do_remote_decode": True}))
    h.step()
    assert h.scheduler.kv_cache.usage > 0
    h.scheduler.expire_kv_leases(time.time() + 1)
    h.scheduler.check_integrity()
    assert h.scheduler.kv_cache.usage == 0.0
    assert h.scheduler.make_stats().num_blocks_held_for_transfer == 0
    step, _ = h.step()
    assert step.kv_connector_metadata is not None
    assert step.kv_connector_metadata.released_request_ids == ["p"]
    runner.finish_sending("p")  # a late report after expiry changes nothing
    h.step()
    assert h.scheduler.kv_cache.usage == 0.0


def test_lease_not_expired_keeps_blocks() -> None:
    h, _ = kv_harness("kv_producer")  # default lease: 120 s
    h.add(with_params(make_request("p", num_tokens=10, max_tokens=1), {"do_remote_decode": True}))
    h.step()
    h.scheduler.expire_kv_leases(time.time())
    h.scheduler.check_integrity()
    assert h.scheduler.make_stats().num_blocks_held_for_transfer == 3
    step, _ = h.step()
    assert step.kv_connector_metadata is not None and not step.kv_connector_metadata.released_request_ids
    h.scheduler.expire_kv_leases(time.time() + 1000)
    h.scheduler.check_integrity()
    assert h.scheduler.kv_cache.usage == 0.0


# --------------------------------------------------------------------------- consumer


def test_consumer_loads_then_runs_last_prompt_token() -> None:
    producer, producer_runner, h, runner = pd_pair()
    prompt = prompt_of(10, "consumer")
    params = prefill_remotely(producer, "r", prompt)
    h.add(with_params(make_request("r", prompt_token_ids=prompt, max_tokens=4), params))
    step, _ = h.step()
    assert not step.num_scheduled_tokens and not step.new_requests  # nothing computed while loading
    assert step.kv_connector_metadata is not None
    (load,) = step.kv_connector_metadata.loads
    request = h.scheduler.loading["r"]
    assert request.status == RequestStatus.WAITING_FOR_REMOTE_KV
    assert load.request_id == "r" and load.local_block_ids == request.block_ids
    assert len(load.local_block_ids) == 3  # ceil(10 / 4)
    assert load.remote_block_ids == params["remote_block_ids"]
    assert (load.remote_host, load.remote_port) == ("10.0.0.7", KV_PORT)
    assert (load.remote_engine_id, load.remote_request_id) == ("kv_producer-engine", "r")
    assert load.storage_key == ""

    for _ in range(3):  # the pull takes a while: still nothing to compute
        step, _ = h.step()
        assert not step.num_scheduled_tokens
    assert h.scheduler.transfer_poll_interval() is not None

    runner.finish_load("r")
    h.step()  # reports finished_recving
    assert "r" not in h.scheduler.loading
    step, _ = h.step()
    (new,) = step.new_requests
    assert step.num_scheduled_tokens == {"r": 1}
    assert new.num_computed_tokens == 9 and new.block_ids == load.local_block_ids
    while not h.finished("r"):
        step, _ = h.step()
        assert step.num_scheduled_tokens == {"r": 1}
    assert h.token_ids("r") == reference_output_ids(prompt, 4)
    assert h.final("r").kv_transfer_params is None
    stats = h.scheduler.make_stats()
    assert stats.prompt_tokens_transferred == 9 and stats.prompt_tokens_computed == 1
    assert stats.num_kv_transfers_failed == 0
    h.run()
    assert h.scheduler.kv_cache.usage == 0.0

    # The producer frees its blocks once its workers report the pull done.
    producer_runner.finish_sending("r")
    producer.run()
    producer.step()
    assert producer.scheduler.kv_cache.usage == 0.0


def test_consumer_with_local_prefix_hit_loads_only_the_rest() -> None:
    producer, _, h, runner = pd_pair()
    prompt = prompt_of(10, "prefix")
    params = prefill_remotely(producer, "r", prompt)
    # Warm the consumer's prefix cache with a prompt sharing only the first block.
    local = make_request("local", prompt_token_ids=prompt[:4] + prompt_of(5, "other"), max_tokens=1)
    h.add(local)
    h.run()
    before = h.scheduler.make_stats()
    h.add(with_params(make_request("r", prompt_token_ids=prompt, max_tokens=3), params))
    step, _ = h.step()
    assert step.kv_connector_metadata is not None
    (load,) = step.kv_connector_metadata.loads
    request = h.scheduler.loading["r"]
    assert request.num_computed_tokens == 4 and len(request.block_ids) == 3
    assert load.local_block_ids == request.block_ids[1:3]
    assert load.remote_block_ids == params["remote_block_ids"][1:3]
    runner.finish_load("r")
    h.step()
    step, _ = h.step()
    assert step.num_scheduled_tokens == {"r": 1} and step.new_requests[0].num_computed_tokens == 9
    h.run()
    assert h.token_ids("r") == reference_output_ids(prompt, 3)
    after = h.scheduler.make_stats()
    assert after.prompt_tokens_transferred - before.prompt_tokens_transferred == 9 - 4
    assert after.prompt_tokens_computed - before.prompt_tokens_computed == 1
    assert after.prefix_cache_hits - before.prefix_cache_hits == 4
    assert h.scheduler.kv_cache.usage == 0.0


def test_consumer_local_prefix_covers_all_but_the_last_token() -> None:
    """9 tokens, 8 of them cached locally: at most the last block is fetched, and the last prompt token runs
    here either way; nothing counts as transferred."""
    producer, _, h, runner = pd_pair()
    prompt = prompt_of(9, "covered")
    params = prefill_remotely(producer, "r", prompt)
    h.add(make_request("local", prompt_token_ids=prompt, max_tokens=1))
    h.run()
    before = h.scheduler.make_stats()
    h.add(with_params(make_request("r", prompt_token_ids=prompt, max_tokens=2), params))
    step, _ = h.step()
    if step.kv_connector_metadata is not None:
        (load,) = step.kv_connector_metadata.loads
        assert load.local_block_ids == h.scheduler.loading["r"].block_ids[2:]
        assert load.remote_block_ids == params["remote_block_ids"][2:]
        runner.finish_load("r")
        h.step()
        step, _ = h.step()
    assert step.num_scheduled_tokens == {"r": 1} and step.new_requests[0].num_computed_tokens == 8
    h.run()
    assert h.token_ids("r") == reference_output_ids(prompt, 2)
    after = h.scheduler.make_stats()
    assert after.prompt_tokens_transferred == 0
    assert after.prompt_tokens_computed - before.prompt_tokens_computed == 1


def test_consumer_partial_remote_prompt_computes_the_rest() -> None:
    """remote_num_tokens shorter than the prompt (a follow-up turn), not on a block boundary: only the tokens
    the producer had are taken from the transfer; the rest of the prompt runs here."""
    producer, _, h, runner = pd_pair()
    prompt = prompt_of(13, "partial")
    params = prefill_remotely(producer, "first-turn", prompt[:6])  # 2 blocks, the second half full
    h.add(with_params(make_request("r", prompt_token_ids=prompt, max_tokens=3), params))
    step, _ = h.step()
    assert step.kv_connector_metadata is not None
    (load,) = step.kv_connector_metadata.loads
    assert len(load.local_block_ids) == 2 and load.remote_block_ids == params["remote_block_ids"]
    runner.finish_load("r")
    h.step()
    step, _ = h.step()
    assert step.new_requests[0].num_computed_tokens == 6 and step.num_scheduled_tokens == {"r": 7}
    h.run()
    assert h.token_ids("r") == reference_output_ids(prompt, 3)
    stats = h.scheduler.make_stats()
    assert stats.prompt_tokens_transferred == 6 and stats.prompt_tokens_computed == 7


def test_loading_requests_take_seats() -> None:
    """max_num_seqs counts requests waiting for their KV: once loaded they join the running batch directly."""
    producer, _, h, runner = pd_pair(max_num_seqs=2)
    prompts = {f"r{i}": prompt_of(6, f"seat{i}") for i in range(2)}
    params = {rid: prefill_remotely(producer, rid, prompt) for rid, prompt in prompts.items()}
    h.add(with_params(make_request("r0", prompt_token_ids=prompts["r0"], max_tokens=8), params["r0"]))
    h.add(make_request("local0", num_tokens=6, max_tokens=8), make_request("local1", num_tokens=6, max_tokens=8))
    h.add(with_params(make_request("r1", prompt_token_ids=prompts["r1"], max_tokens=8), params["r1"]))
    step, _ = h.step()
    assert len(step.num_scheduled_tokens) + len(h.scheduler.loading) <= 2
    for request_id in list(runner.loads):
        runner.finish_load(request_id)
    for _ in range(40):
        step, _ = h.step()  # the harness checks len(running) <= max_num_seqs after every step
        assert len(step.num_scheduled_tokens) + len(h.scheduler.loading) <= 2
        for request_id in list(runner.loads):
            runner.finish_load(request_id)
        if not h.scheduler.has_unfinished_requests():
            break
    for request_id in ("r0", "r1"):
        assert h.token_ids(request_id) == reference_output_ids(prompts[request_id], 8)
    for request_id in ("local0", "local1"):
        assert h.finished(request_id) and len(h.token_ids(request_id)) == 8


def test_kv_both_instance_consumes_and_produces() -> None:
    """kv_both: a loaded request without do_remote_decode is freed at its end; one asking for remote decode in
    turn is held for the next instance."""
    producer, _ = kv_harness("kv_producer")
    both, both_runner = kv_harness("kv_both")
    both_runner.peer = producer.runner
    prompt = prompt_of(8, "both")
    params = prefill_remotely(producer, "r", prompt)
    both.add(with_params(make_request("r", prompt_token_ids=prompt, max_tokens=2), params))
    both.step()
    both_runner.finish_load("r")
    both.step_until(lambda _: both.finished("r"))
    assert both.token_ids("r") == reference_output_ids(prompt, 2) and both.final("r").kv_transfer_params is None
    assert both.scheduler.make_stats().prompt_tokens_transferred == 7
    both.run()
    assert both.scheduler.kv_cache.usage == 0.0
    both.add(with_params(make_request("again", prompt_token_ids=prompt, max_tokens=1), {"do_remote_decode": True}))
    both.step()
    handoff = both.final("again").kv_transfer_params
    assert handoff is not None and handoff["remote_num_tokens"] == 8 and len(handoff["remote_block_ids"]) == 2
    assert both.scheduler.make_stats().num_blocks_held_for_transfer == 2


# --------------------------------------------------------------------------- failure policies


def test_failed_load_recompute_policy_computes_prompt_here() -> None:
    producer, _, h, runner = pd_pair(policy="recompute")
    prompt = prompt_of(10, "recompute")
    params = prefill_remotely(producer, "r", prompt)
    h.add(with_params(make_request("r", prompt_token_ids=prompt, max_tokens=4), params))
    h.step()
    runner.fail_load("r")
    _, outputs = h.step()
    assert not outputs  # nothing for the client yet
    assert "r" not in h.scheduler.loading and h.scheduler.requests["r"].status == RequestStatus.PREEMPTED
    step, _ = h.step()
    (new,) = step.new_requests
    assert new.num_computed_tokens == 0 and step.num_scheduled_tokens == {"r": 10}
    assert step.kv_connector_metadata is None  # no second load
    h.run()
    final = h.final("r")
    assert final.finish_reason == "length" and h.token_ids("r") == reference_output_ids(prompt, 4)
    stats = h.scheduler.make_stats()
    assert stats.num_kv_transfers_failed == 1
    assert stats.prompt_tokens_transferred == 0 and stats.prompt_tokens_computed == 10
    assert h.scheduler.kv_cache.usage == 0.0


def test_failed_load_fail_policy_errors_the_request() -> None:
    producer, _, h, runner = pd_pair(policy="fail")
    prompt = prompt_of(10, "fail")
    params = prefill_remotely(producer, "r", prompt)
    h.add(with_params(make_request("r", prompt_token_ids=prompt, max_tokens=4), params))
    h.add(make_request("bystander", num_tokens=5, max_tokens=6))
    h.step()
    runner.fail_load("r", "connection refused")
    h.step()
    final = h.final("r")
    assert final.finish_reason == "error" and final.new_token_ids == []
    assert isinstance(final.stop_reason, str) and "KV transfer" in final.stop_reason
    assert "connection refused" in final.stop_reason
    assert "r" not in h.scheduler.requests and "r" not in h.scheduler.loading
    assert h.scheduler.make_stats().num_kv_transfers_failed == 1
    h.run()
    assert len(h.token_ids("bystander")) == 6
    assert h.scheduler.kv_cache.usage == 0.0 and not h.scheduler.has_unfinished_requests()


# --------------------------------------------------------------------------- abort while loading


@pytest.mark.parametrize("outcome", ["finished", "failed"])
def test_abort_while_loading_frees_blocks_only_after_the_load_ends(outcome: str) -> None:
    producer, _, h, runner = pd_pair()
    prompt = prompt_of(10, f"abort-{outcome}")
    params = prefill_remotely(producer, "r", prompt)
    h.add(with_params(make_request("r", prompt_token_ids=prompt, max_tokens=4), params))
    step, _ = h.step()
    (load,) = step.kv_connector_metadata.loads  # type: ignore[union-attr]
    usage = h.scheduler.kv_cache.usage
    h.abort(["r"])
    assert "r" not in h.scheduler.requests and not h.scheduler.has_unfinished_requests()
    assert h.scheduler.kv_cache.usage == usage  # the workers may still be writing into these blocks
    assert h.scheduler.transfer_poll_interval() is not None
    # Other requests meanwhile do not get the blocks the load writes into.
    h.add(make_request("other", num_tokens=12, max_tokens=2))
    for _ in range(4):
        step, _ = h.step()
        for new in step.new_requests:
            assert not set(new.block_ids) & set(load.local_block_ids)
        for cached in step.cached_requests:
            assert not set(cached.new_block_ids) & set(load.local_block_ids)
        assert "r" not in step.num_scheduled_tokens and "r" not in step.finished_request_ids
    assert h.finished("other")
    assert h.scheduler.kv_cache.usage == usage
    if outcome == "finished":
        runner.finish_load("r")
    else:
        runner.fail_load("r")
    step, outputs = h.step()
    assert not any(out.request_id == "r" for outs in outputs.values() for out in outs)
    assert "r" not in h.outputs
    assert h.scheduler.kv_cache.usage == 0.0
    assert h.scheduler.transfer_poll_interval() is None and not h.scheduler.has_work_for_workers()
    assert h.scheduler.make_stats().num_kv_transfers_failed == 0


# --------------------------------------------------------------------------- bad kv_transfer_params


def _remote_params(**overrides: Any) -> dict[str, Any]:
    params: dict[str, Any] = {"do_remote_prefill": True, "remote_block_ids": [5, 6, 7], "remote_num_tokens": 10,
                              "remote_host": "10.0.0.9", "remote_port": 30000, "remote_engine_id": "e",
                              "remote_request_id": "x"}
    params.update(overrides)
    return {key: value for key, value in params.items() if value is not None}


@pytest.mark.parametrize("params", [
    pytest.param(_remote_params(remote_block_ids=None), id="missing-remote_block_ids"),
    pytest.param(_remote_params(remote_num_tokens=None), id="missing-remote_num_tokens"),
    pytest.param(_remote_params(remote_block_ids=[5, 6]), id="too-few-blocks"),
    pytest.param(_remote_params(remote_num_tokens="many"), id="not-a-number"),
    pytest.param(_remote_params(remote_block_ids=7), id="blocks-not-a-list"),
    pytest.param(_remote_params(do_remote_prefill=False), id="flag-off"),
])
def test_bad_kv_transfer_params_compute_locally(params: dict[str, Any]) -> None:
    h, _ = kv_harness("kv_consumer")
    prompt = prompt_of(10, "bad")
    h.add(with_params(make_request("r", prompt_token_ids=prompt, max_tokens=3), params))
    step, _ = h.step()
    assert step.num_scheduled_tokens == {"r": 10}
    assert step.kv_connector_metadata is None and not h.scheduler.loading
    h.run()
    assert h.token_ids("r") == reference_output_ids(prompt, 3)
    stats = h.scheduler.make_stats()
    assert stats.prompt_tokens_transferred == 0 and stats.prompt_tokens_computed == 10
    assert h.scheduler.kv_cache.usage == 0.0


def test_producer_only_instance_ignores_remote_prefill_params() -> None:
    h, _ = kv_harness("kv_producer")
    prompt = prompt_of(10, "producer-only")
    h.add(with_params(make_request("r", prompt_token_ids=prompt, max_tokens=2), _remote_params()))
    step, _ = h.step()
    assert step.num_scheduled_tokens == {"r": 10} and step.kv_connector_metadata is None
    h.run()
    assert h.token_ids("r") == reference_output_ids(prompt, 2)


# --------------------------------------------------------------------------- tensor-parallel aggregation


def test_aggregator_finished_only_when_every_rank_reported() -> None:
    agg = _KVTransferAggregator(2)
    assert agg.merge([None, None]) is None
    assert agg.merge([KVConnectorOutput(finished_recving=["a"], finished_sending=["s"]), None]) is None
    assert agg.merge([None, KVConnectorOutput(finished_sending=["s"])]) == KVConnectorOutput(finished_sending=["s"])
    assert agg.merge([None, KVConnectorOutput(finished_recving=["a", "b"])]) == \
        KVConnectorOutput(finished_recving=["a"])
    assert agg.merge([KVConnectorOutput(finished_recving=["b"]), None]) == KVConnectorOutput(finished_recving=["b"])
    # Both ranks in the same step.
    assert agg.merge([KVConnectorOutput(finished_recving=["c"]), KVConnectorOutput(finished_recving=["c"])]) == \
        KVConnectorOutput(finished_recving=["c"])
    assert agg.merge([None, None]) is None  # nothing left over


@pytest.mark.parametrize("failing_rank_first", [True, False])
def test_aggregator_failure_on_one_rank_fails_once_all_reported(failing_rank_first: bool) -> None:
    agg = _KVTransferAggregator(2)
    failed = KVConnectorOutput(failed_recving={"a": "rank 1: timeout"})
    ok = KVConnectorOutput(finished_recving=["a"])
    first, second = (failed, ok) if failing_rank_first else (ok, failed)
    assert agg.merge([None, first]) is None
    assert agg.merge([second, None]) == KVConnectorOutput(failed_recving={"a": "rank 1: timeout"})
    assert agg.merge([ok, ok]) == KVConnectorOutput(finished_recving=["a"])  # a later id reuse starts afresh


def test_aggregator_both_ranks_fail_reported_once() -> None:
    agg = _KVTransferAggregator(2)
    merged = agg.merge([KVConnectorOutput(failed_recving={"a": "r0"}), KVConnectorOutput(failed_recving={"a": "r1"})])
    assert merged == KVConnectorOutput(failed_recving={"a": "r0"})
    assert agg.merge([None, None]) is None


def test_aggregated_output_drives_the_scheduler() -> None:
    """A load reported by one rank only keeps the request waiting; the second rank's report lets it run."""
    producer, _, h, runner = pd_pair()
    prompt = prompt_of(10, "tp")
    params = prefill_remotely(producer, "r", prompt)
    h.add(with_params(make_request("r", prompt_token_ids=prompt, max_tokens=2), params))
    h.step()
    agg = _KVTransferAggregator(2)
    runner.finish_load("r")  # copies the KV; the report it queued is replaced by the aggregator's below
    for ranks in ([KVConnectorOutput(finished_recving=["r"]), None], [None, KVConnectorOutput(finished_recving=["r"])]):
        runner.pending = agg.merge(ranks) or KVConnectorOutput()
        h.step()
        if ranks[0] is not None:
            assert "r" in h.scheduler.loading
    assert "r" not in h.scheduler.loading
    h.run()
    assert h.token_ids("r") == reference_output_ids(prompt, 2)
