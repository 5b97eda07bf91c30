"""scripts/profile_step.py on the tiny Llama: every phase and layer kind is reported, and the JSON agrees with
the table (no timing is asserted)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.server_harness import REPO_ROOT


def test_profile_reports_every_phase(tiny_models: Path, tmp_path: Path) -> None:
    out = tmp_path / "profile.json"
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "profile_step.py"), str(tiny_models / "llama"),
         "--batch-sizes", "1", "3", "--prompt-len", "20", "--decode-steps", "3", "--warmup-steps", "1",
         "--threads", "1", "--result-json", str(out)],
        capture_output=True, text=True, timeout=600, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())["results"]
    assert [entry["batch_size"] for entry in report] == [1, 3]
    for entry in report:
        phases = entry["phases_ms"]
        assert phases["forward"] > 0 and phases["schedule"] > 0 and phases["sample"] > 0
        assert sum(phases.values()) >= entry["step_ms"] * 0.999  # "unaccounted" closes the sum
        assert entry["layer_by_layer_step_ms"] > 0  # the same steps without the one-call decode stack
        shares = entry["forward_shares"]
        assert {"attention (paged)", "linear: qkv", "rmsnorm"} <= set(shares)
        assert abs(sum(shares.values()) - 1.0) < 1e-6
    assert "| **step** |" in result.stdout and "| attention (paged) |" in result.stdout
    assert "| step, layer by layer (no decode stack) |" in result.stdout
