"""How one frontend process stops: a graceful drain on SIGTERM, a quick exit when the engine process died.

```
 SIGTERM ─▶ refuse new requests (503, /health too) ─▶ in-flight requests finish ─┬─▶ uvicorn exits
            (the listener stays open meanwhile)         up to --shutdown-timeout  └─ still running: fail them
                                                                                     (503 / stream error event)
 SIGUSR1 (from the launcher: the engine core exited) ─▶ refuse new requests, fail in-flight ones now ─▶ exit
 a second SIGTERM ─▶ uvicorn exits at once
```
SIGINT is ignored: a terminal's Ctrl-C reaches every process of the group, and the launcher (which gets it too)
drains the frontends with SIGTERM; a frontend that also reacted would turn that into a second signal.
"""
from __future__ import annotations

import asyncio
import json
import logging
import signal
from typing import Any, Awaitable, Callable, MutableMapping, Protocol

from frontend.errors import error_body

logger = logging.getLogger("conveyor.frontend")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]], Awaitable[None]]

ABORT_GRACE_S = 3.0  # after failing the in-flight requests: time for their handlers to send the error and return


class DrainMiddleware:
    """Counts HTTP requests and WebSocket sessions in flight; once `refuse(reason)` was called, answers every new
    one with 503 (WebSocket: close code 1012, service restart) so load balancers and clients move elsewhere."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.refusal: str | None = None
        self.num_in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def refuse(self, reason: str) -> None:
        if self.refusal is None:
            self.refusal = reason

    async def wait_idle(self, timeout_s: float) -> bool:
        """True once nothing is in flight; False if something still is after `timeout_s`."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout=max(0.0, timeout_s))
            return True
        except asyncio.TimeoutError:
            return self.num_in_flight == 0

    async def __call__(self, scope: Scope, receive: Callable[[], Awaitable[Message]],
                       send: Callable[[Message], Awaitable[None]]) -> None:
        if scope["type"] not in ("http", "websocket"):  # lifespan
            await self.app(scope, receive, send)
            return
        if self.refusal is not None:
            await self._refuse(scope, send)
            return
        self.num_in_flight += 1
        self._idle.clear()
        try:
            await self.app(scope, receive, send)
        finally:
            self.num_in_flight -= 1
            if self.num_in_flight == 0:
                self._idle.set()

    async def _refuse(self, scope: Scope, send: Callable[[Message], Awaitable[None]]) -> None:
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1012, "reason": "server shutting down"})
            return
        body = json.dumps(error_body(503, f"the server is not accepting requests: {self.refusal}")).encode()
        await send({"type": "http.response.start", "status": 503,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


class ExitableServer(Protocol):
    """What the drain needs of uvicorn's Server."""

    should_exit: bool
    force_exit: bool


class Drainer:
    """Runs this process's way out (see the module docstring); signal handlers call `on_signal`."""

    def __init__(self, server: ExitableServer, middleware: DrainMiddleware, fail_in_flight: Callable[[str], None],
                 shutdown_timeout_s: float) -> None:
        self._server = server
        self._middleware = middleware
        self._fail_in_flight = fail_in_flight  # the engine client's declare_dead
        self._shutdown_timeout_s = shutdown_timeout_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = False
        self._task: asyncio.Task[None] | None = None  # held so the way out is not garbage-collected

    def install(self) -> dict[int, Any]:
        """Install the signal handlers (from inside the running loop); return the previous ones."""
        self._loop = asyncio.get_running_loop()
        previous: dict[int, Any] = {signal.SIGTERM: signal.signal(signal.SIGTERM, self.on_signal),
                    signal.SIGUSR1: signal.signal(signal.SIGUSR1, self.on_signal),
                    signal.SIGINT: signal.signal(signal.SIGINT, signal.SIG_IGN)}
        return previous

    def on_signal(self, signum: int, _frame: Any = None) -> None:
        """Signal handler (main thread, between bytecodes): state changes here, the waiting runs on the loop."""
        if self._stopping or self._loop is None:
            if signum == signal.SIGTERM:
                logger.warning("second stop signal: exiting at once")
                self._server.force_exit = self._server.should_exit = True
            return
        self._stopping = True
        if signum == signal.SIGUSR1:
            self._middleware.refuse("the engine is not available")
            way_out = self._engine_gone()
        else:
            self._middleware.refuse("the server is shutting down")
            logger.info("shutting down: %d request(s) in flight get up to %.0f s (--shutdown-timeout) to finish",
                        self._middleware.num_in_flight, self._shutdown_timeout_s)
            way_out = self._drain()
        self._loop.call_soon_threadsafe(self._start, way_out)

    def _start(self, way_out: Awaitable[None]) -> None:
        self._task = asyncio.ensure_future(way_out)

    async def _drain(self) -> None:
        if not await self._middleware.wait_idle(self._shutdown_timeout_s):
            logger.warning("%d request(s) still running after %.0f s: aborting them", self._middleware.num_in_flight,
                           self._shutdown_timeout_s)
            self._fail_in_flight(f"the server is shutting down (requests still running after --shutdown-timeout "
                                 f"{self._shutdown_timeout_s:g} s were aborted)")
            await self._middleware.wait_idle(ABORT_GRACE_S)
        self._server.should_exit = True

    async def _engine_gone(self) -> None:
        logger.error("the engine core process exited: failing %d request(s) in flight and exiting",
                     self._middleware.num_in_flight)
        self._fail_in_flight("the engine core process exited; the server is restarting")
        await self._middleware.wait_idle(ABORT_GRACE_S)
        self._server.should_exit = True
