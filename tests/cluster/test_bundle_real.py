"""charts/bundle/kompressor.yaml on the real control plane: `kubectl apply -f` as a user without Helm
does it, then `kubectl apply --server-side` as Argo CD does it (over the client-side apply, then again:
nothing left to change). The operator it deploys reconciles a model under the bundle's RBAC."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from test_operator_real import Kube, digits_model, wait

REPO = Path(__file__).resolve().parents[2]
BUNDLE = REPO / "charts" / "bundle" / "kompressor.yaml"
NAMESPACE = "kompressor"

pytestmark = [pytest.mark.slow, pytest.mark.cluster]


def _without_crds() -> str:
    docs = [d for d in yaml.safe_load_all(BUNDLE.read_text()) if d and d["kind"] != "CustomResourceDefinition"]
    return yaml.safe_dump_all(docs)


@pytest.fixture()
def kube(cluster, api_client):
    assert cluster.kubectl("get", "namespace", NAMESPACE, check=False).returncode != 0, \
        "the bundle's namespace must be fresh"
    yield Kube(api_client, cluster, NAMESPACE)
    # Everything but the CRDs (other tests' models use them); the namespace goes too: wait for it.
    for obj in Kube(api_client, cluster, NAMESPACE).custom.list_namespaced_custom_object(
            "kompressor.io", "v1alpha1", NAMESPACE, "compressedmodels")["items"]:
        Kube(api_client, cluster, NAMESPACE).delete(obj["metadata"]["name"])
    cluster.kubectl("delete", "--ignore-not-found", "--wait=true", "--timeout=180s", "-f", "-", input=_without_crds(),
                    check=False, timeout=240)
    cluster.kubectl("wait", "--for=delete", f"namespace/{NAMESPACE}", "--timeout=180s", check=False, timeout=240)


def test_the_bundle_applies_client_side_then_server_side(kube, cluster):
    cluster.kubectl("apply", "-f", str(BUNDLE))
    cluster.kubectl("rollout", "status", "deployment/kompressor", "-n", NAMESPACE, "--timeout=240s", timeout=300)
    kube.create(digits_model("bundled"))
    wait(lambda: any("prune" in j.metadata.name for j in kube.jobs("bundled")), 120,
         "the bundled operator to create the model's prune Job", lambda: kube.diagnostics("bundled"))

    # Argo CD's ServerSideApply=true: server-side apply over objects kubectl applied client-side.
    first = cluster.kubectl("apply", "--server-side", "--force-conflicts", "--field-manager=argocd-controller",
                            "-f", str(BUNDLE))
    assert "serverside-applied" in first.stdout, first.stdout
    again = cluster.kubectl("apply", "--server-side", "--field-manager=argocd-controller", "-f", str(BUNDLE))
    assert again.returncode == 0
    diff = cluster.kubectl("diff", "--server-side", "--field-manager=argocd-controller", "-f", str(BUNDLE),
                           check=False)
    assert diff.returncode == 0, f"a server-side re-apply would still change:\n{diff.stdout[-3000:]}"
    kube.delete("bundled")
    wait(lambda: kube.gone("bundled"), 120, "the model and its Jobs to be gone", kube.diagnostics)
