"""Every script in scripts/ answers --help and -h with a usage text and exit status 0, quickly and without doing
anything: no server started, no folder made, no network. New scripts are covered by the glob."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.server_harness import REPO_ROOT

SCRIPTS_DIR = REPO_ROOT / "scripts"
SCRIPTS = sorted([*SCRIPTS_DIR.glob("*.py"), *SCRIPTS_DIR.glob("*.sh")])
# A fixed absolute working folder (e.g. /work/peers); ${TMPDIR:-/tmp} is fine.
FIXED_PATH = re.compile(r"(?<![\w.-])/(work|opt|root)(/|\b)")


def test_scripts_are_found() -> None:
    names = {script.name for script in SCRIPTS}
    assert {"bench_serving.py", "setup_peers.sh", "launch_disagg.sh"} <= names


@pytest.mark.parametrize("flag", ["--help", "-h"])
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda path: path.name)
def test_script_answers_help(script: Path, flag: str, tmp_path: Path) -> None:
    # Every folder a script would write to by default points into an empty sandbox, which must stay empty.
    sandbox = tmp_path / "sandbox"
    sandbox.mkdir()
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "TMPDIR": str(sandbox),
           "XDG_CACHE_HOME": str(sandbox / "cache"), "PEERS_DIR": str(sandbox / "peers"),
           "OUT_DIR": str(sandbox / "out"), "LOG_DIR": str(sandbox / "logs"), "LOG_FILE": str(sandbox / "log")}
    interpreter = sys.executable if script.suffix == ".py" else "bash"
    proc = subprocess.run([interpreter, str(script), flag], cwd=sandbox, env=env, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip(), f"{script.name} {flag} printed nothing on stdout"
    assert "usage" in proc.stdout.lower() or script.name in proc.stdout, proc.stdout
    assert list(sandbox.iterdir()) == [], f"{script.name} {flag} wrote {list(sandbox.iterdir())}"


@pytest.mark.parametrize("script", [*SCRIPTS, *SCRIPTS_DIR.glob("lib/*")], ids=lambda path: path.name)
def test_no_fixed_absolute_paths(script: Path) -> None:
    hits = [f"{number}: {line.strip()}" for number, line in enumerate(script.read_text().splitlines(), 1)
            if FIXED_PATH.search(line)]
    assert not hits, f"{script.name} uses a fixed absolute path (use the repository or $XDG_CACHE_HOME):\n" + \
        "\n".join(hits)
