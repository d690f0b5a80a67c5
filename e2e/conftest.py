import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # scenario.py, targets.py


@pytest.fixture(scope="session")
def e2e_env(tmp_path_factory) -> dict[str, str]:
    """Environment of everything the targets start: one model cache per session (the builtin model
    trains once), one thread per process on the shared CI cores, JSON logs."""
    cache = os.environ.get("KOMPRESSOR_CACHE") or str(tmp_path_factory.getbasetemp() / "kompressor-cache")
    return {**os.environ, "KOMPRESSOR_CACHE": cache, "OMP_NUM_THREADS": "1", "KOMPRESSOR_JSON_LOGS": "1"}


@pytest.fixture(scope="session")
def eval_rows():
    """Rows and labels of the builtin digits eval split: the traffic the scenario sends."""
    from kompressor_jobs.data import load_dataset

    data = load_dataset("builtin://digits?split=eval")
    return data.X.reshape(len(data.y), -1).tolist(), data.y.tolist()
