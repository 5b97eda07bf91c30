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


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`scripts/make_tiny_models.py` output; CONVEYOR_TINY_MODELS reuses an existing folder (local runs)."""
    existing = os.environ.get("CONVEYOR_TINY_MODELS")
    if existing and (Path(existing) / "llama" / "config.json").exists():
        return Path(existing)
    out = tmp_path_factory.mktemp("tiny-models")
    subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "make_tiny_models.py"), "--out", str(out)],
                   check=True, cwd=REPO_ROOT)
    return out


@pytest.fixture(scope="session")
def llama_server(tiny_models: Path) -> Iterator[ConveyorServer]:
    """The tiny Llama behind one frontend; shared by the tests that do not need special flags."""
    server = ConveyorServer(str(tiny_models / "llama"), "--served-model-name", "tiny-llama",
                            "--max-model-len", "512", "--kv-cache-memory", "64MiB")
    yield server
    server.stop()
