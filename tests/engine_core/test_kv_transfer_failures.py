"""Disaggregated prefill/decode, scheduler side, how a load ends: failed loads under each failure policy, aborts
while loading, and the per-rank load reports merged across tensor-parallel ranks. The harness:
tests/engine_core/kv_harness.py.
"""
from __future__ import annotations

import pytest

from engine_core.executor import _KVTransferAggregator
from engine_core.protocol import KVConnectorOutput
from engine_core.request import RequestStatus
from tests.engine_core.harness import make_request, reference_output_ids
from tests.engine_core.kv_harness import pd_pair, prefill_remotely, prompt_of, with_params


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
