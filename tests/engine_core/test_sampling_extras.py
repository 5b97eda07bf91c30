"""The engine core's part of the sampling extras: repetition detection in check_stop, prompt logprobs stitched
across prefill chunks onto the first output (no prefix-cache hits while pending), per-request worker errors."""
from __future__ import annotations

import pytest

from engine_core.protocol import ModelRunnerOutput, RepetitionDetection, SchedulerOutput, TokenLogprobs
from engine_core.request import find_repetition
from tests.engine_core.harness import FakeRunner, Harness, make_request, reference_output_ids


# --------------------------------------------------------------------------- repetition detection


def detection(min_len: int = 1, max_len: int = 20, repeats: int = 3) -> RepetitionDetection:
    return RepetitionDetection(min_pattern_len=min_len, max_pattern_len=max_len, min_repeats=repeats)


@pytest.mark.parametrize("tokens, spec, expected", [
    ([1, 2, 3, 7, 7, 7], detection(), (1, 3)),
    ([1, 7, 7], detection(), None),  # only twice
    ([9, 1, 2, 1, 2, 1, 2], detection(), (2, 3)),
    ([5, 1, 2, 3, 1, 2, 3, 1, 2, 3], detection(), (3, 3)),
    ([5, 1, 2, 3, 1, 2, 3, 1, 2, 3], detection(max_len=2), None),  # pattern longer than allowed
    ([7, 7, 7, 7, 7, 7], detection(min_len=2), (2, 3)),  # shortest allowed pattern, counted in full
    ([1, 2, 1, 2, 1, 2, 1, 2, 1, 2], detection(repeats=3), (2, 5)),
    ([1, 2, 3, 1, 2, 4, 1, 2, 3], detection(), None),
    ([], detection(), None),
])
def test_find_repetition(tokens: list[int], spec: RepetitionDetection, expected: tuple[int, int] | None) -> None:
    assert find_repetition(tokens, spec) == expected


def test_repetition_stops_with_a_reason_after_min_tokens() -> None:
    h = Harness()
    request = make_request("r", max_tokens=50, min_tokens=8,
                           repetition_detection=detection(min_len=1, max_len=4, repeats=3))
    h.add(request)
    h.runner.forced["r"] = [1500, 1600] * 20
    h.run()
    final = h.final("r")
    assert final.finish_reason == "stop"
    assert final.stop_reason == "repetition detected: pattern of 2 tokens repeated 4 times"
    assert h.token_ids("r") == [1500, 1600] * 4  # 6 tokens would do, but not before min_tokens = 8


def test_no_repetition_runs_to_length() -> None:
    h = Harness()
    h.add(make_request("r", max_tokens=6, repetition_detection=detection(repeats=3)))
    h.run()
    assert h.final("r").finish_reason == "length"


# --------------------------------------------------------------------------- prompt logprobs


def fake_entry(position: int, token_id: int) -> TokenLogprobs:
    """What FakeRunner "computes" for prompt token `position`: recognisable values."""
    return TokenLogprobs(logprob=-float(position), rank=token_id, top_token_ids=[position], top_logprobs=[-0.5])


class PromptLogprobsRunner(FakeRunner):
    """Also answers prompt logprobs for the prompt positions each step runs, as the real worker does."""

    def execute(self, step: SchedulerOutput) -> ModelRunnerOutput:
        starts = {new.request_id: new.num_computed_tokens for new in step.new_requests}
        starts.update({diff.request_id: diff.num_computed_tokens for diff in step.cached_requests})
        prompts = {new.request_id: new.token_ids[:new.num_prompt_tokens] for new in step.new_requests
                   if new.sampling_params.prompt_logprobs is not None and len(new.token_ids) == new.num_prompt_tokens}
        self.prompts.update(prompts)
        output = super().execute(step)
        entries: list[list[TokenLogprobs | None] | None] = []
        for request_id, num_tokens in step.num_scheduled_tokens.items():
            prompt = self.prompts.get(request_id)
            start = starts[request_id]
            if prompt is None or start >= len(prompt) - 1:
                entries.append(None)
                continue
            last = min(start + num_tokens, len(prompt) - 1)
            entries.append([fake_entry(p + 1, prompt[p + 1]) for p in range(start, last)])
            self.computed_positions.extend(range(start, last))
        return ModelRunnerOutput(output.request_ids, output.sampled_token_ids, output.logprobs,
                                 prompt_logprobs=entries)

    def __init__(self, num_blocks: int, block_size: int) -> None:
        super().__init__(num_blocks, block_size)
        self.prompts: dict[str, list[int]] = {}
        self.computed_positions: list[int] = []


def harness_with_prompt_logprobs(**kwargs: object) -> Harness:
    h = Harness(**kwargs)
    h.runner = PromptLogprobsRunner(h.scheduler.kv_cache.num_blocks, h.scheduler.kv_cache.block_size)
    return h


def test_prompt_logprobs_across_chunks_on_the_first_output_only() -> None:
    h = harness_with_prompt_logprobs(max_num_batched_tokens=5)
    request = make_request("p", num_tokens=13, max_tokens=3, prompt_logprobs=1)
    h.add(request)
    h.run()
    prompt = request.prompt_token_ids
    first, *rest = h.outputs["p"]
    assert first.prompt_logprobs == [None] + [fake_entry(i, prompt[i]) for i in range(1, 13)]
    assert all(output.prompt_logprobs is None for output in rest)
    assert h.token_ids("p") == reference_output_ids(prompt, 3)


def test_prompt_logprobs_requests_skip_the_prefix_cache() -> None:
    h = harness_with_prompt_logprobs(block_size=4)
    shared = list(range(100, 112))
    h.add(make_request("a", prompt_token_ids=shared + [1], max_tokens=1))
    h.run()
    h.add(make_request("b", prompt_token_ids=shared + [2], max_tokens=1, prompt_logprobs=0))
    step, _ = h.step()
    assert step.new_requests[0].num_computed_tokens == 0 and step.num_scheduled_tokens == {"b": 13}
    h.run()
    entries = h.outputs["b"][0].prompt_logprobs
    assert entries is not None and len(entries) == 13 and entries[0] is None and None not in entries[1:]
    assert h.outputs["b"][0].num_cached_tokens == 0
    h.add(make_request("c", prompt_token_ids=shared + [3], max_tokens=1))  # without: the cache serves it
    step, _ = h.step()
    assert step.new_requests[0].num_computed_tokens == 12


def test_prompt_logprobs_after_preemption_mid_prefill_are_recomputed() -> None:
    h = harness_with_prompt_logprobs(num_blocks=6, block_size=4, max_num_batched_tokens=5)
    a = make_request("a", num_tokens=4, max_tokens=16)  # grows to 5 blocks while "p" is still in prefill
    p = make_request("p", num_tokens=20, max_tokens=2, prompt_logprobs=0)
    h.add(a, p)
    h.step_until(lambda step: "p" in step.finished_request_ids)  # preempted (itself the tail) mid-prefill
    assert not h.outputs["p"]
    h.run()
    prompt = p.prompt_token_ids
    assert h.outputs["p"][0].prompt_logprobs == [None] + [fake_entry(i, prompt[i]) for i in range(1, 20)]
    assert h.runner.computed_positions.count(0) >= 2  # the restart computed its prompt (and logprobs) again
    assert h.token_ids("p") == reference_output_ids(prompt, 2)


# --------------------------------------------------------------------------- per-request worker errors


class FailingRunner(FakeRunner):
    def execute(self, step: SchedulerOutput) -> ModelRunnerOutput:
        output = super().execute(step)
        sampled = [[] if request_id == "bad" else tokens
                   for request_id, tokens in zip(output.request_ids, output.sampled_token_ids)]
        return ModelRunnerOutput(output.request_ids, sampled, output.logprobs,
                                 request_errors={"bad": "invalid vllm_xargs: nope"})


def test_request_errors_fail_only_their_request() -> None:
    h = Harness()
    h.runner = FailingRunner(h.scheduler.kv_cache.num_blocks, h.scheduler.kv_cache.block_size)
    good, bad = make_request("good", max_tokens=2), make_request("bad", max_tokens=2)
    h.add(good, bad)
    h.run()
    assert h.final("bad").finish_reason == "error" and h.final("bad").stop_reason == "invalid vllm_xargs: nope"
    assert h.token_ids("good") == reference_output_ids(good.prompt_token_ids, 2)
