"""What update_from_output reports: stop conditions, logprobs, rejected requests and failed steps."""
from __future__ import annotations

from tests.engine_core.harness import EOS, Harness, make_request, reference_output_ids


def run_forced(h: Harness, request_id: str, forced: list[int]) -> list[int]:
    h.runner.forced[request_id] = list(forced)
    h.run()
    return h.token_ids(request_id)


def test_eos_stops_and_is_included() -> None:
    h = Harness()
    h.add(make_request("a", max_tokens=10))
    assert run_forced(h, "a", [1001, EOS, 1002]) == [1001, EOS]
    final = h.final("a")
    assert (final.finish_reason, final.stop_reason) == ("stop", None)
    assert h.scheduler.kv_cache.usage == 0.0


def test_ignore_eos_keeps_going() -> None:
    h = Harness()
    h.add(make_request("a", max_tokens=3, ignore_eos=True))
    assert run_forced(h, "a", [EOS, EOS, EOS]) == [EOS, EOS, EOS]
    assert h.final("a").finish_reason == "length"


def test_no_eos_token_means_no_eos_stop() -> None:
    h = Harness()
    h.add(make_request("a", max_tokens=2, eos_token_id=None))
    assert run_forced(h, "a", [EOS, EOS]) == [EOS, EOS]
    assert h.final("a").finish_reason == "length"


def test_stop_token_ids_report_the_token() -> None:
    h = Harness()
    h.add(make_request("a", max_tokens=10, stop_token_ids=[1500, 1501]))
    assert run_forced(h, "a", [1001, 1501, 1500]) == [1001, 1501]
    final = h.final("a")
    assert (final.finish_reason, final.stop_reason) == ("stop", 1501)


def test_min_tokens_suppresses_eos_and_stop_tokens() -> None:
    h = Harness()
    h.add(make_request("a", max_tokens=10, min_tokens=3, stop_token_ids=[1500]))
    assert run_forced(h, "a", [EOS, 1500, EOS, 1001]) == [EOS, 1500, EOS]
    assert h.final("a").finish_reason == "stop"


def test_max_tokens_gives_length() -> None:
    h = Harness()
    req = make_request("a", max_tokens=4)
    h.add(req)
    h.run()
    assert h.token_ids("a") == reference_output_ids(req.prompt_token_ids, 4)
    final = h.final("a")
    assert (final.finish_reason, final.stop_reason) == ("length", None)
    assert [len(o.new_token_ids) for o in h.outputs["a"]] == [1, 1, 1, 1]  # one output per step


def test_eos_on_the_last_allowed_token_is_a_stop() -> None:
    h = Harness()
    h.add(make_request("a", max_tokens=2))
    run_forced(h, "a", [1001, EOS])
    assert h.final("a").finish_reason == "stop"


def test_max_model_len_gives_length() -> None:
    h = Harness(max_model_len=12)
    h.add(make_request("a", num_tokens=9, max_tokens=100))
    h.run()
    assert len(h.token_ids("a")) == 3 and h.final("a").finish_reason == "length"


def test_prompt_of_exactly_max_model_len_yields_one_token() -> None:
    h = Harness(max_model_len=12)
    h.add(make_request("a", num_tokens=12, max_tokens=100))
    h.run()
    assert len(h.token_ids("a")) == 1 and h.final("a").finish_reason == "length"


def test_growth_is_capped_by_the_kv_cache_size() -> None:
    h = Harness(num_blocks=4, block_size=4, max_model_len=1000)
    h.add(make_request("a", num_tokens=10, max_tokens=100))
    h.run()
    assert len(h.token_ids("a")) == 6 and h.final("a").finish_reason == "length"  # 16 tokens fill 4 blocks


def test_unservable_requests_are_rejected_at_once() -> None:
    h = Harness(num_blocks=4, block_size=4, max_model_len=12)
    h.add(make_request("ok", num_tokens=4))
    rejected = h.add(make_request("too-long", num_tokens=13), make_request("empty", prompt_token_ids=[]),
                     make_request("ok", num_tokens=3))
    assert [(o.request_id, o.finish_reason) for o in rejected] == [
        ("too-long", "error"), ("empty", "error"), ("ok", "error")]
    assert "maximum context length" in str(rejected[0].stop_reason)
    assert "already in use" in str(rejected[2].stop_reason)
    assert list(h.scheduler.requests) == ["ok"]

    small_cache = Harness(num_blocks=2, block_size=4, max_model_len=100)
    (out,) = small_cache.add(make_request("big", num_tokens=9))
    assert out.finish_reason == "error" and "KV cache" in str(out.stop_reason)
    assert not small_cache.scheduler.has_work_for_workers()


def test_failed_step_errors_its_requests_and_the_engine_goes_on() -> None:
    h = Harness()
    h.add(make_request("a", max_tokens=5, client_index=1), make_request("b", max_tokens=5))
    h.step()
    h.add(make_request("c", max_tokens=5))
    h.runner.fail_next = "CUDA out of memory"
    step, by_client = h.step()
    assert set(step.num_scheduled_tokens) == {"a", "b", "c"}
    errors = {o.request_id: (o.finish_reason, o.stop_reason) for outs in by_client.values() for o in outs}
    assert errors == {r: ("error", "CUDA out of memory") for r in "abc"}
    assert [o.request_id for o in by_client[1]] == ["a"]
    assert h.scheduler.kv_cache.usage == 0.0 and not h.scheduler.has_unfinished_requests()
    after = make_request("after", max_tokens=2)
    h.add(after)
    step, _ = h.step()
    assert sorted(step.finished_request_ids) == ["a", "b", "c"]
    h.run()
    assert h.token_ids("after") == reference_output_ids(after.prompt_token_ids, 2)


def test_logprobs_pass_through() -> None:
    h = Harness()
    h.runner.with_logprobs = True
    h.add(make_request("a", max_tokens=2, logprobs=0))
    h.run()
    assert all(o.new_logprobs is not None and len(o.new_logprobs) == 1 for o in h.outputs["a"])


def test_multi_token_samples_are_cut_at_the_stop() -> None:
    from engine_core.protocol import ModelRunnerOutput, TokenLogprobs

    h = Harness()
    h.add(make_request("a", max_tokens=10, stop_token_ids=[1500]))
    step = h.scheduler.schedule()
    lp = [TokenLogprobs(logprob=-float(i), rank=1) for i in range(3)]
    out = h.scheduler.update_from_output(step, ModelRunnerOutput(["a"], [[1001, 1500, 1002]], [lp]))
    h.scheduler.check_integrity()
    (only,) = out[0]
    assert only.new_token_ids == [1001, 1500] and only.new_logprobs == lp[:2]
    assert (only.finish_reason, only.stop_reason) == ("stop", 1500)


def test_a_missing_sample_fails_only_that_request() -> None:
    from engine_core.protocol import ModelRunnerOutput

    h = Harness()
    h.add(make_request("a", max_tokens=3), make_request("b", max_tokens=3))
    step = h.scheduler.schedule()
    out = h.scheduler.update_from_output(step, ModelRunnerOutput(["a", "b"], [[1001], []], [None, None]))
    h.scheduler.check_integrity()
    assert [(o.request_id, o.finish_reason) for o in out[0]] == [("a", None), ("b", "error")]
    assert list(h.scheduler.requests) == ["a"]
