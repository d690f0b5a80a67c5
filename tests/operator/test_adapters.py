"""The Kopf adapters' pure parts and contracts: light imports, RBAC derived from the code,
the objects built for RunJob/Serve, status patches. Fast: no cluster."""

import os
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


def test_the_operator_does_not_load_the_second_kubernetes_client():
    # kubernetes 36 ships kubernetes_asyncio too; Kopf would import it (about 30 MB) for nothing.
    code = ("import sys, kompressor.k8s.main, kompressor.k8s.handlers, kopf; "
            "print(sys.modules.get('kubernetes_asyncio') is None)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "True"


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


def test_a_failed_job_says_why_with_its_pod_s_termination_message():
    """The last failed Pod's message for the Job's container (its last line: the job's own error, or the
    last line of a crash's log tail) replaces the Job controller's text; none found keeps that text."""
    from kompressor.k8s.observe import job_state, pod_failure_message, with_message

    def pod(finished, message, code=2, container="prune"):
        return {"status": {"phase": "Failed", "containerStatuses": [{"name": container, "state": {"terminated": {
            "exitCode": code, "finishedAt": finished, "message": message}}}]}}

    pods = [pod("2026-12-01T10:02:00Z", "model file not found: /models/missing.pt2\n"),
            pod("2026-12-01T10:01:00Z", "older"),
            pod("2026-12-01T10:03:00Z", "a sidecar's", container="other"),
            pod("2026-12-01T10:04:00Z", "fine", code=0)]
    assert pod_failure_message(pods, "prune") == "model file not found: /models/missing.pt2"
    tail = "Traceback (most recent call last):\n  File \"x.py\", line 1\nMemoryError: out of memory\n\n"
    assert pod_failure_message([pod("t", tail, code=1)], "prune") == "MemoryError: out of memory"
    assert pod_failure_message([], "prune") == "" and pod_failure_message([pod("t", "")], "prune") == ""
    labels = {d.LABEL_COMPONENT: "prune", d.LABEL_REVISION: "1", f"{d.GROUP}/generation": "1"}
    job = job_state("m-r1-g1-prune", labels, {"conditions": [
        {"type": "Failed", "status": "True", "reason": "PodFailurePolicy", "message": "exit code 2"}]})
    assert with_message(job, "model file not found").message == "model file not found"
    assert with_message(job, "").message == "exit code 2" and with_message(job, "x").bad_input


def test_a_command_in_a_pod_writes_why_it_failed_to_its_termination_log(tmp_path):
    """Exit 2 on bad input, with the same lines as on stderr in $KOMPRESSOR_TERMINATION_LOG (the Pod's
    terminationMessagePath), which the kubelet reports and the operator copies into the model's status."""
    from kompressor.errors import TERMINATION_LOG_ENV

    spec = tmp_path / "bad.yaml"
    spec.write_text("apiVersion: kompressor.io/v1alpha1\nkind: CompressedModel\nmetadata: {name: x}\n"
                    "spec: {model: {uri: 5}}\n")
    log = tmp_path / "termination-log"
    out = subprocess.run([sys.executable, "-m", "kompressor.cli", "evaluate", "--spec", str(spec), "--candidate",
                          str(tmp_path / "c"), "--out", str(tmp_path / "o")], capture_output=True, text=True,
                         env={**os.environ, TERMINATION_LOG_ENV: str(log)}, timeout=60)
    assert out.returncode == 2
    assert "spec.model.uri: must be a string" in log.read_text()
    assert all(line.removeprefix("error: ") in log.read_text() for line in out.stderr.splitlines())
