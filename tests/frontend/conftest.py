"""Fixtures: a fake engine core and a real frontend (uvicorn on a free port, in a thread) in front of it."""
from __future__ import annotations

import itertools
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import openai
import pytest

from engine_core.config import FrontendConfig, ModelConfig
from frontend.app import create_app
from frontend.engine_client import ZmqEngineClient
from frontend.server import bind_socket, make_server
from frontend.tokenizer import TokenizerInfo
from tests.frontend.fake_core import FakeCore

MODELS_DIR = Path(__file__).resolve().parents[2] / ".models"
SERVED_NAME = "tiny-llama"
MAX_MODEL_LEN = 256
CANNED_TEXT = "Hello world! Ünïcödé 日本語 🙂 fin."


def model_dir(name: str) -> Path:
    path = MODELS_DIR / name
    if not (path / "tokenizer.json").is_file():
        pytest.fail(f"tiny model folder {path} is missing (tests/conftest.py builds it at session start)")
    return path


def model_config(name: str = "llama", **overrides: Any) -> ModelConfig:
    path = str(model_dir(name))
    values: dict[str, Any] = dict(model=path, served_model_name=SERVED_NAME, tokenizer_dir=path,
                                  architecture="LlamaForCausalLM", max_model_len=MAX_MODEL_LEN, eos_token_ids=(2,))
    values.update(overrides)
    return ModelConfig(**values)


def canned_token_ids() -> list[int]:
    return TokenizerInfo(str(model_dir("llama"))).encode(CANNED_TEXT, add_special_tokens=False)


class FrontendHarness:
    """create_app + uvicorn on 127.0.0.1:<free port> in a background thread."""

    _next_client_index = itertools.count(3)  # distinct ZeroMQ identities when several share one fake core

    def __init__(self, core: FakeCore, *, model: str = "llama", api_key: str | None = None,
                 heartbeat_timeout_s: float = 5.0, frontend_options: dict[str, Any] | None = None,
                 **model_overrides: Any) -> None:
        self.core = core
        self.config = model_config(model, **model_overrides)
        frontend_config = FrontendConfig(host="127.0.0.1", port=0, api_key=api_key, **(frontend_options or {}))
        self.engine_client = ZmqEngineClient(core.address, client_index=next(self._next_client_index),
                                             heartbeat_timeout_s=heartbeat_timeout_s)
        self.app = create_app(self.config, frontend_config, self.engine_client)
        self.sock = bind_socket("127.0.0.1", 0)
        self.base_url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = make_server(self.app, "warning")
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("frontend did not start")
            time.sleep(0.01)

    def openai(self, api_key: str = "unused", **kwargs: Any) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.base_url}/v1", api_key=api_key, max_retries=0, **kwargs)

    def http(self, **kwargs: Any) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, timeout=10, **kwargs)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


@pytest.fixture(scope="module")
def core() -> Iterator[FakeCore]:
    fake = FakeCore(canned_token_ids())
    yield fake
    fake.close()


@pytest.fixture(scope="module")
def frontend(core: FakeCore) -> Iterator[FrontendHarness]:
    harness = FrontendHarness(core)
    yield harness
    harness.stop()


@pytest.fixture()
def client(frontend: FrontendHarness) -> openai.OpenAI:
    return frontend.openai()


@pytest.fixture()
def http(frontend: FrontendHarness) -> Iterator[httpx.Client]:
    with frontend.http() as session:
        yield session
