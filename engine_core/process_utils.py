"""Small helpers every Conveyor process uses: orphan protection, fresh IPC addresses, logging set-up."""
from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import sys
import tempfile
import uuid

_PR_SET_PDEATHSIG = 1
_PR_SET_NAME = 15


def become_child_process(name: str) -> None:
    """Name this process (`ps`, /proc/PID/comm; at most 15 characters) and ask Linux to SIGTERM it when its
    parent dies, so a killed launcher leaves no orphans."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        libc.prctl(_PR_SET_NAME, ctypes.c_char_p(name.encode()[:15]))
    except OSError:
        pass


def new_ipc_address(name: str) -> str:
    """A fresh `ipc://` address in its own temporary folder (ZeroMQ ipc paths must be short)."""
    folder = tempfile.mkdtemp(prefix="conveyor-")
    return f"ipc://{os.path.join(folder, f'{name}-{uuid.uuid4().hex[:8]}')}"


def free_tcp_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def configure_logging(role: str) -> None:
    """One concise format for every process; the role tells which process wrote the line."""
    level = os.environ.get("CONVEYOR_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(level=level, stream=sys.stderr, force=True,
                        format=f"%(asctime)s {role} %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
