"""The scheduler's encoder budget and cache (`engine_core.encoder_cache`): a chunk stops before a media item the
step cannot encode, an item shared by requests is encoded once, unused entries are freed (and the workers told)
only when their space is needed, and an item larger than the budget or the cache still runs, alone. Outputs stay
those of the fake model whatever the cuts."""
from __future__ import annotations

from engine_core.config import CacheConfig, SchedulerConfig
from engine_core.protocol import EngineCoreRequest, MultiModalItem
from engine_core.scheduler import Scheduler
from tests.engine_core.harness import Harness, make_request, reference_output_ids


def _scheduler(encoder_budget: int, cache_size: int, max_num_batched_tokens: int = 64) -> Scheduler:
    config = SchedulerConfig(max_num_batched_tokens=max_num_batched_tokens, max_model_len=256,
                             max_num_encoder_input_tokens=encoder_budget, encoder_cache_size=cache_size)
    return Scheduler(config, CacheConfig(block_size=4, enable_prefix_caching=False), num_blocks=128)


def _with_items(request_id: str, num_tokens: int, items: list[tuple[int, int, str]]) -> EngineCoreRequest:
    """A request whose prompt holds media items (offset, length, content hash)."""
    request = make_request(request_id, num_tokens, max_tokens=3)
    mm_items = [MultiModalItem("image", b"", [0], "float32", offset, length, content_hash)
                for offset, length, content_hash in items]
    return EngineCoreRequest(request.request_id, request.prompt_token_ids, request.sampling_params,
                             request.eos_token_id, request.arrival_time, mm_items=mm_items)


def _check_outputs(harness: Harness, requests: list[EngineCoreRequest]) -> None:
    harness.run()
    for request in requests:
        assert harness.token_ids(request.request_id) == reference_output_ids(request.prompt_token_ids, 3)


def test_a_chunk_stops_before_an_item_the_step_cannot_encode() -> None:
    harness = Harness(_scheduler(encoder_budget=16, cache_size=64))
    requests = [_with_items("a", 24, [(4, 12, "x")]), _with_items("b", 24, [(4, 12, "y")])]
    harness.add(*requests)
    step, _ = harness.step()
    assert step.num_scheduled_tokens == {"a": 24, "b": 4}  # b's image waits: 12 + 12 > 16 encoder tokens
    step, _ = harness.step()
    assert step.num_scheduled_tokens["b"] == 20
    assert harness.scheduler.encoder_cache.num_items_needed == 2
    _check_outputs(harness, requests)


def test_an_item_shared_by_requests_is_encoded_once() -> None:
    harness = Harness(_scheduler(encoder_budget=16, cache_size=64))
    requests = [_with_items(name, 20, [(2, 12, "same")]) for name in ("a", "b", "c")]
    harness.add(*requests)
    step, _ = harness.step()
    assert step.num_scheduled_tokens == {"a": 20, "b": 20, "c": 20}
    cache = harness.scheduler.encoder_cache
    assert (cache.num_items_needed, cache.num_items_reused) == (1, 2)
    _check_outputs(harness, requests)


def test_unused_entries_stay_until_their_space_is_needed_then_the_workers_are_told() -> None:
    harness = Harness(_scheduler(encoder_budget=16, cache_size=16))
    first = _with_items("a", 20, [(2, 12, "x")])
    harness.add(first)
    _check_outputs(harness, [first])
    again = _with_items("b", 20, [(2, 12, "x")])  # same image later: still held, not encoded again
    harness.add(again)
    _check_outputs(harness, [again])
    assert harness.scheduler.encoder_cache.num_items_needed == 1
    other = _with_items("c", 20, [(2, 12, "y")])  # no room beside x: x goes
    harness.add(other)
    step, _ = harness.step()
    assert step.free_encoder_hashes == ["x"] and step.num_scheduled_tokens == {"c": 20}
    _check_outputs(harness, [other])


def test_an_item_larger_than_the_budget_and_the_cache_runs_alone() -> None:
    harness = Harness(_scheduler(encoder_budget=8, cache_size=8, max_num_batched_tokens=64))
    requests = [_with_items("big", 50, [(4, 40, "big")]), _with_items("small", 10, [(2, 4, "small")])]
    harness.add(*requests)
    step, _ = harness.step()
    assert step.num_scheduled_tokens == {"big": 50, "small": 2}  # nothing else is encoded beside the big one
    _check_outputs(harness, requests)
    assert harness.scheduler.encoder_cache.num_items_needed == 2
