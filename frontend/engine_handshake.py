"""Before serving, a frontend asks the engine core for `EngineInfo`: the model, its tokenizer files and the
address of every data-parallel engine. So `conveyor frontend --engine-address tcp://HOST:PORT` needs nothing else.

Blocking (plain ZeroMQ, before uvicorn starts). Data-parallel ranks register with rank 0 as they come up; the
frontend waits until every rank is known, logging what it still waits for.
"""
from __future__ import annotations

import hashlib
import logging
import os
import random
import time
from pathlib import Path

import zmq

from engine_core.config import ModelConfig
from engine_core.model_info import pooler_config
from engine_core.protocol import (ClientHello, EngineInfo, ModelInfo, engine_outputs_decoder,
                                  frontend_message_encoder)

logger = logging.getLogger("conveyor.frontend")

_HELLO_INTERVAL_S = 1.0
_PROGRESS_LOG_INTERVAL_S = 10.0


class EngineNotReachableError(RuntimeError):
    pass


def random_client_index() -> int:
    """A routing id for a frontend started on its own; launcher-started frontends use 0..N-1 instead."""
    return random.SystemRandom().randrange(1 << 20, 1 << 31)


def fetch_engine_info(engine_address: str, client_index: int, timeout_s: float = 600.0) -> EngineInfo:
    """Ask the engine at `engine_address` (data-parallel rank 0) until it answers with every rank's address."""
    context = zmq.Context()
    socket = context.socket(zmq.DEALER)
    socket.setsockopt(zmq.ROUTING_ID, client_index.to_bytes(4, "little"))
    socket.setsockopt(zmq.LINGER, 0)
    socket.connect(engine_address)
    started = last_log = time.monotonic()
    try:
        while True:
            socket.send(frontend_message_encoder.encode(ClientHello(client_index, want_engine_info=True)))
            info = _await_info(socket, _HELLO_INTERVAL_S)
            if info is not None and all(info.engine_addresses):
                # Rank 0 may listen on 0.0.0.0: the address that reached it is the one to use.
                info.engine_addresses[0] = engine_address
                return info
            now = time.monotonic()
            if now - started > timeout_s:
                raise EngineNotReachableError(_waiting_for(engine_address, info, now - started))
            if now - last_log > _PROGRESS_LOG_INTERVAL_S:
                last_log = now
                logger.info("%s", _waiting_for(engine_address, info, now - started))
    finally:
        socket.close()
        context.term()


def _await_info(socket: zmq.Socket[bytes], timeout_s: float) -> EngineInfo | None:
    deadline = time.monotonic() + timeout_s
    while (remaining_ms := int((deadline - time.monotonic()) * 1000)) > 0:
        if not socket.poll(remaining_ms):
            return None
        outputs = engine_outputs_decoder.decode(socket.recv())
        if outputs.engine_info is not None:
            return outputs.engine_info
    return None  # only heartbeats came


def _waiting_for(address: str, info: EngineInfo | None, waited_s: float) -> str:
    if info is None:
        return f"no answer from the engine core at {address} after {waited_s:.0f} s"
    missing = [str(rank) for rank, address in enumerate(info.engine_addresses) if not address]
    return f"waiting for data-parallel engine(s) {', '.join(missing)} to register ({waited_s:.0f} s)"


def model_config_from_info(info: ModelInfo) -> ModelConfig:
    """Write the tokenizer files into a cache folder keyed by their content; describe the model from it."""
    digest = hashlib.sha256()
    for name, content in sorted(info.tokenizer_files.items()):
        digest.update(name.encode() + b"\0" + hashlib.sha256(content).digest())
    cache_root = Path(os.environ.get("CONVEYOR_CACHE", Path.home() / ".cache" / "conveyor"))
    folder = cache_root / "frontend-models" / digest.hexdigest()[:16]
    if not folder.is_dir():
        staging = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
        staging.mkdir(parents=True, exist_ok=True)
        for name, content in info.tokenizer_files.items():
            (staging / Path(name).name).write_bytes(content)
        try:
            staging.rename(folder)
        except OSError:  # another frontend on this host wrote the same folder first
            for leftover in staging.iterdir():
                leftover.unlink()
            staging.rmdir()
    return ModelConfig(model=info.model, served_model_name=info.served_model_name, tokenizer_dir=str(folder),
                       architecture=info.architecture, dtype=info.dtype, max_model_len=info.max_model_len,
                       seed=info.seed, eos_token_ids=tuple(info.eos_token_ids),
                       generation_config=str(folder) if info.use_generation_config else "vllm",
                       chat_template=info.chat_template, logits_processors=tuple(info.logits_processors),
                       runner=info.runner, convert=info.convert,
                       pooler=None if info.pooler is None else pooler_config(info.pooler),
                       score_template=info.score_template)
