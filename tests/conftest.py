"""Shared fixtures: tiny checkpoints built once per run, and real servers shared by the tests that can."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from tests.server_harness import REPO_ROOT, ConveyorServer

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


TINY_MODELS_DIR = REPO_ROOT / ".models"  # git-ignored; the checkpoints are deterministic, so reuse is safe
TINY_MODEL_NAMES = ("llama", "qwen2", "bert-embed", "bert-classifier", "bert-cross-encoder", "llama-classifier",
                    "whisper", "llava", "qwen2_vl")


def pytest_sessionstart(session: pytest.Session) -> None:
    """Build the tiny checkpoints before collection: some test modules name their paths at import time."""
    if not all((TINY_MODELS_DIR / name / "model.safetensors").exists() for name in TINY_MODEL_NAMES):
        subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "make_tiny_models.py"),
                        "--out", str(TINY_MODELS_DIR)], check=True, cwd=REPO_ROOT)


@pytest.fixture(scope="session")
def tiny_models() -> Path:
    """The folder `scripts/make_tiny_models.py` wrote (one subfolder per TINY_MODEL_NAMES entry)."""
    return TINY_MODELS_DIR


@pytest.fixture(scope="session")
def llama_server(tiny_models: Path) -> Iterator[ConveyorServer]:
    """The tiny Llama behind one frontend; shared by the tests that do not need special flags."""
    server = ConveyorServer(str(tiny_models / "llama"), "--served-model-name", "tiny-llama",
                            "--max-model-len", "512", "--kv-cache-memory", "64MiB")
    yield server
    server.stop()
