"""Process entry point of a frontend: bind the shared port, run uvicorn (uvloop + httptools), exit cleanly.

Several frontends (`--api-server-count N`) bind the same host:port with SO_REUSEPORT; the kernel spreads new
connections across them. SIGTERM drains (frontend/drain.py): new requests answer 503, open ones finish for up to
--shutdown-timeout seconds, then the rest are aborted; SIGUSR1 (the launcher: the engine core exited) fails every
open request at once. Either way uvicorn then stops, the engine client closes and this returns.
"""
from __future__ import annotations

import contextlib
import logging
import signal
import socket
from typing import Any, Iterator

import uvicorn

from engine_core.config import FrontendConfig
from frontend.app import create_app
from frontend.drain import DrainMiddleware, Drainer
from frontend.engine_client import ZmqEngineClient
from frontend.engine_handshake import fetch_engine_info, model_config_from_info

logger = logging.getLogger("conveyor.frontend")

GRACEFUL_SHUTDOWN_S = 5  # uvicorn's own wait for connections, after the drain: a backstop only


def bind_socket(host: str, port: int) -> socket.socket:
    """A bound TCP socket with SO_REUSEADDR and SO_REUSEPORT (uvicorn calls listen on it)."""
    family = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if hasattr(socket, "SO_REUSEPORT"):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    if family == socket.AF_INET6:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


class _Server(uvicorn.Server):
    """uvicorn's server with our signal handling (a `Drainer`, when given) and without re-raising the captured
    signal after shutdown: we return normally instead."""

    drainer: Drainer | None = None

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        previous: dict[int, Any] = {}
        try:
            if self.drainer is not None:
                previous = self.drainer.install()
            else:
                for sig in (signal.SIGINT, signal.SIGTERM):
                    previous[sig] = signal.signal(sig, self.handle_exit)
        except ValueError:  # not the main thread (tests): no signal handling
            pass
        try:
            yield
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)


def make_server(app: Any, log_level: str, **options: Any) -> _Server:
    """`options`: more uvicorn.Config arguments (`uvicorn_options`: TLS, the access log)."""
    config = uvicorn.Config(app, loop="uvloop", http="httptools", lifespan="on", log_level=log_level,
                            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S, **{"access_log": False, **options})
    return _Server(config)


def uvicorn_options(frontend_config: FrontendConfig) -> dict[str, Any]:
    """The frontend flags uvicorn itself applies: --ssl-* and --disable-uvicorn-access-log."""
    return {"access_log": not frontend_config.disable_uvicorn_access_log,
            "ssl_keyfile": frontend_config.ssl_keyfile, "ssl_certfile": frontend_config.ssl_certfile,
            "ssl_ca_certs": frontend_config.ssl_ca_certs, "ssl_cert_reqs": frontend_config.ssl_cert_reqs}


def run_frontend(frontend_config: FrontendConfig, engine_address: str, client_index: int,
                 process_index: int = 0, reconnect: bool = False) -> None:
    """Ask the engine at `engine_address` what it serves, then serve the OpenAI API for it on
    frontend_config.host:port until SIGTERM (or SIGUSR1). With `reconnect` (`conveyor frontend`), a dead engine
    is waited for: an engine serving the same model at that address again is used again."""
    _become_child_process(f"conveyor-fe{process_index}")
    info = fetch_engine_info(engine_address, client_index)
    model_config = model_config_from_info(info.model)
    sock = bind_socket(frontend_config.host, frontend_config.port)
    engine = ZmqEngineClient(info.engine_addresses, client_index, reconnect_model=info.model if reconnect else None)
    app = DrainMiddleware(create_app(model_config, frontend_config, engine))
    server = make_server(app, frontend_config.uvicorn_log_level, **uvicorn_options(frontend_config))
    server.drainer = Drainer(server, app, engine.declare_dead, frontend_config.shutdown_timeout_s)
    logger.info("frontend %d serving %s on %s://%s:%d", process_index, model_config.served_model_name,
                "https" if frontend_config.ssl_certfile else "http", frontend_config.host, frontend_config.port)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    logger.info("frontend %d stopped", process_index)


def _become_child_process(name: str) -> None:
    """Shared process set-up (logging, process name, die with the parent) when the engine package offers it."""
    try:
        from engine_core.process_utils import become_child_process, configure_logging
    except ImportError:
        logging.basicConfig(level=logging.INFO)
        return
    become_child_process(name)
    configure_logging(name.replace("conveyor-", ""))
