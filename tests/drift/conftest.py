import numpy as np
import pytest

from serving_support import Server, http, infer_body, make_artifact
from drift_support import ROWS_PER_REVISION, tabular_rows


@pytest.fixture(scope="session")
def traffic(tmp_path_factory):
    """Reference data, and traffic captured by a real `kompressor serve`: revision 1 got rows like the
    reference, then the server was hot-swapped to revision 2, which got shifted rows."""
    root = tmp_path_factory.mktemp("traffic")
    rng = np.random.default_rng(0)
    reference = root / "reference.npz"
    np.savez(reference, X=tabular_rows(rng, 400), y=np.zeros(400, np.int64))
    artifacts = {r: make_artifact(root / f"r{r}", seed=r, revision=r) for r in (1, 2)}
    server = Server(artifacts[1], "tab", capture=root / "capture", log=root / "server.log")
    try:
        for revision, shifted in ((1, False), (2, True)):
            if revision == 2:
                status, out = http("POST", f"{server.url}/v2/repository/models/tab/load",
                                   {"parameters": {"artifact": str(artifacts[2])}})
                assert status == 200, out
            rows = tabular_rows(rng, ROWS_PER_REVISION, shifted)
            for batch in np.split(rows, 10):
                status, out = http("POST", server.infer_url(), infer_body(batch))
                assert status == 200, out
        from serving_support import metric_value

        _wait(lambda: metric_value(server.metrics(), "kompressor_capture_rows_total", model="tab")
              == 2 * ROWS_PER_REVISION)
    finally:
        server.stop()
    return {"root": root, "capture": root / "capture", "reference": f"file://{reference}"}


def _wait(predicate, timeout: float = 30.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)
