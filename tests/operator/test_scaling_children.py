"""spec.serving.autoscaling and replicas > 1: the serving Deployment, HorizontalPodAutoscaler (autoscaling/v2)
and PodDisruptionBudget (policy/v1) the operator builds (kompressor.k8s.scaling through kompressor.k8s.children),
checked like the other children: Kubernetes 1.30 schemas (kubernetes-validate, strict), checkov, ownership
and selectors; then the controller's adapters applying them against the loopback API (create, 409, patch,
delete, 404) through the same Controller.apply the operator runs."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from prometheus_client import CollectorRegistry

from kompressor.api import defaults as d
from kompressor.api.manifest import parse_manifest
from kompressor.api.status import Artifact
from kompressor.core import names
from kompressor.core.actions import Serve
from kompressor.k8s import children, scaling
from kompressor.k8s.observe import serving_state
from kompressor.k8s.storage import pod_store
from support.cluster import digits_model

REPO = Path(__file__).resolve().parents[2]
K8S_VERSION = "1.30.0"
STORE = "pvc://kompressor-artifacts/artifacts"
SELECTOR_KEYS = ("app.kubernetes.io/instance", "app.kubernetes.io/component")

AUTOSCALING = {
    "cpu": {"autoscaling": {"minReplicas": 2, "maxReplicas": 6, "targetCPUUtilization": 70}},
    "cpu-no-request": {"autoscaling": {"maxReplicas": 3, "targetCPUUtilization": 80},
                       "resources": {"requests": {"memory": "1Gi"}, "limits": {"memory": "2Gi"}}},
    "concurrency": {"autoscaling": {"minReplicas": 1, "maxReplicas": 10, "targetConcurrency": 8}},
    "fixed-3": {"replicas": 3},
    "fixed-1": {"replicas": 1},
}


def model(serving: dict, name: str = "scaled", namespace: str = "models"):
    body = digits_model(name, namespace, serving=serving)
    body["metadata"].update(uid=f"uid-{name}", generation=2)
    return parse_manifest(body)


def serve_action(cm) -> Serve:
    candidate = names.candidate_key(cm.namespace, cm.name, 1)
    return Serve(1, Artifact(uri=f"{STORE}/{candidate}", sha256="0" * 64), drift_reference=None)


def built(cm) -> dict[str, dict]:
    """The serving Deployment and its scaling objects, by kind, as the controller builds them."""
    out = {"Deployment": children.serving_deployment(cm, serve_action(cm), pod_store(STORE))}
    for body in (scaling.autoscaler(cm), scaling.disruption_budget(cm)):
        if body is not None:
            out[body["kind"]] = body
    return out


CASES = {label: built(model(spec, name=label)) for label, spec in AUTOSCALING.items()}


def _selects(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector["matchLabels"].items())


@pytest.mark.parametrize("label", sorted(CASES))
def test_every_object_is_valid_for_kubernetes_1_30(label):
    for obj in CASES[label].values():
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def test_the_schema_check_sees_the_hpa_metrics():
    """A misspelt metric target is refused: the validation above checks these fields, not free-form data."""
    hpa = copy.deepcopy(CASES["cpu"]["HorizontalPodAutoscaler"])
    kubernetes_validate.validate(hpa, K8S_VERSION, strict=True)
    hpa["spec"]["metrics"][0]["resource"]["target"]["averageUtilisation"] = 70
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(hpa, K8S_VERSION, strict=True)


def test_which_objects_each_spec_gets():
    assert {label: sorted(objs) for label, objs in CASES.items()} == {
        "cpu": ["Deployment", "HorizontalPodAutoscaler", "PodDisruptionBudget"],
        "cpu-no-request": ["Deployment", "HorizontalPodAutoscaler", "PodDisruptionBudget"],
        "concurrency": ["Deployment", "HorizontalPodAutoscaler", "PodDisruptionBudget"],
        "fixed-3": ["Deployment", "PodDisruptionBudget"],
        "fixed-1": ["Deployment"],
    }


@pytest.mark.parametrize("label", sorted(CASES))
def test_scaling_objects_are_owned_labelled_and_select_the_serving_pods(label):
    objs = CASES[label]
    deployment = objs["Deployment"]
    template_labels = deployment["spec"]["template"]["metadata"]["labels"]
    owner = deployment["metadata"]["ownerReferences"]
    for kind in ("HorizontalPodAutoscaler", "PodDisruptionBudget"):
        if kind not in objs:
            continue
        meta = objs[kind]["metadata"]
        assert meta["ownerReferences"] == owner and owner[0]["controller"] is True
        assert (meta["name"], meta["namespace"]) == (deployment["metadata"]["name"], deployment["metadata"]["namespace"])
        assert meta["labels"]["app.kubernetes.io/managed-by"] == "kompressor"
        assert children.applied_hash(objs[kind])  # patched only when the desired state changes
    if "PodDisruptionBudget" in objs:
        pdb = objs["PodDisruptionBudget"]["spec"]
        assert pdb["maxUnavailable"] == d.SERVING_PDB_MAX_UNAVAILABLE == 1
        assert _selects(pdb["selector"], template_labels)
        assert set(pdb["selector"]["matchLabels"]) == set(SELECTOR_KEYS)  # every revision's Pods
    recorded = deployment["metadata"]["annotations"][scaling.ANNOTATION_OWNED]
    assert scaling.recorded_objects(deployment) == set(objs) - {"Deployment"}
    assert recorded == ",".join(sorted(set(objs) - {"Deployment"}))


def test_the_hpa_scales_the_serving_deployment_on_cpu_or_concurrency():
    for label in ("cpu", "concurrency"):
        hpa = CASES[label]["HorizontalPodAutoscaler"]["spec"]
        deployment = CASES[label]["Deployment"]
        assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                         "name": deployment["metadata"]["name"]}
        auto = AUTOSCALING[label]["autoscaling"]
        assert (hpa["minReplicas"], hpa["maxReplicas"]) == (auto.get("minReplicas", 1), auto["maxReplicas"])
    [cpu] = CASES["cpu"]["HorizontalPodAutoscaler"]["spec"]["metrics"]
    assert cpu == {"type": "Resource", "resource": {"name": "cpu",
                                                    "target": {"type": "Utilization", "averageUtilization": 70}}}
    [pods] = CASES["concurrency"]["HorizontalPodAutoscaler"]["spec"]["metrics"]
    assert pods == {"type": "Pods", "pods": {"metric": {"name": d.SERVING_CONCURRENCY_METRIC},
                                             "target": {"type": "AverageValue", "averageValue": "8"}}}


def test_the_concurrency_metric_is_the_servers_in_flight_gauge():
    """The HPA's Pods metric is the gauge the inference server exports (through a metrics adapter)."""
    from kompressor_jobs.serve.metrics import ServerMetrics

    [gauge] = [m for m in ServerMetrics().registry.collect() if m.name == d.SERVING_CONCURRENCY_METRIC]
    assert gauge.type == "gauge"


def test_under_an_hpa_the_deployment_leaves_replicas_to_it():
    for label in ("cpu", "cpu-no-request", "concurrency"):
        cm = model(AUTOSCALING[label], name=label)
        desired = CASES[label]["Deployment"]
        assert "replicas" not in desired["spec"], label  # a merge patch then keeps what the HPA set
        minimum = AUTOSCALING[label]["autoscaling"].get("minReplicas", 1)
        assert scaling.creation_body(cm, desired)["spec"]["replicas"] == minimum  # created at minReplicas
        assert "replicas" not in scaling.patch_body(cm, desired)["spec"]
        assert desired["metadata"]["labels"][scaling.LABEL_MIN_READY] == str(minimum)
        assert scaling.LABEL_MIN_READY not in desired["spec"]["template"]["metadata"]["labels"]  # no rollout
        # the digest ignores what the HPA did: same desire, same digest, no patch
        assert children.applied_hash(children.serving_deployment(cm, serve_action(cm), pod_store(STORE))) == \
            children.applied_hash(desired)
    assert CASES["fixed-3"]["Deployment"]["spec"]["replicas"] == 3


def test_a_cpu_target_without_a_cpu_request_gets_the_default_request():
    [c] = CASES["cpu-no-request"]["Deployment"]["spec"]["template"]["spec"]["containers"]
    assert c["resources"] == {"requests": {"memory": "1Gi", "cpu": d.SERVING_AUTOSCALING_CPU_REQUEST},
                              "limits": {"memory": "2Gi"}}
    [c] = CASES["cpu"]["Deployment"]["spec"]["template"]["spec"]["containers"]
    assert c["resources"] == d.SERVING_RESOURCES  # the defaults request CPU already


def test_more_than_one_replica_spreads_over_nodes_softly():
    for label in ("cpu", "concurrency", "fixed-3"):
        pod = CASES[label]["Deployment"]["spec"]["template"]
        [constraint] = pod["spec"]["topologySpreadConstraints"]
        assert constraint["topologyKey"] == "kubernetes.io/hostname"
        assert constraint["whenUnsatisfiable"] == "ScheduleAnyway"  # a one-node cluster still schedules them
        assert constraint["maxSkew"] == 1
        assert _selects(constraint["labelSelector"], pod["metadata"]["labels"])
        assert constraint["matchLabelKeys"] == ["pod-template-hash"]
    assert "topologySpreadConstraints" not in CASES["fixed-1"]["Deployment"]["spec"]["template"]["spec"]


def test_dropping_autoscaling_patches_its_traces_away():
    """A merge patch keeps what it does not name: the patch nulls the readiness label and the spreading."""
    cm = model(AUTOSCALING["fixed-1"], name="fixed-1")
    body = scaling.patch_body(cm, CASES["fixed-1"]["Deployment"])
    assert body["metadata"]["labels"][scaling.LABEL_MIN_READY] is None
    assert body["spec"]["template"]["spec"]["topologySpreadConstraints"] is None
    assert body["spec"]["replicas"] == 1


def test_readiness_under_an_hpa_asks_for_min_replicas():
    deployment = CASES["cpu"]["Deployment"]  # minReplicas 2
    labels = deployment["metadata"]["labels"]
    scaled_up = {"replicas": 5}
    status = {"observedGeneration": 3, "updatedReplicas": 5, "readyReplicas": 2}
    assert serving_state(labels, scaled_up, status, 3).ready  # three new Pods still starting
    assert not serving_state(labels, scaled_up, {**status, "readyReplicas": 1}, 3).ready
    fixed = CASES["fixed-3"]["Deployment"]["metadata"]["labels"]
    assert not serving_state(fixed, {"replicas": 3}, {**status, "updatedReplicas": 3}, 3).ready


# --- checkov ------------------------------------------------------------------------------------------

def _chartkit():
    spec = importlib.util.spec_from_file_location("chartkit", REPO / "tests" / "packaging" / "chartkit.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_checkov_fails_nothing_on_the_scaling_objects(tmp_path):
    chartkit = _chartkit()
    binary = chartkit.require_tool("checkov", chartkit.checkov_binary(), "set KOMPRESSOR_CHECKOV; .ci/run installs it")
    for label, objs in CASES.items():
        (tmp_path / f"{label}.yaml").write_text("---\n".join(yaml.safe_dump(o) for o in objs.values()))
    proc = subprocess.run([binary, "--directory", str(tmp_path), "--framework", "kubernetes", "--output", "json",
                           "--skip-download", "--compact"],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "BC_SKIP_MAPPING": "TRUE"})
    report = json.loads(proc.stdout)
    assert report["summary"]["parsing_errors"] == 0
    failed = [f"{c['check_id']} {c['check_name']}: {c['resource']}" for c in report["results"]["failed_checks"]]
    assert failed == []
    checked = {c["resource"] for c in report["results"]["passed_checks"]}
    for objs in CASES.values():
        name = objs["Deployment"]["metadata"]
        assert f"Deployment.{name['namespace']}.{name['name']}" in checked
