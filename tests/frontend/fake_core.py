"""An in-process stand-in for the engine core: a ZeroMQ ROUTER in a thread that answers with canned tokens.

It speaks the real wire protocol (engine_core.protocol), sends heartbeats with stats to every client that said
hello, records requests and aborts, and can be told to die (engine_dead sentinel) or to go silent.
"""
from __future__ import annotations

import math
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import zmq

from engine_core.config import ModelConfig
from engine_core.model_info import describe_model
from engine_core.protocol import (AbortRequest, ClientHello, EngineCoreOutput, EngineCoreOutputs,
                                  EngineCoreRequest, EngineInfo, PoolingOutput, PoolingParams, SchedulerStats,
                                  TokenLogprobs, engine_outputs_encoder, frontend_message_decoder)


@dataclass
class _Active:
    request: EngineCoreRequest
    identity: bytes
    tokens: list[int]
    num_sent: int = 0
    next_time: float = 0.0
    finish_reason: str = "length"
    stop_reason: int | str | None = None


@dataclass
class FakeCore:
    """Answers each request with `script(request)` tokens (default: `canned_token_ids` cycled to max_tokens)."""

    canned_token_ids: list[int]
    token_interval_s: float = 0.001
    heartbeat_interval_s: float = 0.2
    tokens_per_output: int = 1
    script: Callable[[EngineCoreRequest], tuple[list[int], str, int | str | None]] | None = None
    error_message: str | None = None  # finish every request at once with reason "error"
    silent: bool = False  # stop heartbeats and outputs (inputs are still recorded)
    address: str = "tcp://127.0.0.1:0"  # a random port (inproc would need a shared zmq Context)
    model_config: ModelConfig | None = None  # answers a frontend's start-up handshake when set
    pooling_width: int = 8  # values per token of a pooling request's fake hidden state (see fake_pooled)
    # Speech requests (with audio): the tokens to answer; finish "stop" when they end with the request's eos.
    speech_token_ids: Callable[[EngineCoreRequest], list[int]] | None = None
    requests: list[EngineCoreRequest] = field(default_factory=list)
    aborted: list[str] = field(default_factory=list)
    hellos: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._die = threading.Event()
        self._stop = threading.Event()
        self._active: dict[str, _Active] = {}
        self._clients: set[bytes] = set()
        self.context = zmq.Context()
        if self.address.startswith("tcp://") and self.address.endswith(":0"):
            self.address = self.address[:-2]
            self._router = self.context.socket(zmq.ROUTER)
            port = self._router.bind_to_random_port(self.address)
            self.address = f"{self.address}:{port}"
        else:
            self._router = self.context.socket(zmq.ROUTER)
            self._router.bind(self.address)
        self._thread = threading.Thread(target=self._run, daemon=True, name="fake-core")
        self._thread.start()

    # ------------------------------------------------------------------ test controls

    def die(self) -> None:
        """Send the engine_dead sentinel to every client, then go quiet."""
        self._die.set()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._router.close(linger=0)
        self.context.term()

    def wait_for(self, predicate: Callable[[], bool], timeout_s: float = 5.0) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if predicate():
                return True
            time.sleep(0.01)
        return predicate()

    def stats(self) -> SchedulerStats:
        return SchedulerStats(num_running_reqs=len(self._active), num_waiting_reqs=1, kv_cache_usage=0.25,
                              num_kv_blocks=64, prefix_cache_queries=100, prefix_cache_hits=40, num_steps=7,
                              num_scheduled_reqs=9, max_reqs_in_step=3, num_preemptions=2)

    # ------------------------------------------------------------------ loop

    def _run(self) -> None:
        next_heartbeat = 0.0
        dead_sent = False
        while not self._stop.is_set():
            if self._router.poll(1):
                identity, payload = self._router.recv_multipart()
                self._handle(identity, frontend_message_decoder.decode(payload))
            if self._die.is_set():
                if not dead_sent:
                    for identity in self._clients:
                        self._send(identity, EngineCoreOutputs(engine_dead=True))
                    dead_sent = True
                continue
            if self.silent:
                continue
            now = time.monotonic()
            if now >= next_heartbeat:
                next_heartbeat = now + self.heartbeat_interval_s
                for identity in self._clients:
                    self._send(identity, EngineCoreOutputs(scheduler_stats=self.stats()))
            self._emit(now)

    def _handle(self, identity: bytes, message: object) -> None:
        if isinstance(message, ClientHello):
            if message.want_engine_info:
                if self.model_config is not None:
                    info = EngineInfo(model=describe_model(self.model_config), engine_addresses=[self.address])
                    self._send(identity, EngineCoreOutputs(engine_info=info))
                return
            self.hellos.append(message.client_index)
            self._clients.add(identity)
        elif isinstance(message, AbortRequest):
            self.aborted.extend(message.request_ids)
            for request_id in message.request_ids:
                self._active.pop(request_id, None)
        elif isinstance(message, EngineCoreRequest):
            self.requests.append(message)
            if self.error_message is not None:
                self._send(identity, EngineCoreOutputs(outputs=[EngineCoreOutput(
                    message.request_id, [], finish_reason="error", stop_reason=self.error_message)]))
                return
            if message.pooling_params is not None:
                rows = fake_pooled(message.prompt_token_ids, message.pooling_params, self.pooling_width)
                self._send(identity, EngineCoreOutputs(outputs=[EngineCoreOutput(
                    message.request_id, [], finish_reason="stop", pooling_output=_pooling_output(rows))]))
                return
            if message.audio is not None and self.speech_token_ids is not None:
                tokens = self.speech_token_ids(message)
                reason, stop_reason = ("stop" if tokens and tokens[-1] == message.eos_token_id else "length"), None
            elif self.script is not None:
                tokens, reason, stop_reason = self.script(message)
            else:
                max_tokens = message.sampling_params.max_tokens
                tokens = [self.canned_token_ids[i % len(self.canned_token_ids)] for i in range(max_tokens)]
                reason, stop_reason = "length", None
            self._active[message.request_id] = _Active(message, identity, tokens, finish_reason=reason,
                                                       stop_reason=stop_reason)

    def _emit(self, now: float) -> None:
        for request_id, active in list(self._active.items()):
            if now < active.next_time:
                continue
            active.next_time = now + self.token_interval_s
            start = active.num_sent
            new_tokens = active.tokens[start:start + self.tokens_per_output]
            active.num_sent += len(new_tokens)
            done = active.num_sent >= len(active.tokens)
            output = EngineCoreOutput(
                request_id, new_tokens, new_logprobs=self._logprobs(active.request, new_tokens),
                finish_reason=active.finish_reason if done else None,
                stop_reason=active.stop_reason if done else None,
                num_cached_tokens=len(active.request.prompt_token_ids) // 2 if start == 0 else 0)
            self._send(active.identity, EngineCoreOutputs(outputs=[output], scheduler_stats=self.stats()))
            if done:
                del self._active[request_id]

    @staticmethod
    def _logprobs(request: EngineCoreRequest, tokens: list[int]) -> list[TokenLogprobs] | None:
        num_top = request.sampling_params.logprobs
        if num_top is None:
            return None
        return [TokenLogprobs(logprob=-0.5, rank=1, top_token_ids=[token + k for k in range(num_top)],
                              top_logprobs=[-0.5 - k for k in range(num_top)]) for token in tokens]

    def _send(self, identity: bytes, outputs: EngineCoreOutputs) -> None:
        self._router.send_multipart([identity, engine_outputs_encoder.encode(outputs)])


def fake_hidden_states(token_ids: list[int], width: int) -> list[list[float]]:
    """A deterministic stand-in for a model's last hidden states: one row per token."""
    return [[((token * (column + 1)) % 11 - 5) / 5.0 for column in range(width)] for token in token_ids]


def _normalized(row: list[float]) -> list[float]:
    norm = math.sqrt(sum(value * value for value in row)) or 1.0
    return [value / norm for value in row]


def _softmax(row: list[float]) -> list[float]:
    top = max(row)
    exps = [math.exp(value - top) for value in row]
    return [value / sum(exps) for value in exps]


def fake_pooled(token_ids: list[int], params: PoolingParams, width: int) -> list[float] | list[list[float]]:
    """What the fake core answers a pooling request: mean pooling of `fake_hidden_states`, then per task:
    embed (first `dimensions` values, L2-normalized unless normalize=False), classify (3 classes) and score (1)
    (softmax / sigmoid unless use_activation=False); token_* tasks do the same per token."""
    rows = fake_hidden_states(token_ids, width)
    mean = [sum(column) / len(rows) for column in zip(*rows)]
    if params.task == "embed":
        mean = mean[:params.dimensions] if params.dimensions else mean
        return mean if params.normalize is False else _normalized(mean)
    if params.task == "token_embed":
        return [row if params.normalize is False else _normalized(row) for row in rows]
    if params.task == "score":
        logit = mean[0] + (sum(params.token_type_ids) / len(rows) if params.token_type_ids else 0.0)
        return [logit if params.use_activation is False else 1 / (1 + math.exp(-logit))]
    if params.task == "classify":
        return mean[:3] if params.use_activation is False else _softmax(mean[:3])
    return [row[:3] if params.use_activation is False else _softmax(row[:3]) for row in rows]  # token_classify


def _pooling_output(values: list[float] | list[list[float]]) -> PoolingOutput:
    if values and isinstance(values[0], list):
        flat = [float(value) for row in values for value in row]
        shape = [len(values), len(values[0])]
    else:
        flat = [float(value) for value in values]
        shape = [len(flat)]
    return PoolingOutput(shape=shape, data=struct.pack(f"<{len(flat)}f", *flat))
