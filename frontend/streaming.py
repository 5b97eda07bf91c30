"""Async plumbing shared by the serving code: merging n choice streams, client-disconnect handling, SSE.

Cancellation is the abort mechanism: cancelling (or closing) a consumer propagates into
`EngineClient.generate()`, whose `finally` tells the engine to abort the request.
"""
from __future__ import annotations

import asyncio
import json
from contextlib import aclosing
from typing import Any, AsyncIterator, Awaitable, TypeVar

from starlette.requests import Request

T = TypeVar("T")


class ClientDisconnected(Exception):
    """The HTTP client went away before the response was ready."""


_DONE = object()


async def merge_async_iterators(iterators: list[AsyncIterator[T]]) -> AsyncIterator[tuple[int, T]]:
    """Yield `(index, item)` from all iterators as items arrive; stopping early cancels every producer."""
    if len(iterators) == 1:
        async with aclosing(iterators[0]) as only:  # type: ignore[type-var]
            async for item in only:
                yield 0, item
        return
    queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()

    async def pump(index: int, iterator: AsyncIterator[T]) -> None:
        try:
            async with aclosing(iterator):  # type: ignore[type-var]
                async for item in iterator:
                    queue.put_nowait((index, item))
            queue.put_nowait((index, _DONE))
        except Exception as exc:
            queue.put_nowait((index, exc))

    tasks = [asyncio.create_task(pump(index, iterator)) for index, iterator in enumerate(iterators)]
    try:
        remaining = len(tasks)
        while remaining:
            index, item = await queue.get()
            if item is _DONE:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()  # no await: this may itself run under cancellation


async def wait_for_disconnect(request: Request) -> None:
    """Return once the client has disconnected (the request body must already have been read)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Run `work`; if the client disconnects first, cancel it (aborting its engine requests) and raise."""
    work_task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(wait_for_disconnect(request))
    try:
        done, _ = await asyncio.wait({work_task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not work_task.done() and not watcher.done():  # we were cancelled ourselves
            work_task.cancel()
        watcher.cancel()
    if work_task in done:
        return work_task.result()
    work_task.cancel()
    await asyncio.gather(work_task, return_exceptions=True)
    raise ClientDisconnected()


def sse_event(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


SSE_DONE = "data: [DONE]\n\n"
