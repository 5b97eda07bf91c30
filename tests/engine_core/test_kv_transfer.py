"""Disaggregated prefill/decode, scheduler side, the producer: prompt blocks held for the pull until the workers
report it sent, and the lease that frees them when no pull comes. The harness: tests/engine_core/kv_harness.py.
"""
from __future__ import annotations

import time

from engine_core.protocol import KVSave
from tests.engine_core.harness import make_request, reference_output_ids
from tests.engine_core.kv_harness import BLOCK_SIZE, KV_PORT, kv_harness, prompt_of, with_params


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

