"""frontend/drain.py without processes: the 503 middleware, the in-flight count, the timeout, the second signal."""
from __future__ import annotations

import asyncio
import json
import signal
from typing import Any

from frontend.drain import DrainMiddleware, Drainer


class _SlowApp:
    """An ASGI app whose requests run until `release` is set."""

    def __init__(self) -> None:
        self.release = asyncio.Event()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


class _Server:
    should_exit = False
    force_exit = False


async def _request(app: DrainMiddleware) -> list[dict[str, Any]]:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    async def send(message: Any) -> None:
        sent.append(message)

    await app({"type": "http", "path": "/health"}, receive, send)
    return sent


def test_refused_requests_get_503_while_in_flight_ones_finish() -> None:
    async def run() -> None:
        inner = _SlowApp()
        app = DrainMiddleware(inner)
        in_flight = asyncio.ensure_future(_request(app))
        await asyncio.sleep(0.01)
        assert app.num_in_flight == 1
        app.refuse("the server is shutting down")
        refused = await _request(app)
        assert refused[0]["status"] == 503
        assert json.loads(refused[1]["body"])["error"]["code"] == 503
        assert not await app.wait_idle(0.05)
        inner.release.set()
        assert (await in_flight)[0]["status"] == 200
        assert await app.wait_idle(0.05) and app.num_in_flight == 0

    asyncio.run(run())


def test_drain_fails_what_outlives_the_timeout_then_exits() -> None:
    async def run() -> None:
        inner = _SlowApp()
        app = DrainMiddleware(inner)
        server = _Server()
        failed: list[str] = []

        def fail_in_flight(reason: str) -> None:
            failed.append(reason)
            inner.release.set()  # as the engine client's declare_dead ends every waiting request

        drainer = Drainer(server, app, fail_in_flight, shutdown_timeout_s=0.2)
        drainer._loop = asyncio.get_running_loop()  # what install() records; no real signal handlers in tests
        in_flight = asyncio.ensure_future(_request(app))
        await asyncio.sleep(0.01)
        drainer.on_signal(signal.SIGTERM)
        assert app.refusal is not None  # at once, in the handler
        await in_flight
        for _ in range(100):
            if server.should_exit:
                break
            await asyncio.sleep(0.01)
        assert server.should_exit and not server.force_exit
        assert len(failed) == 1 and "--shutdown-timeout" in failed[0]
        drainer.on_signal(signal.SIGTERM)  # a second signal: out at once
        assert server.force_exit

    asyncio.run(run())
