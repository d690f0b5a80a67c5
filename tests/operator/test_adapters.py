"""The Kopf adapters' pure parts and contracts: light imports, RBAC derived from the code,
the objects built for RunJob/Serve, status patches. Fast: no cluster."""

import subprocess
import sys

from kompressor.api import defaults as d
from kompressor.api.manifest import parse_manifest
from kompressor.api.status import Artifact
from kompressor.core.actions import RunJob, Serve
from kompressor.k8s import children
from kompressor.k8s.access import DECLARED
from kompressor.k8s.patching import merge_patch
from kompressor.k8s.permissions import required_rules
from kompressor.k8s.storage import pod_store
from support.cluster import digits_model

HEAVY = ("torch", "onnxruntime", "alibi_detect", "onnx", "sklearn", "numpy")


def model(**spec):
    body = digits_model("digits", **spec)
    body["metadata"].update(uid="u-1", generation=3)
    return parse_manifest(body)


def test_operator_import_path_loads_no_ml_library():
    code = ("import sys, kompressor.k8s.main, kompressor.k8s.handlers, kompressor.k8s.controller, "
            "kompressor.k8s.permissions, kompressor.core.reconcile;"
            f"print([m for m in {HEAVY!r} if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_required_rules_cover_every_declared_access_and_kopf():
    rules = required_rules()

    def allowed(group, resource, verb):
        return any(group in r["apiGroups"] and resource in r["resources"] and verb in r["verbs"] for r in rules)

    assert DECLARED
    for access in DECLARED:
        assert allowed(access.resource.group, access.rule_resource, access.verb), access
    for group, resource, verb in [(d.GROUP, d.PLURAL, "watch"), (d.GROUP, "compressedmodels/status", "patch"),
                                  ("batch", "jobs", "watch"), ("", "events", "create"),
                                  ("apiextensions.k8s.io", "customresourcedefinitions", "list"),
                                  ("kopf.dev", "kopfpeerings", "patch")]:
        assert allowed(group, resource, verb), (group, resource, verb)
    bind = [r for r in rules if "bind" in r["verbs"]]
    assert bind == [{"apiGroups": ["rbac.authorization.k8s.io"], "resources": ["clusterroles"], "verbs": ["bind"],
                     "resourceNames": ["kompressor-drift-watcher"]}]
    assert not any("*" in r["verbs"] or "*" in r["resources"] for r in rules)
    assert not any("secrets" in r["resources"] for r in rules)


def test_operator_refuses_a_store_its_pods_cannot_mount():
    proc = subprocess.run([sys.executable, "-m", "kompressor.cli", "operator", "--standalone",
                           "--artifact-store", "s3://bucket/prefix", "--metrics-port", "0"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "pvc://" in proc.stderr and "s3://bucket/prefix" in proc.stderr


def test_prune_job_places_gpu_tolerations_and_node_selector():
    cm = model(jobs={"gpu": 2, "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists"}],
                     "nodeSelector": {"pool": "gpu"}, "resources": {"limits": {"memory": "4Gi"}}})
    store = pod_store("pvc://claim/prefix")
    action = RunJob("prune", "digits-r1-g3-prune", 1, 3, "default/digits/r1/candidate", "default/digits/r1/eval")
    job = children.job(cm, action, store)
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"]["limits"] == {"memory": "4Gi", "nvidia.com/gpu": 2}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists"}]
    assert pod["nodeSelector"] == {"pool": "gpu"}
    assert "/var/lib/kompressor/pvc/claim/prefix/default/digits/r1/candidate" in container["command"]
    assert job["metadata"]["labels"]["kompressor.io/generation"] == "3"
    evaluate = children.job(cm, RunJob("evaluate", "e", 1, 3, "c", "e"), store)
    assert "nvidia.com/gpu" not in evaluate["spec"]["template"]["spec"]["containers"][0]["resources"].get("limits", {})


def test_serving_and_watcher_deployments():
    cm = model(serving={"port": 9000, "replicas": 2}, drift={"enabled": True})
    store = pod_store("pvc://claim/prefix")
    serve = Serve(2, Artifact(uri="pvc://claim/prefix/default/digits/r2/candidate", sha256="a" * 64),
                  drift_reference="builtin://digits?split=eval")
    serving = children.serving_deployment(cm, serve, store)
    container = serving["spec"]["template"]["spec"]["containers"][0]
    assert serving["spec"]["replicas"] == 2
    assert serving["metadata"]["labels"][d.LABEL_REVISION] == "2"
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert container["command"][container["command"].index("--artifact") + 1] == \
        store.path("default/digits/r2/candidate")
    watcher = children.watcher_deployment(cm, serve, store)
    pod = watcher["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "kompressor-drift-watcher"
    command = pod["containers"][0]["command"]
    assert command[command.index("--verdict") + 1] == "k8s://default/digits"
    # serve captures where the watcher reads
    assert command[command.index("--capture") + 1] == container["command"][container["command"].index("--capture") + 1]
    # an unchanged desire has the same digest: the operator does not patch it again
    assert children.applied_hash(children.serving_deployment(cm, serve, store)) == children.applied_hash(serving)


def test_status_patch_removes_cleared_fields_and_is_empty_when_unchanged():
    old = {"phase": "Evaluating", "candidate": {"revision": 1}, "revisions": [{"revision": 0}]}
    new = {"phase": "Serving", "revisions": [{"revision": 0}, {"revision": 1}]}
    assert merge_patch(old, new) == {"phase": "Serving", "candidate": None,
                                     "revisions": [{"revision": 0}, {"revision": 1}]}
    assert merge_patch(new, new) is None


def test_spec_configmap_is_the_manifest_the_jobs_load(tmp_path):
    from kompressor.api.manifest import load_manifests

    cm = model(compression={"pruning": {"sparsity": 0.7}})
    configmap = children.spec_configmap(cm)
    assert configmap["metadata"]["name"] == "digits-spec-g3"
    path = tmp_path / "compressedmodel.yaml"
    path.write_text(configmap["data"]["compressedmodel.yaml"])
    [loaded] = load_manifests(path)
    assert (loaded.name, loaded.namespace, loaded.generation) == ("digits", "default", 3)
    assert loaded.spec == cm.spec


def test_a_job_failed_by_its_pod_failure_policy_is_bad_input():
    """The Job controller's reason PodFailurePolicy: the FailJob rule (exit 2) matched; BackoffLimitExceeded is
    an ordinary failure after the retries."""
    from kompressor.k8s.observe import job_state

    labels = {d.LABEL_COMPONENT: "prune", d.LABEL_REVISION: "1", f"{d.GROUP}/generation": "1"}

    def failed(reason, message):
        return job_state("m-r1-g1-prune", labels, {"failed": 1, "startTime": "2026-12-01T10:00:00Z", "conditions": [
            {"type": "Failed", "status": "True", "reason": reason, "message": message,
             "lastTransitionTime": "2026-12-01T10:01:00Z"}]})

    bad = failed("PodFailurePolicy", "Container prune for pod ns/m-r1-g1-prune-x failed with exit code 2 matching "
                                     "FailJob rule at index 0")
    assert (bad.phase, bad.bad_input) == ("Failed", True) and "exit code 2" in bad.message
    other = failed("BackoffLimitExceeded", "Job has reached the specified backoff limit")
    assert (other.phase, other.bad_input) == ("Failed", False)
