"""The operator against the loopback API with real jobs: compress, gate, serve, approve, fail,
edit mid-compression, delete. The resources are created together up front so that their real
`kompressor prune|evaluate` Jobs overlap; each test then awaits its own resource."""

import aiohttp
import pytest
import pytest_asyncio

from kompressor.api import defaults as d
from kompressor.core import names
from support.cluster import digits_model

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]

MODELS = {
    "happy": digits_model("happy"),
    "strict": digits_model("strict", gates={"minAccuracy": 0.999}),
    "broken": digits_model("broken", model={"uri": "file:///nonexistent/model.pt2", "inputShape": [64]}),
    "gated": digits_model("gated", promotion={"requireApproval": True}),
}


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def models(cluster):
    for body in MODELS.values():
        await cluster.create(body)
    return cluster


async def test_happy_path_to_serving(models):
    cluster = models
    status = await cluster.wait_phase("happy", "Serving", "Failed", "Rejected")
    assert status["phase"] == "Serving", status
    assert status["currentRevision"] == 1
    assert next(r for r in status["revisions"] if r["revision"] == 1)["gates"]["passed"] is True
    assert sorted(cluster.job_creations("happy")) == sorted(
        [names.job_name("happy", "prune", 1, 1), names.job_name("happy", "evaluate", 1, 1)])

    # The spec is never written by the operator (status subresource only): GitOps sees no drift.
    assert cluster.get("happy")["spec"] == MODELS["happy"]["spec"]
    assert cluster.get("happy")["metadata"]["generation"] == 1

    # Every child is owned by the CR and labelled.
    uid = cluster.get("happy")["metadata"]["uid"]
    for resource in ("batch/v1/jobs", "apps/v1/deployments", "v1/services", "v1/configmaps"):
        objs = cluster.children(resource, "happy")
        assert objs, resource
        for obj in objs:
            meta = obj["metadata"]
            assert meta["ownerReferences"][0]["uid"] == uid
            assert meta["labels"]["app.kubernetes.io/managed-by"] == "kompressor"
            assert meta["labels"]["app.kubernetes.io/name"] == "kompressor"

    # The prune Job: image, command from kompressor.commands, the spec ConfigMap read-only, the claim.
    prune = cluster.api.get("batch/v1/jobs", "default", names.job_name("happy", "prune", 1, 1))
    pod = prune["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["image"] == d.JOBS_IMAGE
    assert container["command"][:3] == ["kompressor", "--json-logs", "prune"]
    assert {"name": "spec", "mountPath": "/etc/kompressor", "readOnly": True} in container["volumeMounts"]
    assert {"name": "artifacts", "persistentVolumeClaim": {"claimName": "kompressor-artifacts"}} in pod["volumes"]
    assert prune["spec"]["backoffLimit"] == 1
    assert "nvidia.com/gpu" not in container["resources"].get("limits", {})

    # The served model answers OIP v2 inference like a direct run of the artifact.
    deployment = cluster.api.get("apps/v1/deployments", "default", "happy-serving")
    assert deployment["metadata"]["labels"][d.LABEL_REVISION] == "1"
    port = cluster.controllers.ports[("default", "happy-serving")]
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{port}/v2/models/happy") as resp:
            meta = await resp.json()
        body = {"inputs": [{"name": meta["inputs"][0]["name"], "shape": [1, 64], "datatype": "FP32",
                            "data": [0.0] * 64}]}
        async with session.post(f"http://127.0.0.1:{port}/v2/models/happy/infer", json=body) as resp:
            assert resp.status == 200, await resp.text()
            assert (await resp.json())["outputs"][0]["shape"] == [1, 10]

    reasons = [e["reason"] for e in cluster.events("happy")]
    assert "Promoted" in reasons or "Promoting" in reasons, reasons

    # The operator's own metrics.
    from prometheus_client.parser import text_string_to_metric_families

    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(await cluster.metrics()) for s in family.samples}
    assert samples[("kompressor_current_revision", (("name", "happy"), ("namespace", "default")))] == 1
    assert samples[("kompressor_reconciles_total", (("result", "ok"),))] > 0
    assert samples[("kompressor_phase_transitions_total", (("from_phase", "Promoting"), ("to_phase", "Serving")))] >= 1
    assert samples[("kompressor_job_duration_seconds_count", (("kind", "prune"), ("phase", "Succeeded")))] >= 1
    assert samples[("kompressor_gate_outcomes_total", (("gate", "maxAccuracyDrop"), ("outcome", "Successful")))] >= 1


async def test_failing_gate_rejects_and_names_the_gate(models):
    status = await models.wait_phase("strict", "Rejected", "Serving", "Failed")
    assert status["phase"] == "Rejected", status
    assert "minAccuracy" in status["message"]
    assert "currentRevision" not in status or status["currentRevision"] is None
    assert not models.children("apps/v1/deployments", "strict")


async def test_bad_input_is_reported_as_not_retried(models):
    # That the Job fails after one Pod (its podFailurePolicy) is the real Job controller's doing: tests/cluster.
    status = await models.wait_phase("broken", "Failed", "Serving", "Rejected")
    assert status["phase"] == "Failed", status
    job = names.job_name("broken", "prune", 1, 1)
    assert job in status["message"] and "bad input" in status["message"] and "not retried" in status["message"]
    assert d.ANNOTATION_RETRY in status["message"]
    [event] = await models.wait(lambda: [e for e in models.events("broken") if e["reason"] == "JobFailed"],
                                what="the JobFailed event")
    assert "bad input, not retried" in event["message"] and event["type"] == "Warning"


async def test_approval_required(models):
    status = await models.wait_phase("gated", "AwaitingApproval", "Serving", "Failed", "Rejected")
    assert status["phase"] == "AwaitingApproval", status
    assert not models.children("apps/v1/deployments", "gated")
    await models.patch("gated", {"metadata": {"annotations": {d.ANNOTATION_APPROVE: "1"}}})
    status = await models.wait_phase("gated", "Serving", "Failed")
    assert status["currentRevision"] == 1


async def test_spec_edit_mid_compression_restarts_it(models):
    cluster = models
    await cluster.create(digits_model("edited"))
    first = names.job_name("edited", "prune", 1, 1)
    await cluster.wait(lambda: cluster.api.get("batch/v1/jobs", "default", first), what="the first prune Job")
    await cluster.patch("edited", {"spec": {"compression": {"pruning": {"sparsity": 0.6}}}})
    assert cluster.get("edited")["metadata"]["generation"] == 2
    status = await cluster.wait_phase("edited", "Serving", "Failed", "Rejected")
    assert status["phase"] == "Serving", status
    served = next(r for r in status["revisions"] if r["revision"] == status["currentRevision"])
    assert served["generation"] == 2
    assert cluster.api.get("batch/v1/jobs", "default", first) is None  # the stale Job was deleted
    assert status["observedGeneration"] == 2


async def test_deleting_the_model_removes_its_artifacts(models, cluster):
    # The children go by their ownerReferences, through the real garbage collector (tests/cluster, the e2e
    # cluster target); the emulator has none. The artifact folder is the operator's own to remove.
    await models.wait_phase("happy", "Serving")
    folder = cluster.pvc_root / "kompressor-artifacts" / "store" / "default" / "happy"  # pvc://CLAIM/store
    assert folder.is_dir()
    await cluster.delete("happy")
    await cluster.wait(lambda: cluster.get("happy") is None, 30, "the CR to be gone (finalizer released)")
    assert not folder.exists()
