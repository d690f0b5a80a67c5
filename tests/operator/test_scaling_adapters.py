"""The controller applies the serving workload's scaling objects through its adapters, against the loopback
API (kmock, tests/support/emulator.py): Controller.apply(Serve) creates the HPA and the PodDisruptionBudget
with the Deployment, never fights the HPA over spec.replicas, patches an edited target, recreates a
deleted child, and deletes both when the spec drops autoscaling (a child already gone is no error)."""

from __future__ import annotations

import aiohttp
import pytest
from kubernetes import client
from prometheus_client import CollectorRegistry

from kompressor.api.manifest import parse_manifest
from kompressor.api.status import Artifact
from kompressor.core import names
from kompressor.core.actions import Serve
from kompressor.k8s import scaling
from kompressor.k8s.client import ApiClient
from kompressor.k8s.config import OperatorConfig
from kompressor.k8s.controller import Controller
from kompressor.k8s.metrics import OperatorMetrics
from support.cluster import digits_model
from support.emulator import Emulator

NS = "models"
DEPLOYMENTS = "apps/v1/deployments"
HPAS = "autoscaling/v2/horizontalpodautoscalers"
PDBS = "policy/v1/poddisruptionbudgets"
MERGE = {"Content-Type": "application/merge-patch+json"}
# The two kinds are not among the emulator's defaults (no other test creates them).
SCALING_RESOURCES = {HPAS: "HorizontalPodAutoscaler", PDBS: "PodDisruptionBudget"}


def model(generation: int, **serving):
    body = digits_model("scaled", NS, serving=serving)
    body["metadata"].update(uid="uid-scaled", generation=generation)
    return parse_manifest(body)


def serve(cm) -> Serve:
    key = names.candidate_key(cm.namespace, cm.name, 1)
    return Serve(1, Artifact(uri=f"pvc://kompressor-artifacts/store/{key}", sha256="0" * 64), drift_reference=None)


@pytest.fixture
async def world(tmp_path):
    async with Emulator() as api:
        for key, kind in SCALING_RESOURCES.items():
            api.resources[key] = {"verbs": ["list", "watch", "get", "create", "patch", "update", "delete"],
                                  "kind": kind, "namespaced": True}
        cfg = client.Configuration()
        cfg.host = str(api.url).rstrip("/")
        controller = Controller(OperatorConfig(artifact_store="pvc://kompressor-artifacts/store"), ApiClient(cfg),
                                OperatorMetrics(CollectorRegistry()))
        try:
            yield api, controller
        finally:
            await controller.api.close()


async def _http(api, method: str, path: str, body: dict | None = None) -> int:
    async with aiohttp.ClientSession() as session:
        async with session.request(method, f"{str(api.url).rstrip('/')}{path}", json=body, headers=MERGE) as resp:
            return resp.status


async def test_autoscaling_children_are_made_kept_patched_and_deleted(world):
    api, controller = world
    name = names.serving_name("scaled")
    auto = model(2, autoscaling={"minReplicas": 2, "maxReplicas": 5, "targetConcurrency": 8})
    await controller.apply(auto, serve(auto))

    deployment = api.get(DEPLOYMENTS, NS, name)
    assert deployment["spec"]["replicas"] == 2  # created at minReplicas
    assert deployment["metadata"]["labels"][scaling.LABEL_MIN_READY] == "2"
    assert scaling.recorded_objects(deployment) == {"HorizontalPodAutoscaler", "PodDisruptionBudget"}
    hpa, pdb = api.get(HPAS, NS, name), api.get(PDBS, NS, name)
    for child in (hpa, pdb):
        assert child["metadata"]["ownerReferences"][0]["uid"] == "uid-scaled"
    assert hpa["spec"]["minReplicas"] == 2 and hpa["spec"]["maxReplicas"] == 5

    # The HPA scales the Deployment up; the operator's next apply (a new target) leaves that count alone.
    path = f"/apis/apps/v1/namespaces/{NS}/deployments/{name}"
    assert await _http(api, "PATCH", path, {"spec": {"replicas": 4}}) == 200
    edited = model(3, autoscaling={"minReplicas": 2, "maxReplicas": 5, "targetConcurrency": 16})
    await controller.apply(edited, serve(edited))
    assert api.get(DEPLOYMENTS, NS, name)["spec"]["replicas"] == 4
    assert api.get(HPAS, NS, name)["spec"]["metrics"][0]["pods"]["target"]["averageValue"] == "16"

    # A child deleted behind the operator's back is made again.
    assert await _http(api, "DELETE", f"/apis/policy/v1/namespaces/{NS}/poddisruptionbudgets/{name}") == 200
    await controller.apply(edited, serve(edited))
    assert api.get(PDBS, NS, name) is not None

    # Autoscaling dropped, one fixed replica: both children go, and the Deployment's scaling traces with them.
    fixed = model(4, replicas=1)
    await controller.apply(fixed, serve(fixed))
    assert api.get(HPAS, NS, name) is None and api.get(PDBS, NS, name) is None
    deployment = api.get(DEPLOYMENTS, NS, name)
    assert deployment["spec"]["replicas"] == 1
    assert scaling.LABEL_MIN_READY not in deployment["metadata"]["labels"]
    assert "topologySpreadConstraints" not in deployment["spec"]["template"]["spec"]
    assert scaling.recorded_objects(deployment) == set()


async def test_a_recorded_child_already_gone_is_no_error_and_the_record_is_healed(world):
    api, controller = world
    name = names.serving_name("scaled")
    two = model(2, replicas=2)
    await controller.apply(two, serve(two))
    assert api.get(PDBS, NS, name) is not None
    assert await _http(api, "DELETE", f"/apis/policy/v1/namespaces/{NS}/poddisruptionbudgets/{name}") == 200
    one = model(3, replicas=1)
    await controller.apply(one, serve(one))  # deletes the recorded budget: 404, which is success
    deployment = api.get(DEPLOYMENTS, NS, name)
    assert deployment["spec"]["replicas"] == 1 and scaling.recorded_objects(deployment) == set()

    # A record that says more than exists (edited by hand) is rewritten, not re-deleted on every reconcile.
    path = f"/apis/apps/v1/namespaces/{NS}/deployments/{name}"
    record = {"metadata": {"annotations": {scaling.ANNOTATION_OWNED: "HorizontalPodAutoscaler"}}}
    assert await _http(api, "PATCH", path, record) == 200
    await controller.apply(one, serve(one))
    assert scaling.recorded_objects(api.get(DEPLOYMENTS, NS, name)) == set()
    before = len(api.writes)
    await controller.apply(one, serve(one))
    assert [w for w in api.writes[before:] if w[2] in ("horizontalpodautoscalers", "poddisruptionbudgets")] == []
