"""Preemption by recompute, priority scheduling and aborts."""
from __future__ import annotations

from engine_core.request import RequestStatus
from tests.engine_core.harness import Harness, make_request, reference_output_ids


def expected(req) -> list[int]:  # type: ignore[no-untyped-def]
    return reference_output_ids(req.prompt_token_ids, req.sampling_params.max_tokens)


def test_fcfs_preempts_the_latest_started_and_recomputes() -> None:
    h = Harness(num_blocks=6, block_size=4)
    a = make_request("a", num_tokens=8, max_tokens=12)
    b = make_request("b", num_tokens=8, max_tokens=12)
    h.add(a, b)
    preempt_step = h.step_until(lambda step: "b" in step.finished_request_ids)
    assert "b" not in preempt_step.num_scheduled_tokens and "a" in preempt_step.num_scheduled_tokens
    b_state = h.scheduler.requests["b"]
    assert b_state.status == RequestStatus.PREEMPTED and b_state.block_ids == []
    assert h.scheduler.make_stats().num_preemptions == 1
    num_b_outputs = len(h.token_ids("b"))
    # When "b" comes back it is new again, carrying its prompt and every token generated so far.
    step = h.step_until(lambda step: any(n.request_id == "b" for n in step.new_requests))
    news = [n for n in step.new_requests if n.request_id == "b"]
    assert news[0].token_ids == b.prompt_token_ids + h.token_ids("b")[:num_b_outputs]
    assert news[0].num_prompt_tokens == 8
    h.run()
    assert h.token_ids("a") == expected(a) and h.token_ids("b") == expected(b)
    assert h.final("b").finish_reason == "length"
    assert h.scheduler.kv_cache.usage == 0.0


def test_a_request_can_preempt_itself() -> None:
    h = Harness(num_blocks=5, block_size=4)
    a = make_request("a", num_tokens=8, max_tokens=4)  # 2 blocks, needs a 3rd at token 9
    b = make_request("b", num_tokens=7, max_tokens=8)  # 2 blocks, needs a 3rd at token 9
    h.add(a, b)
    h.step()  # a: 8 tokens computed, b: 7
    step, _ = h.step()  # a needs block 5th; b fits
    assert step.num_scheduled_tokens == {"a": 1, "b": 1}
    step, _ = h.step()  # b needs a block: none left, b is the tail -> preempts itself
    assert step.num_scheduled_tokens == {"a": 1} and step.finished_request_ids == ["b"]
    h.run()
    assert h.token_ids("a") == expected(a) and h.token_ids("b") == expected(b)


def test_preempted_request_resumes_from_its_cached_prefix() -> None:
    h = Harness(num_blocks=7, block_size=4)
    a = make_request("a", num_tokens=12, max_tokens=8)  # grows to 5 blocks
    b = make_request("b", num_tokens=12, max_tokens=2)  # grows to 4 blocks: 9 > 7 at the first decode
    h.add(a, b)
    h.step_until(lambda step: "b" in step.finished_request_ids)
    step = h.step_until(lambda step: any(n.request_id == "b" for n in step.new_requests))
    restart = next(n for n in step.new_requests if n.request_id == "b")
    assert restart.num_computed_tokens > 0  # its freed full blocks were still in the prefix cache
    h.run()
    assert h.token_ids("b") == expected(b)
    assert h.final("b").num_cached_tokens == 0  # reports the hit at its first start


def test_priority_orders_waiting_requests() -> None:
    h = Harness(policy="priority", max_num_seqs=1)
    reqs = [make_request("low", priority=5), make_request("high", priority=-1),
            make_request("mid", priority=2), make_request("mid-later", priority=2)]
    h.add(*reqs)
    h.run()
    started = [n.request_id for step in h.steps for n in step.new_requests]
    assert started == ["high", "mid", "mid-later", "low"]


def test_fcfs_ignores_priority() -> None:
    h = Harness(max_num_seqs=1)
    h.add(make_request("first", priority=9), make_request("second", priority=0))
    step, _ = h.step()
    assert [n.request_id for n in step.new_requests] == ["first"]


def test_priority_policy_preempts_the_lowest_priority_runner() -> None:
    h = Harness(policy="priority", num_blocks=6, block_size=4)
    low = make_request("low", num_tokens=8, max_tokens=12, priority=5, arrival_time=0.0)
    high = make_request("high", num_tokens=8, max_tokens=12, priority=0, arrival_time=1.0)
    h.add(low, high)
    h.step_until(lambda _: h.scheduler.make_stats().num_preemptions > 0)
    # fcfs would have picked "high" (started last); priority picks "low".
    assert h.steps[-1].finished_request_ids == ["low"]
    assert h.scheduler.requests["low"].status == RequestStatus.PREEMPTED
    h.run()
    assert h.token_ids("low") == expected(low) and h.token_ids("high") == expected(high)


def test_waiting_high_priority_request_preempts_low_priority_runners() -> None:
    h = Harness(policy="priority", num_blocks=8, block_size=4)
    low = make_request("low", num_tokens=24, max_tokens=4, priority=3)  # 6 of 8 blocks
    h.add(low)
    h.step()
    urgent = make_request("urgent", num_tokens=12, max_tokens=2, priority=0)  # needs 3 blocks
    h.add(urgent)
    step, _ = h.step()
    assert [n.request_id for n in step.new_requests] == ["urgent"]
    assert step.finished_request_ids == ["low"] and "low" not in step.num_scheduled_tokens
    same = make_request("same", num_tokens=28, max_tokens=1, priority=0)  # equal priority never preempts
    h.add(same)
    h.run()
    for req in (low, urgent, same):
        assert h.token_ids(req.request_id) == expected(req)
    assert h.scheduler.make_stats().num_preemptions == 1


def test_abort_frees_blocks_at_once() -> None:
    h = Harness(num_blocks=16)
    running = make_request("running", num_tokens=20, max_tokens=50)
    h.add(running)
    h.step()
    h.add(make_request("waiting", num_tokens=4))
    assert h.scheduler.kv_cache.usage > 0
    h.abort(["running", "waiting", "never-heard-of"])
    assert h.scheduler.kv_cache.usage == 0.0
    assert not h.scheduler.has_unfinished_requests() and h.scheduler.has_work_for_workers()
    step, by_client = h.step()
    assert step.finished_request_ids == ["running"]  # the worker never saw "waiting"
    assert not step.num_scheduled_tokens and by_client == {}
    assert not h.scheduler.has_work_for_workers()
    h.abort(["running"])  # twice: ignored


def test_abort_while_the_step_runs_drops_its_result() -> None:
    h = Harness()
    h.add(make_request("a", max_tokens=10), make_request("b", max_tokens=2))
    step = h.scheduler.schedule()
    runner_output = h.runner.execute(step)
    h.abort(["a"])
    by_client = h.scheduler.update_from_output(step, runner_output)
    h.scheduler.check_integrity()
    assert [o.request_id for o in by_client[0]] == ["b"]
    assert h.scheduler.schedule().finished_request_ids == ["a"]
    h.scheduler.check_integrity()


def test_preempted_request_can_be_aborted() -> None:
    h = Harness(num_blocks=6, block_size=4)
    h.add(make_request("a", num_tokens=8, max_tokens=12), make_request("b", num_tokens=8, max_tokens=12))
    h.step_until(lambda _: h.scheduler.make_stats().num_preemptions > 0)
    h.abort(["b"])
    step, _ = h.step()
    assert "b" not in step.finished_request_ids  # already forgotten at preemption
    h.run()
    assert h.final("a").finish_reason == "length" and "b" not in h.scheduler.requests
