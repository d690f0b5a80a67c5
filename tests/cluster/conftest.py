"""Real-server checks: the local control plane of e2e/cluster (etcd, kube-apiserver, controller-manager,
scheduler from the Kubernetes Go modules) with the process kubelet, started once per test process.

Without the build (e2e/cluster/build.sh) these tests are skipped with the reason, except under
KOMPRESSOR_REQUIRE_CLUSTER=1 (CI), where a missing build fails them."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "e2e" / "cluster"))

import local  # noqa: E402  (e2e/cluster/local.py)
from support.polling import wait  # noqa: E402


def _require(reason: str | None) -> None:
    if reason:
        if os.environ.get("KOMPRESSOR_REQUIRE_CLUSTER") == "1":
            pytest.fail(f"KOMPRESSOR_REQUIRE_CLUSTER=1 but {reason}")
        pytest.skip(reason)


@pytest.fixture(scope="session")
def cluster() -> "local.LocalCluster":
    _require(local.unavailable_reason(helm=False))
    return local.LocalCluster.shared()


@pytest.fixture(scope="session")
def helm_ready(cluster) -> None:
    """The real helm (e2e/cluster/build.sh builds it) for the tests that install the chart."""
    _require(local.unavailable_reason(helm=True))


@pytest.fixture(scope="session")
def api_client(cluster):
    """A kubernetes-package ApiClient with the admin credentials (not the process-wide default)."""
    from kubernetes import config

    return config.new_client_from_config(config_file=str(cluster.kubeconfig))


@pytest.fixture(scope="session")
def crd(cluster):
    """The committed CRD, applied as a user would."""
    cluster.kubectl("apply", "-f", str(REPO / "crds" / "compressedmodels.kompressor.io.yaml"))
    cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s",
                    "crd/compressedmodels.kompressor.io")
    # Established is not yet published: the apiserver adds the CRD to its OpenAPI document (what
    # `kubectl explain` reads) a moment later.
    wait(lambda: cluster.kubectl("explain", "compressedmodel", check=False).returncode == 0, 60,
         "the CRD to appear in the apiserver's OpenAPI document", interval=0.5)
    return REPO / "crds" / "compressedmodels.kompressor.io.yaml"
