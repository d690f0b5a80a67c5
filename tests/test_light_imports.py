"""The operator's import path never pulls in the heavy ML libraries."""

import subprocess
import sys

HEAVY = ("torch", "onnxruntime", "alibi_detect", "onnx", "sklearn")


def test_cli_and_api_import_no_ml_library():
    code = (
        "import sys, kompressor.cli, kompressor.api.crd, kompressor.core.actions, kompressor.core.observed;"
        f"print([m for m in {HEAVY!r} if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_help_lists_every_subcommand():
    out = subprocess.run([sys.executable, "-m", "kompressor.cli", "--help"], capture_output=True, text=True,
                         check=True).stdout
    for command in ("prune", "evaluate", "serve", "watch-drift", "operator", "run", "demo"):
        assert command in out
