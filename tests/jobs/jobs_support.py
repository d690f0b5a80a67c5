"""Helpers the job tests share (imported by the test modules; fixtures live in conftest.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np


def run_cli(*argv: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """The real command in a subprocess, for exit codes and messages as a user sees them."""
    return subprocess.run([sys.executable, "-m", "kompressor.cli", "--json-logs", *argv], capture_output=True,
                          text=True, env=env, timeout=300)


def onnx_weights(path: Path) -> list[np.ndarray]:
    """Weight tensors (rank >= 2 initializers) of an ONNX file, read independently of the job's code."""
    import onnx
    from onnx import numpy_helper

    return [numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer if len(i.dims) >= 2]


def ort_predict(path: Path, X: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: X[i:i + 1]})[0] for i in range(len(X))])
