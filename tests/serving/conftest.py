import pytest

from serving_support import Server, make_artifact


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory):
    """Revision 1 and revision 2 of a small MLP (different weights), as real artifacts."""
    root = tmp_path_factory.mktemp("artifacts")
    return {1: make_artifact(root / "r1", seed=1, revision=1), 2: make_artifact(root / "r2", seed=2, revision=2)}


@pytest.fixture(scope="module")
def server(artifacts, tmp_path_factory):
    root = tmp_path_factory.mktemp("server")
    srv = Server(artifacts[1], "mlp", capture=root / "capture", log=root / "server.log")
    srv.capture = root / "capture"
    yield srv
    srv.stop()
