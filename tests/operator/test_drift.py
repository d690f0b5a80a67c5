"""Drift control end to end: really shifted traffic over HTTP to the served model, the real
drift watcher (`kompressor watch-drift --verdict k8s://...`) patching status.drift through the
API, and the operator acting on it: rollback, retrain, hysteresis, pause after maxAutoActions."""

import asyncio
import contextlib

import aiohttp
import numpy as np
import pytest
import pytest_asyncio

from support.cluster import digits_model

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]

DRIFT = {"enabled": True, "detector": "ks", "windowSize": 50, "checkIntervalSeconds": 1, "cooldownSeconds": 0}
MODELS = {
    "rollback": digits_model("rollback", drift={**DRIFT, "consecutiveWindows": 2, "action": "rollback"}),
    # Retraining fine-tunes (1 epoch) on recent data that is not the training split (written by the fixture):
    # a "retrained" revision that merely re-pruned the same model on the same data would be bit-identical.
    "retrain": digits_model("retrain", compression={"pruning": {"fineTuneEpochs": 1}},
                            drift={**DRIFT, "consecutiveWindows": 2, "action": "retrain", "maxAutoActions": 1}),
    "steady": digits_model("steady", drift={**DRIFT, "consecutiveWindows": 100, "action": "rollback"}),
}


def shifted_rows(n: int = 25, shift: float = 4.0, seed: int = 0) -> np.ndarray:
    from kompressor_jobs.data import load_dataset

    X = load_dataset("builtin://digits?split=eval").X
    rows = X[np.random.default_rng(seed).choice(len(X), n)]
    return (rows + shift).astype(np.float32)


async def send_traffic(cluster, name: str, rows: np.ndarray) -> None:
    """Keep sending shifted requests to whatever process serves ``name`` now."""
    async with aiohttp.ClientSession() as session:
        while True:
            port = cluster.controllers.ports.get(("default", f"{name}-serving"))
            if port:
                with contextlib.suppress(aiohttp.ClientError):
                    async with session.get(f"http://127.0.0.1:{port}/v2/models/{name}") as resp:
                        input_name = (await resp.json())["inputs"][0]["name"]
                    body = {"inputs": [{"name": input_name, "shape": list(rows.shape), "datatype": "FP32",
                                        "data": rows.ravel().tolist()}]}
                    async with session.post(f"http://127.0.0.1:{port}/v2/models/{name}/infer", json=body) as resp:
                        await resp.read()
            await asyncio.sleep(0.2)


@contextlib.asynccontextmanager
async def traffic(cluster, name: str):
    task = asyncio.create_task(send_traffic(cluster, name, shifted_rows()))
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def models(cluster):
    from kompressor_jobs.data import load_dataset

    train = load_dataset("builtin://digits?split=train")
    recent = cluster.workdir / "recent.npz"  # "recent labelled traffic": a different sample of digits
    pick = np.random.default_rng(1).choice(len(train), 500, replace=False)
    np.savez(recent, X=train.X[pick], y=train.y[pick])
    MODELS["retrain"]["spec"]["data"]["retrain"] = recent.as_uri()
    for body in MODELS.values():
        await cluster.create(body)
    return cluster


def artifact_manifest(cluster, revision: dict) -> dict:
    import json
    import os

    from kompressor.store import resolve_local

    os.environ["KOMPRESSOR_PVC_ROOT"] = cluster.env["KOMPRESSOR_PVC_ROOT"]
    return json.loads((resolve_local(revision["artifact"]["uri"]) / "manifest.json").read_text())


def event_reasons(cluster, name):
    return [e["reason"] for e in cluster.events(name)]


async def test_one_drifting_check_alone_does_not_act(models):
    cluster = models
    await cluster.wait_phase("steady", "Serving")
    async with traffic(cluster, "steady"):
        await cluster.wait(lambda: (cluster.status("steady").get("drift") or {}).get("isDrift"), 120,
                           "the watcher to report drift")
        drifted = lambda: next((c for c in cluster.status("steady").get("conditions", [])  # noqa: E731
                                if c["type"] == "Drifted"), {})
        await cluster.wait(lambda: drifted().get("reason") == "DriftSuspected", 30, "drift to be suspected")
    status = cluster.status("steady")
    assert status["phase"] == "Serving" and status["currentRevision"] == 1
    assert "RollingBack" not in event_reasons(cluster, "steady")
    assert len(cluster.jobs("steady")) == 2  # no new compression


async def test_drift_rolls_back_to_the_previous_revision(models):
    cluster = models
    await cluster.wait_phase("rollback", "Serving")
    await cluster.patch("rollback", {"spec": {"compression": {"pruning": {"sparsity": 0.6}}}})
    await cluster.wait(lambda: cluster.status("rollback").get("currentRevision") == 2
                       and cluster.status("rollback").get("phase") == "Serving", 180, "revision 2 served")
    deployment = lambda: cluster.api.get("apps/v1/deployments", "default", "rollback-serving")  # noqa: E731
    async with traffic(cluster, "rollback"):
        await cluster.wait(lambda: "RollingBack" in event_reasons(cluster, "rollback"), 120, "a rollback")
        await cluster.wait(lambda: deployment()["metadata"]["labels"]["kompressor.io/revision"] == "1", 30,
                           "the serving Deployment to serve revision 1 again")
    status = cluster.status("rollback")
    assert status["currentRevision"] == 1
    assert status["lastPromotedRevision"] == 2
    assert cluster.status("rollback")["drift"]["revision"] in (1, 2)


async def test_drift_retrains_a_new_revision_then_pauses_after_max_auto_actions(models):
    cluster = models
    await cluster.wait_phase("retrain", "Serving")
    async with traffic(cluster, "retrain"):
        await cluster.wait(lambda: "Retraining" in event_reasons(cluster, "retrain"), 120, "a retrain")
        await cluster.wait(lambda: cluster.status("retrain").get("currentRevision") == 2, 180,
                           "the retrained revision 2 to be served")
        revisions = {r["revision"]: r for r in cluster.status("retrain")["revisions"]}
        revision = revisions[2]
        assert revision["reason"] == "retrain"
        # really retrained: fine-tuned on the retrain data, so a different model from revision 1
        manifest = artifact_manifest(cluster, revision)
        assert manifest["data"]["retrain"] is True
        assert manifest["data"]["train"]["uri"] == MODELS["retrain"]["spec"]["data"]["retrain"]
        assert manifest["achieved"]["fineTuneSeconds"] > 0
        assert revision["artifact"]["sha256"] != revisions[1]["artifact"]["sha256"]
        prune = cluster.api.get("batch/v1/jobs", "default", "retrain-r2-g1-prune")
        assert "--retrain" in prune["spec"]["template"]["spec"]["containers"][0]["command"]
        # Still drifting: maxAutoActions 1 is reached, so the operator pauses instead of acting again.
        status = await cluster.wait_phase("retrain", "Paused", timeout=120)
    assert "maxAutoActions" in status["message"]
    # The status is written first, then the Event (the core's actions) is posted.
    await cluster.wait(lambda: "AutoActionsExhausted" in event_reasons(cluster, "retrain"), 10, "the Event")
    assert status["retrains"] == 1
