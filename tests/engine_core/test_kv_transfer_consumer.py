"""Disaggregated prefill/decode, scheduler side, the consumer: a request carrying kv_transfer_params waits for its
KV to load, then runs its last prompt token; local prefix hits, partial remote prompts, seats while loading, kv_both
instances, and params too bad to load from (computed locally). The harness: tests/engine_core/kv_harness.py.
"""
from __future__ import annotations

from typing import Any

import pytest

from engine_core.request import RequestStatus
from tests.engine_core.harness import make_request, reference_output_ids
from tests.engine_core.kv_harness import KV_PORT, kv_harness, pd_pair, prefill_remotely, prompt_of, with_params


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

