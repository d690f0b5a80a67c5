"""Namespaced mode on the real control plane (kmock could not serve it): the chart installed with
``watchNamespace``, so the operator runs with ``--namespace`` and a Role in that namespace only. A model
there goes all the way to Serving under that RBAC; a model in another namespace is never touched."""

from __future__ import annotations

import pytest

from test_operator_real import Kube, digits_model, install, uninstall, wait

NAMESPACE, OTHER = "kompressor-ns", "elsewhere"

pytestmark = [pytest.mark.slow, pytest.mark.cluster]


@pytest.fixture(scope="module")
def kube(cluster, api_client, helm_ready):
    install(cluster, NAMESPACE, f"watchNamespace={NAMESPACE}")
    cluster.kubectl("create", "namespace", OTHER, check=False)
    kube = Kube(api_client, cluster, NAMESPACE)
    yield kube
    uninstall(cluster, kube, [NAMESPACE, OTHER])


def test_only_the_watched_namespace_is_reconciled(kube, cluster):
    deployment = kube.apps.read_namespaced_deployment("kompressor", NAMESPACE)
    args = deployment.spec.template.spec.containers[0].args
    assert f"--namespace={NAMESPACE}" in args and "--all-namespaces" not in args
    assert cluster.kubectl("get", "role", "kompressor", "-n", NAMESPACE, check=False).returncode == 0
    kube.create(digits_model("ignored"), namespace=OTHER)
    kube.create(digits_model("watched"))
    wait(lambda: kube.status("watched").get("phase") == "Serving", 420, "the watched model to be Serving",
         lambda: kube.diagnostics("watched"))
    assert kube.status("ignored", OTHER) == {}
    assert kube.jobs("ignored", OTHER) == []
    assert (kube.get("ignored", OTHER)["metadata"].get("finalizers") or []) == []
    logs = cluster.pod_logs(NAMESPACE, "kompressor-")
    assert "forbidden" not in logs.lower(), logs[-3000:]
