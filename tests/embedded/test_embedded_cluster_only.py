"""The embedded mode runs one local server per model: spec.serving.autoscaling (an HPA and a
PodDisruptionBudget in a cluster) is accepted, said to be a cluster feature in the log, and ignored."""

from __future__ import annotations

import json

from kompressor.api.manifest import parse_manifest
from kompressor.embedded.runner import ModelRunner
from support.cluster import digits_model

AUTOSCALING = {"minReplicas": 2, "maxReplicas": 4, "targetConcurrency": 8}


def _events(err: str) -> list[dict]:
    return [json.loads(line) for line in err.splitlines() if line.startswith("{")]


def _cluster_only(err: str) -> list[dict]:
    return [e for e in _events(err) if "autoscaling" in e["event"]]


async def test_autoscaling_is_logged_as_a_cluster_feature_and_ignored(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KOMPRESSOR_JSON_LOGS", "1")
    runner = ModelRunner(parse_manifest(digits_model("auto", serving={"autoscaling": AUTOSCALING})), tmp_path, 18080)
    [event] = _cluster_only(capsys.readouterr().err)
    assert "cluster feature" in event["event"] and event["model"] == "default/auto"
    assert runner.serving.port == 18080  # one local server, as without autoscaling

    runner.update(parse_manifest(digits_model("auto", serving={"replicas": 1})))  # dropped: nothing to say
    assert _cluster_only(capsys.readouterr().err) == []
    runner.update(parse_manifest(digits_model("auto", serving={"autoscaling": {**AUTOSCALING, "maxReplicas": 6}})))
    assert len(_cluster_only(capsys.readouterr().err)) == 1  # said again for the generation that sets it
