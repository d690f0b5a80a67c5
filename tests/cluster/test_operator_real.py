"""The operator from the chart, installed by the real helm, on the real control plane (e2e/cluster):
its Pod runs under the chart's ServiceAccount (every call passes the real RBAC), its Jobs are run by the
real Job controller and scheduler on the process kubelet's Nodes.

- a GPU pruning Job (examples/digits-cnn-gpu.yaml) lands on the GPU node only; a CPU one on the CPU node;
- a Job that fails on bad input (exit 2) fails after one Pod (the Job's podFailurePolicy, issue 14), and the
  model's status says why in the job's own words (its Pod's termination message);
- a Job left behind by an operator that died before recording it: the create answers 409, and the
  operator carries on with that Job (no duplicate);
- SIGKILL of the operator at every phase boundary (its process, then its Pod): restarted by the kubelet
  and by the Deployment's ReplicaSet, no duplicate Jobs, no lost revisions;
- the watches recover after the control plane restarts (same etcd data and ports).
"""

from __future__ import annotations

import copy
import os
import signal
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "kompressor"
NAMESPACE = "kompressor-it"
GROUP, VERSION, PLURAL = "kompressor.io", "v1alpha1", "compressedmodels"
INSTANCE = "app.kubernetes.io/instance"

pytestmark = [pytest.mark.slow, pytest.mark.cluster]

sys.path.insert(0, str(REPO / "tests"))
from support.cluster import digits_model  # noqa: E402  (a small, fast CompressedModel)
from support.polling import wait  # noqa: E402




class Kube:
    """The kubernetes package's clients for one namespace, plus what the tests read often."""

    def __init__(self, api_client, cluster, namespace: str):
        from kubernetes import client

        self.cluster, self.namespace = cluster, namespace
        self.custom = client.CustomObjectsApi(api_client)
        self.core = client.CoreV1Api(api_client)
        self.batch = client.BatchV1Api(api_client)
        self.apps = client.AppsV1Api(api_client)

    def create(self, doc: dict, namespace: str | None = None) -> dict:
        doc = copy.deepcopy(doc)
        doc["metadata"]["namespace"] = namespace or self.namespace
        return self.custom.create_namespaced_custom_object(GROUP, VERSION, doc["metadata"]["namespace"], PLURAL, doc)

    def get(self, name: str, namespace: str | None = None) -> dict | None:
        from kubernetes.client.exceptions import ApiException

        try:
            return self.custom.get_namespaced_custom_object(GROUP, VERSION, namespace or self.namespace, PLURAL, name)
        except ApiException as err:
            if err.status == 404:
                return None
            raise

    def status(self, name: str, namespace: str | None = None) -> dict:
        return (self.get(name, namespace) or {}).get("status") or {}

    def delete(self, name: str, namespace: str | None = None) -> None:
        from kubernetes.client.exceptions import ApiException

        try:
            self.custom.delete_namespaced_custom_object(GROUP, VERSION, namespace or self.namespace, PLURAL, name)
        except ApiException as err:
            if err.status != 404:
                raise

    def jobs(self, name: str, namespace: str | None = None) -> list:
        return self.batch.list_namespaced_job(namespace or self.namespace, label_selector=f"{INSTANCE}={name}").items

    def job_pods(self, job: str) -> list:
        return self.core.list_namespaced_pod(self.namespace, label_selector=f"job-name={job}").items

    def operator_pods(self) -> list:
        pods = self.core.list_namespaced_pod(self.namespace, label_selector="app.kubernetes.io/name=kompressor,"
                                             "app.kubernetes.io/component=operator").items
        return [p for p in pods if p.metadata.deletion_timestamp is None]

    def ready_operator(self):
        def ready():
            for pod in self.operator_pods():
                statuses = pod.status.container_statuses or []
                if statuses and all(s.ready for s in statuses):
                    return pod
            return None
        return ready()

    def diagnostics(self, name: str = "") -> str:
        return (self.cluster.pod_logs(self.namespace, "kompressor")[-3000:] + "\n"
                + (self.cluster.pod_logs(self.namespace, name)[-3000:] if name else "") + "\n"
                + self.cluster.diagnostics())

    def gone(self, name: str) -> bool:
        return self.get(name) is None and not self.jobs(name)


def install(cluster, namespace: str, *values: str) -> None:
    cluster.helm("upgrade", "--install", "kompressor", str(CHART), "--namespace", namespace, "--create-namespace",
                 "--wait", "--timeout", "5m", *(f"--set={v}" for v in values))


def uninstall(cluster, kube: Kube, namespaces: list[str]) -> None:
    for namespace in namespaces:  # while the operator runs: it releases its finalizers
        for obj in kube.custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)["items"]:
            kube.delete(obj["metadata"]["name"], namespace)
    wait(lambda: all(not kube.custom.list_namespaced_custom_object(GROUP, VERSION, ns, PLURAL)["items"]
                     for ns in namespaces), 120, "the CompressedModels to be deleted", kube.diagnostics)
    cluster.helm("uninstall", "kompressor", "--namespace", namespaces[0], "--wait", "--timeout", "3m", check=False)
    for namespace in namespaces:
        cluster.kubectl("delete", "namespace", namespace, "--wait=false", check=False)


@pytest.fixture(scope="module")
def kube(cluster, api_client, helm_ready):
    install(cluster, NAMESPACE)
    kube = Kube(api_client, cluster, NAMESPACE)
    yield kube
    uninstall(cluster, kube, [NAMESPACE])


def _pod_node(kube: Kube, job: str) -> str | None:
    pods = kube.job_pods(job)
    return pods[0].spec.node_name if pods and pods[0].spec.node_name else None


def test_the_operator_runs_under_the_chart_service_account(kube):
    pod = wait(kube.ready_operator, 120, "a Ready operator Pod", kube.diagnostics)
    assert pod.spec.service_account_name == "kompressor"
    assert pod.status.pod_ip.startswith(("10.244.", "127.")) and pod.status.pod_ip != "127.0.0.1"
    assert pod.spec.node_name == "kompressor-cpu"  # not tolerating the GPU taint


def test_a_gpu_pruning_job_lands_on_the_gpu_node_only(kube):
    gpu = yaml.safe_load((REPO / "examples" / "digits-cnn-gpu.yaml").read_text())
    gpu["metadata"] = {"name": "gpu-job"}
    gpu["spec"]["jobs"]["resources"] = {"requests": {"cpu": "100m", "memory": "128Mi"}}
    cpu = digits_model("cpu-job")
    kube.create(gpu)
    kube.create(cpu)
    try:
        jobs = wait(lambda: [j for j in kube.jobs("gpu-job") if "prune" in j.metadata.name], 120, "the GPU prune Job",
                    kube.diagnostics)
        job = jobs[0]
        pod_spec = job.spec.template.spec
        assert pod_spec.containers[0].resources.limits.get("nvidia.com/gpu") in (1, "1")
        node = wait(lambda: _pod_node(kube, job.metadata.name), 120, "the GPU Job's Pod to be scheduled",
                    kube.diagnostics)
        assert node == "kompressor-gpu"
        cpu_job = wait(lambda: [j for j in kube.jobs("cpu-job") if "prune" in j.metadata.name], 120, "the CPU prune Job")[0]
        assert wait(lambda: _pod_node(kube, cpu_job.metadata.name), 120, "the CPU Job's Pod") == "kompressor-cpu"
    finally:
        kube.delete("gpu-job")
        kube.delete("cpu-job")
    wait(lambda: kube.gone("gpu-job") and kube.gone("cpu-job"), 120, "the models and their Jobs to be gone",
         kube.diagnostics)


def test_a_bad_input_job_fails_after_one_pod(kube):
    model = digits_model("bad-input", model={"uri": "file:///models/missing.pt2", "inputShape": [64]}, jobs={"backoffLimit": 3})
    kube.create(model)
    try:
        status = wait(lambda: kube.status("bad-input").get("phase") == "Failed" and kube.status("bad-input"), 180,
                      "the model to fail", lambda: kube.diagnostics("bad-input"))
        (job,) = [j for j in kube.jobs("bad-input") if "prune" in j.metadata.name]
        assert job.status.failed == 1, job.status  # one Pod, not backoffLimit + 1
        failed = [c for c in job.status.conditions or [] if c.type == "Failed" and c.status == "True"]
        assert failed and failed[0].reason == "PodFailurePolicy", job.status.conditions
        assert "bad input, not retried" in (status.get("message") or ""), status.get("message")
        # The job's own error line (its termination message), not the Job controller's "exit code 2" text.
        assert "file:///models/missing.pt2: model file not found" in status["message"], status["message"]
        (pod,) = kube.job_pods(job.metadata.name)
        terminated = pod.status.container_statuses[0].state.terminated
        assert "model file not found" in terminated.message and terminated.exit_code == 2, terminated
    finally:
        kube.delete("bad-input")
    wait(lambda: kube.gone("bad-input"), 120, "the model and its Job to be gone", kube.diagnostics)


def test_a_job_left_behind_answers_409_and_is_adopted(kube, cluster):
    """The operator is stopped; the Job it would create already exists (as when it died after creating it,
    before anything recorded it). Started again, its create gets 409 Conflict from the real server, and
    it carries on with that very Job."""
    from kompressor.api.manifest import parse_manifest

    kube.apps.patch_namespaced_deployment_scale("kompressor", NAMESPACE, {"spec": {"replicas": 0}})
    wait(lambda: not kube.operator_pods(), 120, "the operator Pod to be gone", kube.diagnostics)
    try:
        created = kube.create(digits_model("left-behind"))
        # What the operator builds for its first action: read its Job from the operator's own builder.
        from kompressor.core.actions import RunJob
        from kompressor.k8s import children
        from kompressor.k8s.storage import pod_store

        cm = parse_manifest(created)
        store = pod_store("pvc://kompressor-artifacts/artifacts")  # the chart's default store
        action = _first_prune_action(cm)
        assert isinstance(action, RunJob)
        kube.core.create_namespaced_config_map(NAMESPACE, children.spec_configmap(cm))
        body = children.job(cm, action, store)
        existing = kube.batch.create_namespaced_job(NAMESPACE, body)
    finally:
        kube.apps.patch_namespaced_deployment_scale("kompressor", NAMESPACE, {"spec": {"replicas": 1}})
    wait(kube.ready_operator, 180, "the operator to be Ready again", kube.diagnostics)
    status = wait(lambda: kube.status("left-behind").get("phase") in ("Evaluating", "Serving")
                  and kube.status("left-behind"), 300, "the model to get past compression",
                  lambda: kube.diagnostics("left-behind"))
    prunes = [j for j in kube.jobs("left-behind") if j.metadata.name == existing.metadata.name]
    assert prunes and prunes[0].metadata.uid == existing.metadata.uid, "the Job left behind was replaced"
    assert len([j for j in kube.jobs("left-behind") if "prune" in j.metadata.name]) == 1
    assert status.get("phase") != "Failed", status
    kube.delete("left-behind")
    wait(lambda: kube.gone("left-behind"), 120, "the model and its Jobs to be gone", kube.diagnostics)


def _first_prune_action(cm):
    """The operator core's first action for a new resource: the prune Job of revision 1."""
    import datetime

    from kompressor.core.actions import RunJob
    from kompressor.core.observed import Observed
    from kompressor.core.reconcile import reconcile

    decision = reconcile(Observed(model=cm, now=datetime.datetime.now(datetime.timezone.utc)))
    jobs = [a for a in decision.actions if isinstance(a, RunJob)]
    assert jobs, decision
    return jobs[0]


def _operator_pid(kube: Kube) -> int:
    pod = kube.ready_operator()
    assert pod is not None
    return int(pod.status.container_statuses[0].container_id.split("://", 1)[1])


def test_sigkill_at_every_phase_boundary_loses_nothing(kube):
    """At each phase the model reaches, the operator is killed: its process (SIGKILL; the kubelet restarts
    the container), then its Pod (deleted with no grace; the Deployment's ReplicaSet makes a new one), in
    turn. The model still reaches Serving with one Job per stage and every revision recorded once."""
    from kubernetes.client import V1DeleteOptions

    from kompressor.api.defaults import BASELINE_REVISION
    from kompressor.core.names import job_name

    kube.create(digits_model("killed"))
    seen: list[str] = []
    while not seen or seen[-1] not in ("Serving", "Failed"):
        phase = wait(lambda: (p := kube.status("killed").get("phase")) not in (None, *seen) and p, 300,
                     f"a phase after {seen}", lambda: kube.diagnostics("killed"))
        seen.append(phase)
        if phase in ("Serving", "Failed"):
            break
        pod = wait(kube.ready_operator, 180, "a Ready operator", kube.diagnostics)
        if len(seen) % 2:  # the process: the kubelet restarts the container
            os.kill(_operator_pid(kube), signal.SIGKILL)
            wait(lambda: (p := kube.ready_operator()) is not None and p.status.container_statuses[0].restart_count
                 > pod.status.container_statuses[0].restart_count, 180, "the operator container to restart",
                 kube.diagnostics)
        else:  # the Pod, with no grace: the ReplicaSet makes a new one
            kube.core.delete_namespaced_pod(pod.metadata.name, NAMESPACE, body=V1DeleteOptions(grace_period_seconds=0))
            wait(lambda: (p := kube.ready_operator()) is not None and p.metadata.uid != pod.metadata.uid, 180,
                 "a new operator Pod", kube.diagnostics)
    assert seen[-1] == "Serving", f"phases {seen}\n{kube.diagnostics('killed')}"
    assert len(seen) >= 3, seen  # at least one kill of each kind
    status = kube.status("killed")
    names = sorted(j.metadata.name for j in kube.jobs("killed"))
    # Job names are deterministic: a duplicate would be a Job of another revision or generation.
    assert names == sorted(job_name("killed", kind, 1, 1) for kind in ("prune", "evaluate")), names
    assert status["currentRevision"] == 1
    revisions = [r["revision"] for r in status["revisions"]]
    assert revisions == [BASELINE_REVISION, 1], revisions  # the baseline and the one candidate: none lost or doubled
    kube.delete("killed")
    wait(lambda: kube.gone("killed"), 120, "the model and its children to be gone", kube.diagnostics)


def test_watches_recover_after_the_control_plane_restarts(kube, cluster):
    """The whole control plane restarts (same etcd data and ports) under a running operator. Its watches
    come back: the model started before goes on to Serving (its later Jobs and its Deployment are seen
    through the new watches), and a model created after the restart gets its first Job."""
    kube.create(digits_model("before-restart"))
    wait(lambda: kube.jobs("before-restart"), 120, "the first Job", kube.diagnostics)
    cluster.restart_control_plane()
    kube.create(digits_model("after-restart"))
    wait(lambda: kube.jobs("after-restart"), 180, "the Job of the model created after the restart",
         lambda: kube.diagnostics("after-restart"))
    wait(lambda: kube.status("before-restart").get("phase") == "Serving", 600, "before-restart to be Serving",
         lambda: kube.diagnostics("before-restart"))
    for name in ("before-restart", "after-restart"):
        kube.delete(name)
    wait(lambda: kube.gone("before-restart") and kube.gone("after-restart"), 120, "both models to be gone",
         kube.diagnostics)
