"""`.ci/run` reports pytest's verdict: no test collected (pytest's exit 5) is a failure, not a pass."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# A stand-in interpreter: `-m venv DIR` makes DIR/bin/python (this same stub), `-m pip ...` succeeds, and
# `-m pytest` exits with $FAKE_PYTEST_RC, so the script's own handling of pytest's exit code is what runs.
STUB = """#!/bin/sh
if [ "$1" = "-m" ] && [ "$2" = "venv" ]; then
  mkdir -p "$3/bin" && cp "$0" "$3/bin/python" && cp "$0" "$3/bin/checkov"; exit 0
fi
if [ "$1" = "-m" ] && [ "$2" = "pytest" ]; then exit "$FAKE_PYTEST_RC"; fi
exit 0
"""


@pytest.fixture
def ci(tmp_path):
    root = tmp_path / "repo"
    (root / ".ci").mkdir(parents=True)
    shutil.copy2(REPO / ".ci" / "run", root / ".ci" / "run")
    # the repository scripts .ci/run calls (e.g. the control plane build) succeed at once here
    for script in re.findall(r"^\s*([\w./-]+\.sh)\b", (REPO / ".ci" / "run").read_text(), re.MULTILINE):
        stub = root / script
        stub.parent.mkdir(parents=True, exist_ok=True)
        stub.write_text("#!/bin/sh\nexit 0\n")
        stub.chmod(0o755)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stub = bin_dir / "python3"
    stub.write_text(STUB)
    stub.chmod(stub.stat().st_mode | stat.S_IXUSR)

    def run(pytest_rc: int) -> subprocess.CompletedProcess:
        env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "FAKE_PYTEST_RC": str(pytest_rc)}
        return subprocess.run(["bash", str(root / ".ci" / "run")], cwd=root, env=env, capture_output=True, text=True,
                              timeout=60)

    return run


@pytest.mark.parametrize("pytest_rc", [0, 1, 5])
def test_ci_exits_with_pytests_code_and_no_tests_collected_fails(ci, pytest_rc):
    result = ci(pytest_rc)
    assert result.returncode == pytest_rc, result.stderr
    if pytest_rc == 5:
        assert "collected no tests" in result.stderr
