"""`kompressor run` is part of the light package: it runs jobs as subprocesses and imports no ML library."""

import subprocess
import sys

HEAVY = ("torch", "onnxruntime", "alibi_detect", "onnx", "sklearn", "numpy", "matplotlib")


def test_runner_imports_no_ml_library():
    code = (
        "import sys, kompressor.embedded.main, kompressor.embedded.runner, kompressor.embedded.report, "
        "kompressor.embedded.demo;"
        f"print([m for m in {HEAVY!r} if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
