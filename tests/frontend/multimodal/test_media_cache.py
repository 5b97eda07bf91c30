"""The frontend's processed-media cache: one computation for concurrent and repeated requests of the same item,
least recently used out first within its byte bound, and a failure reaching every waiter without being kept."""
from __future__ import annotations

import asyncio

import numpy as np
import pytest

from frontend.multimodal.media_cache import ProcessedMediaCache
from frontend.multimodal.vision_model import ImageFeatures


def _features(num_bytes: int) -> ImageFeatures:
    return ImageFeatures(np.zeros(num_bytes // 4, dtype=np.float32), 1, None)


def test_concurrent_and_repeated_requests_compute_once() -> None:
    cache = ProcessedMediaCache(capacity_bytes=1000)
    runs: list[str] = []

    async def compute(key: str) -> ImageFeatures:
        runs.append(key)
        await asyncio.sleep(0.01)
        return _features(100)

    async def scenario() -> list[ImageFeatures]:
        first = await asyncio.gather(*(cache.get_or_compute("a", lambda: compute("a")) for _ in range(5)))
        return [*first, await cache.get_or_compute("a", lambda: compute("a"))]

    results = asyncio.run(scenario())
    assert runs == ["a"] and all(result is results[0] for result in results)
    assert (cache.queries, cache.hits) == (6, 5)


def test_least_recently_used_items_leave_first_within_the_bound() -> None:
    cache = ProcessedMediaCache(capacity_bytes=250)
    runs: list[str] = []

    async def get(key: str) -> None:
        async def compute() -> ImageFeatures:
            runs.append(key)
            return _features(100)
        await cache.get_or_compute(key, compute)

    async def scenario() -> None:
        for key in ("a", "b", "a", "c", "a", "b"):  # c pushes out b (a was used more recently)
            await get(key)

    asyncio.run(scenario())
    assert runs == ["a", "b", "c", "b"] and cache.used_bytes <= 250


def test_a_failure_reaches_every_waiter_and_is_not_kept() -> None:
    cache = ProcessedMediaCache(capacity_bytes=1000)
    attempts = 0

    async def failing() -> ImageFeatures:
        nonlocal attempts
        attempts += 1
        await asyncio.sleep(0.01)
        raise ValueError("undecodable")

    async def scenario() -> list[object]:
        return list(await asyncio.gather(*(cache.get_or_compute("x", failing) for _ in range(3)),
                                         return_exceptions=True))

    assert all(isinstance(result, ValueError) for result in asyncio.run(scenario()))
    with pytest.raises(ValueError):
        asyncio.run(cache.get_or_compute("x", failing))
    assert attempts == 2
