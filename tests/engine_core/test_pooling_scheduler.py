"""Pooling requests in the scheduler: batched like prompts, finished by their pooled result, never sampling,
never reading the prefix cache, refused when the runner does not serve their task."""
from __future__ import annotations

import struct

from engine_core.protocol import ModelRunnerOutput
from tests.engine_core.harness import Harness, make_pooling_request, make_request

EMBED_TASKS = ("embed", "token_embed")


def pooled_sum(h: Harness, request_id: str) -> float:
    (output,) = h.outputs[request_id]
    assert output.finish_reason == "stop" and output.new_token_ids == []
    assert output.pooling_output is not None and output.pooling_output.shape == [1]
    return struct.unpack("<f", output.pooling_output.data)[0]


def test_pooling_requests_batch_in_one_step_and_finish_with_their_result() -> None:
    h = Harness(block_size=4, max_num_batched_tokens=64, pooling_tasks=EMBED_TASKS)
    requests = [make_pooling_request(f"p{i}", num_tokens=5 + i) for i in range(4)]
    h.add(*requests)
    step, _ = h.step()
    assert sorted(step.num_scheduled_tokens) == ["p0", "p1", "p2", "p3"]
    assert all(new.pooling_params is not None for new in step.new_requests)
    for request in requests:
        assert pooled_sum(h, request.request_id) == float(sum(request.prompt_token_ids))
    assert not h.scheduler.has_unfinished_requests()
    last, _ = h.step()  # the workers hear that they finished; every block is free again
    assert sorted(last.finished_request_ids) == ["p0", "p1", "p2", "p3"]
    assert h.scheduler.kv_cache.usage == 0.0


def test_long_pooling_prompt_is_chunked_and_pooled_once_complete() -> None:
    h = Harness(block_size=4, max_num_batched_tokens=8, pooling_tasks=EMBED_TASKS)
    request = make_pooling_request("long", num_tokens=20)
    h.add(request)
    steps = h.run()
    assert steps >= 3  # 8 + 8 + 4 tokens, then the finish notice
    assert pooled_sum(h, "long") == float(sum(request.prompt_token_ids))


def test_pooling_request_never_takes_prefix_cache_hits() -> None:
    h = Harness(block_size=4, pooling_tasks=EMBED_TASKS)
    first = make_pooling_request("first", num_tokens=12)
    h.add(first)
    h.run()
    again = make_pooling_request("again", prompt_token_ids=first.prompt_token_ids)
    h.add(again)
    step, _ = h.step()
    (new,) = step.new_requests
    assert new.num_computed_tokens == 0 and step.num_scheduled_tokens == {"again": 12}
    assert h.outputs["again"][0].num_cached_tokens == 0


def test_wrong_runner_or_task_is_refused_with_a_message() -> None:
    pooling = Harness(pooling_tasks=EMBED_TASKS)
    (rejected,) = pooling.add(make_request("gen"))
    assert rejected.finish_reason == "error" and "--runner pooling" in str(rejected.stop_reason)
    (rejected,) = pooling.add(make_pooling_request("cls", task="classify"))
    assert "classify" in str(rejected.stop_reason) and "embed" in str(rejected.stop_reason)
    generating = Harness()
    (rejected,) = generating.add(make_pooling_request("emb"))
    assert "--runner generate" in str(rejected.stop_reason)
    assert not pooling.scheduler.has_unfinished_requests() and not generating.scheduler.has_unfinished_requests()


def test_missing_pooled_result_fails_only_that_request() -> None:
    h = Harness(block_size=4, pooling_tasks=EMBED_TASKS)
    h.add(make_pooling_request("ok", num_tokens=6), make_pooling_request("bad", num_tokens=6))
    step = h.scheduler.schedule()
    runner_output = h.runner.execute(step)
    assert runner_output.pooling_outputs is not None
    index = runner_output.request_ids.index("bad")
    outputs = list(runner_output.pooling_outputs)
    outputs[index] = None
    broken = ModelRunnerOutput(runner_output.request_ids, runner_output.sampled_token_ids, runner_output.logprobs,
                               pooling_outputs=outputs, request_errors={"bad": "the pooler failed"})
    (by_client,) = h.scheduler.update_from_output(step, broken).values()
    finished = {output.request_id: output for output in by_client}
    assert finished["ok"].finish_reason == "stop" and finished["ok"].pooling_output is not None
    assert finished["bad"].finish_reason == "error" and finished["bad"].stop_reason == "the pooler failed"
    h.scheduler.check_integrity()
    assert not h.scheduler.has_unfinished_requests()
