"""frontend/ type-checks under `mypy --strict` (skipped where mypy is not installed)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_frontend_is_strictly_typed() -> None:
    pytest.importorskip("mypy")
    cache_dir = REPO_ROOT / ".pytest_cache" / "mypy"  # inside an already ignored folder
    result = subprocess.run([sys.executable, "-m", "mypy", "--strict", "--no-error-summary",
                             "--cache-dir", str(cache_dir), "frontend"],
                            cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
