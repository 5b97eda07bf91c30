"""Scheduler basics: diffs, continuous batching, token budget, chunked prefill, max_num_seqs, prefix hits."""
from __future__ import annotations

import pytest

from tests.engine_core.harness import Harness, make_request, make_requests, reference_output_ids


def test_single_request_new_once_then_diffs() -> None:
    h = Harness(block_size=4)
    req = make_request("a", num_tokens=7, max_tokens=5)
    h.add(req)
    first, _ = h.step()
    assert [n.request_id for n in first.new_requests] == ["a"] and not first.cached_requests
    new = first.new_requests[0]
    assert new.token_ids == req.prompt_token_ids and new.num_prompt_tokens == 7
    assert new.block_ids == [0, 1] and new.num_computed_tokens == 0
    assert first.num_scheduled_tokens == {"a": 7}
    expected = reference_output_ids(req.prompt_token_ids, 5)
    # Token 8 fits block 1; token 9 needs block 2; tokens 10-11 fit; then finished.
    expected_new_blocks = [[], [2], [], []]
    for i in range(4):
        step, _ = h.step()
        assert not step.new_requests
        (diff,) = step.cached_requests
        assert diff.new_token_ids == [expected[i]]  # exactly the previous step's sample
        assert diff.new_block_ids == expected_new_blocks[i]
        assert diff.num_computed_tokens == 7 + i
        assert step.num_scheduled_tokens == {"a": 1}
    assert h.token_ids("a") == expected
    assert h.final("a").finish_reason == "length"
    assert not h.scheduler.has_unfinished_requests()
    assert h.scheduler.has_work_for_workers()  # the worker still has to hear that "a" finished
    last, _ = h.step()
    assert last.finished_request_ids == ["a"] and not last.num_scheduled_tokens
    assert not h.scheduler.has_work_for_workers()
    assert h.scheduler.kv_cache.usage == 0.0


def test_request_added_mid_run_joins_next_step() -> None:
    h = Harness()
    a, b = make_request("a", max_tokens=6), make_request("b", max_tokens=3)
    h.add(a)
    h.step()
    h.step()
    h.add(b)
    step, _ = h.step()
    assert [n.request_id for n in step.new_requests] == ["b"]
    assert [c.request_id for c in step.cached_requests] == ["a"]
    assert step.num_scheduled_tokens == {"a": 1, "b": 8}
    h.run()
    assert h.token_ids("a") == reference_output_ids(a.prompt_token_ids, 6)
    assert h.token_ids("b") == reference_output_ids(b.prompt_token_ids, 3)


def test_token_budget_chunks_prefill_alongside_decodes() -> None:
    h = Harness(max_num_batched_tokens=10, block_size=4)
    decoders = make_requests(2, num_tokens=3, max_tokens=20)
    h.add(*decoders)
    h.step()  # both prompts (6 tokens)
    long = make_request("long", num_tokens=25, max_tokens=2)
    h.add(long)
    chunks = []
    for _ in range(100):
        if h.finished("long"):
            break
        step, _ = h.step()
        assert sum(step.num_scheduled_tokens.values()) <= 10
        for d in decoders:
            assert step.num_scheduled_tokens[d.request_id] == 1  # decodes never starve behind the prefill
        chunks.append(step.num_scheduled_tokens.get("long", 0))
    assert chunks[:4] == [8, 8, 8, 1]  # 25 prompt tokens in 8-token chunks, then its decode
    assert h.outputs["long"][0].new_token_ids  # no output until the prefill completes
    assert len(h.outputs["long"]) == 2
    h.run()
    for req in decoders + [long]:
        assert h.token_ids(req.request_id) == reference_output_ids(req.prompt_token_ids,
                                                                   req.sampling_params.max_tokens)


def test_waiting_prompt_is_chunked_to_fill_the_budget() -> None:
    h = Harness(max_num_batched_tokens=16)
    a, b = make_request("a", num_tokens=10), make_request("b", num_tokens=10)
    h.add(a, b)
    step, _ = h.step()
    assert step.num_scheduled_tokens == {"a": 10, "b": 6}
    step, _ = h.step()
    assert step.num_scheduled_tokens == {"a": 1, "b": 4}
    assert [n.request_id for n in step.cached_requests] == ["a", "b"]
    assert step.cached_requests[1].new_token_ids == []  # "b" was mid-prefill: nothing new to tell


def test_without_chunked_prefill_prompts_run_whole() -> None:
    h = Harness(max_num_batched_tokens=16, enable_chunked_prefill=False)
    a, b = make_request("a", num_tokens=10), make_request("b", num_tokens=10)
    huge = make_request("huge", num_tokens=40, max_tokens=1)
    h.add(a, b, huge)
    step, _ = h.step()
    assert step.num_scheduled_tokens == {"a": 10}
    step, _ = h.step()
    assert step.num_scheduled_tokens == {"a": 1, "b": 10}
    h.run()
    # A prompt longer than the whole budget still runs (chunked) once it has a step to itself.
    assert h.token_ids("huge") == reference_output_ids(huge.prompt_token_ids, 1)


def test_max_num_seqs_caps_the_batch() -> None:
    h = Harness(max_num_seqs=3)
    requests = make_requests(5, num_tokens=4, max_tokens=3)
    h.add(*requests)
    step, _ = h.step()
    assert list(step.num_scheduled_tokens) == [r.request_id for r in requests[:3]]
    h.run(on_step=lambda _: len(h.steps[-1].num_scheduled_tokens) <= 3 or pytest.fail("batch over 3"))
    assert h.scheduler.make_stats().max_reqs_in_step == 3
    for r in requests:
        assert h.token_ids(r.request_id) == reference_output_ids(r.prompt_token_ids, 3)


def test_prefix_hit_shares_blocks_and_reports_cached_tokens() -> None:
    h = Harness(block_size=4)
    shared = list(range(100, 114))  # 14 tokens: 3 full blocks + 2
    a = make_request("a", prompt_token_ids=shared + [1, 2], max_tokens=3)
    h.add(a)
    h.step()
    b = make_request("b", prompt_token_ids=shared + [3, 4, 5], max_tokens=3)
    h.add(b)
    step, _ = h.step()
    (new_b,) = step.new_requests
    a_blocks = h.scheduler.requests["a"].block_ids
    assert new_b.num_computed_tokens == 12 and new_b.block_ids[:3] == a_blocks[:3]
    assert step.num_scheduled_tokens["b"] == 17 - 12
    refs = [h.scheduler.kv_cache.pool.blocks[i].ref_cnt for i in new_b.block_ids]
    assert refs == [2, 2, 2, 1, 1]
    h.run()
    assert h.outputs["b"][0].num_cached_tokens == 12 and h.final("b").num_cached_tokens == 12
    assert h.outputs["a"][0].num_cached_tokens == 0
    assert h.token_ids("b") == reference_output_ids(b.prompt_token_ids, 3)
    stats = h.scheduler.make_stats()
    assert (stats.prefix_cache_queries, stats.prefix_cache_hits) == (16 + 17, 12)


def test_prefix_hit_on_an_identical_prompt_leaves_the_last_token() -> None:
    h = Harness(block_size=4)
    prompt = list(range(200, 208))
    h.add(make_request("a", prompt_token_ids=prompt, max_tokens=1))
    h.run()
    h.add(make_request("b", prompt_token_ids=prompt, max_tokens=1))
    step, _ = h.step()
    assert step.new_requests[0].num_computed_tokens == 4 and step.num_scheduled_tokens == {"b": 4}
    assert h.token_ids("b") == h.token_ids("a")


def test_generated_tokens_are_cached_too() -> None:
    h = Harness(block_size=4)
    a = make_request("a", prompt_token_ids=list(range(300, 306)), max_tokens=6)
    h.add(a)
    h.run()
    continuation = a.prompt_token_ids + h.token_ids("a")  # 12 tokens: 3 full blocks, computed up to 11
    h.add(make_request("b", prompt_token_ids=continuation + [9], max_tokens=1))
    step, _ = h.step()
    assert step.new_requests[0].num_computed_tokens == 8  # block 3 holds an uncomputed last token


def test_cache_salt_isolates_prefixes() -> None:
    h = Harness(block_size=4)
    prompt = list(range(400, 413))
    h.add(make_request("plain", prompt_token_ids=prompt, max_tokens=1))
    h.add(make_request("salt-x", prompt_token_ids=prompt, max_tokens=1, cache_salt="x"))
    h.run()
    h.add(make_request("plain2", prompt_token_ids=prompt, max_tokens=1),
          make_request("salt-x2", prompt_token_ids=prompt, max_tokens=1, cache_salt="x"),
          make_request("salt-y", prompt_token_ids=prompt, max_tokens=1, cache_salt="y"))
    step, _ = h.step()
    cached = {n.request_id: n.num_computed_tokens for n in step.new_requests}
    assert cached == {"plain2": 12, "salt-x2": 12, "salt-y": 0}
    blocks = {n.request_id: n.block_ids[:3] for n in step.new_requests}
    assert not set(blocks["plain2"]) & set(blocks["salt-x2"])
    h.run()
    assert h.token_ids("salt-y") == h.token_ids("plain") == h.token_ids("salt-x2")


def test_prefix_caching_off_recomputes() -> None:
    h = Harness(enable_prefix_caching=False)
    prompt = list(range(500, 520))
    h.add(make_request("a", prompt_token_ids=prompt, max_tokens=1))
    h.run()
    h.add(make_request("b", prompt_token_ids=prompt, max_tokens=1))
    step, _ = h.step()
    assert step.new_requests[0].num_computed_tokens == 0
    assert h.scheduler.make_stats().prefix_cache_queries == 0


def test_outputs_are_grouped_by_client_index() -> None:
    h = Harness()
    h.add(make_request("a", client_index=0), make_request("b", client_index=3))
    _, by_client = h.step()
    assert {c: [o.request_id for o in outs] for c, outs in by_client.items()} == {0: ["a"], 3: ["b"]}


def test_stats_count_steps_and_requests() -> None:
    h = Harness(num_blocks=10)
    h.add(*make_requests(2, num_tokens=4, max_tokens=2))
    h.step()
    stats = h.scheduler.make_stats()
    assert (stats.num_running_reqs, stats.num_waiting_reqs, stats.num_kv_blocks) == (2, 0, 10)
    assert stats.kv_cache_usage == 0.2
    h.run()
    stats = h.scheduler.make_stats()
    # Steps: prefill (samples #1), decode (samples #2, finishes), then an empty step telling the worker.
    assert (stats.num_steps, stats.num_scheduled_reqs, stats.max_reqs_in_step) == (2, 4, 2)
    assert (stats.num_running_reqs, stats.kv_cache_usage, stats.num_preemptions) == (0, 0.0, 0)


def test_max_waiting_requests_refuses_past_the_bound() -> None:
    """--max-waiting-requests: a request arriving while the queue holds that many is refused (the frontend
    answers 503 with Retry-After); once the queue drains, requests are taken again."""
    from engine_core.config import CacheConfig, SchedulerConfig
    from engine_core.scheduler import QUEUE_FULL, Scheduler

    scheduler = Scheduler(SchedulerConfig(max_num_batched_tokens=64, max_model_len=256, max_waiting_requests=2),
                          CacheConfig(block_size=4), num_blocks=64)
    assert scheduler.add_request(make_request("a")) is None and scheduler.add_request(make_request("b")) is None
    refused = scheduler.add_request(make_request("c"))
    assert refused is not None and refused.finish_reason == "error" and refused.stop_reason.startswith(QUEUE_FULL)
    scheduler.schedule()  # both start running: the queue is empty again
    assert scheduler.add_request(make_request("c")) is None
