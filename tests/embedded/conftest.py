import os

import pytest


@pytest.fixture(scope="session")
def job_env(tmp_path_factory) -> dict[str, str]:
    """Environment of the runner and its jobs: one model cache for the whole session (the builtin model
    trains once), one thread per process (2 shared cores), JSON logs."""
    cache = os.environ.get("KOMPRESSOR_CACHE") or str(tmp_path_factory.getbasetemp() / "kompressor-cache")
    return {**os.environ, "KOMPRESSOR_CACHE": cache, "OMP_NUM_THREADS": "1", "KOMPRESSOR_JSON_LOGS": "1"}
