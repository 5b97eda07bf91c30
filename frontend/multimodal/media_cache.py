"""Processed media by content hash (bytes + processor settings): the same image or video in requests close
together is decoded and preprocessed once, and concurrent requests for it wait for the one run in flight.
Bounded by the bytes of the arrays it keeps, least recently used out first (vLLM's processor cache,
`--mm-processor-cache-gb`; 0 turns it off)."""
from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from frontend.multimodal.vision_model import ImageFeatures


class ProcessedMediaCache:
    def __init__(self, capacity_bytes: int) -> None:
        self.capacity_bytes = capacity_bytes
        self._entries: OrderedDict[str, ImageFeatures] = OrderedDict()
        self._in_flight: dict[str, asyncio.Future[ImageFeatures]] = {}
        self.used_bytes = 0
        self.queries = 0
        self.hits = 0

    async def get_or_compute(self, key: str, compute: Callable[[], Awaitable[ImageFeatures]]) -> ImageFeatures:
        """The features for `key`, computing them (once, however many callers ask at the same time) when absent.
        An error reaches every caller waiting on that computation and is not cached."""
        self.queries += 1
        if (features := self._entries.get(key)) is not None:
            self._entries.move_to_end(key)
            self.hits += 1
            return features
        if (pending := self._in_flight.get(key)) is not None:
            self.hits += 1
            return await asyncio.shield(pending)
        future: asyncio.Future[ImageFeatures] = asyncio.get_running_loop().create_future()
        self._in_flight[key] = future
        try:
            features = await compute()
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved here: nobody else may be waiting
            raise
        finally:
            del self._in_flight[key]
        future.set_result(features)
        self._keep(key, features)
        return features

    def _keep(self, key: str, features: ImageFeatures) -> None:
        size = int(features.pixel_values.nbytes)
        if size > self.capacity_bytes:
            return
        self._entries[key] = features
        self.used_bytes += size
        while self.used_bytes > self.capacity_bytes:
            _, dropped = self._entries.popitem(last=False)
            self.used_bytes -= int(dropped.pixel_values.nbytes)
