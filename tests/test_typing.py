"""The whole tree type-checks under mypy (strict settings in pyproject.toml; skipped where mypy is missing)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_packages_are_strictly_typed() -> None:
    pytest.importorskip("mypy")
    cache_dir = REPO_ROOT / ".pytest_cache" / "mypy"  # inside an already ignored folder
    result = subprocess.run([sys.executable, "-m", "mypy", "--no-error-summary", "--cache-dir", str(cache_dir),
                             "frontend", "engine_core", "workers", "conveyor"],
                            cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
