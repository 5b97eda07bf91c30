"""Randomized runs: shared prefixes, tight KV memory, mid-run arrivals and aborts, every policy and switch.

The fake runner checks every step that the KV a request reuses still holds its tokens; the harness checks
integrity after every call; here every surviving request must produce exactly the reference tokens.
"""
from __future__ import annotations

import random

import pytest

from engine_core.protocol import EngineCoreRequest
from tests.engine_core.harness import Harness, make_request, random_prompt, reference_output_ids


def random_request(rng: random.Random, index: int, prefixes: list[list[int]]) -> EngineCoreRequest:
    prompt = rng.choice(prefixes)[: rng.randrange(0, 20)] + random_prompt(rng.randrange(1, 20), rng.random())
    max_tokens = rng.randrange(1, 24)
    stop_token_ids = []
    if rng.random() < 0.3:  # stop on one of its own future tokens
        stop_token_ids = [rng.choice(reference_output_ids(prompt, max_tokens))]
    return make_request(f"r{index}", prompt_token_ids=prompt, max_tokens=max_tokens, stop_token_ids=stop_token_ids,
                        priority=rng.randrange(3), cache_salt=rng.choice([None, None, "s"]),
                        client_index=rng.randrange(2))


def expected_tokens(req: EngineCoreRequest) -> list[int]:
    tokens = reference_output_ids(req.prompt_token_ids, req.sampling_params.max_tokens)
    for i, token in enumerate(tokens):
        if token in req.sampling_params.stop_token_ids:
            return tokens[: i + 1]
    return tokens


@pytest.mark.parametrize("seed", range(12))
def test_random_workload_matches_reference(seed: int) -> None:
    rng = random.Random(seed)
    h = Harness(num_blocks=rng.randrange(12, 40), block_size=rng.choice([1, 2, 4, 8]),
                max_num_batched_tokens=rng.choice([8, 16, 64]), max_num_seqs=rng.choice([2, 4, 16]),
                policy=rng.choice(["fcfs", "priority"]), enable_prefix_caching=rng.random() < 0.8,
                enable_chunked_prefill=rng.random() < 0.8)
    prefixes = [random_prompt(20, rng.random()) for _ in range(3)]
    requests: dict[str, EngineCoreRequest] = {}
    aborted: set[str] = set()
    rejected: set[str] = set()
    for index in range(40):
        req = random_request(rng, index, prefixes)
        requests[req.request_id] = req
        if h.add(req):
            rejected.add(req.request_id)
        for _ in range(rng.randrange(0, 3)):
            if h.scheduler.has_work_for_workers():
                h.step()
        if rng.random() < 0.1:
            victim = rng.choice(list(requests))
            if not h.finished(victim):
                aborted.add(victim)
            h.abort([victim])
    h.run()
    capacity = h.scheduler.max_len
    for request_id, req in requests.items():
        if request_id in aborted or request_id in rejected:
            continue
        want = expected_tokens(req)[: max(1, capacity - len(req.prompt_token_ids))]  # a full prompt still samples one
        assert h.token_ids(request_id) == want, request_id
        assert h.finished(request_id)
    assert h.scheduler.kv_cache.usage == 0.0
    stats = h.scheduler.make_stats()
    assert stats.num_running_reqs == stats.num_waiting_reqs == 0
