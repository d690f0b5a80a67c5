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


async def test_feedback_token_secret_is_a_cluster_feature_and_performance_reaches_local_serving(
        tmp_path, monkeypatch, capsys):
    """spec.serving.feedback.tokenSecretRef names a cluster Secret: logged and ignored (the local endpoint listens
    on 127.0.0.1); spec.drift.performance is taken up by the local server and watcher."""
    monkeypatch.setenv("KOMPRESSOR_JSON_LOGS", "1")
    spec = {"serving": {"feedback": {"tokenSecretRef": {"name": "labels-token"}}},
            "drift": {"enabled": True, "performance": {"minAccuracy": 0.9, "window": 50, "minLabels": 10}}}
    runner = ModelRunner(parse_manifest(digits_model("perf", **spec)), tmp_path, 18081)
    [event] = [e for e in _events(capsys.readouterr().err) if "tokenSecretRef" in e["event"]]
    assert "cluster feature" in event["event"] and event["model"] == "default/perf"
    assert (runner.serving.performance.min_accuracy, runner.serving.performance.window) == (0.9, 50)
    runner.update(parse_manifest(digits_model("perf", drift={**spec["drift"], "enabled": False})))
    assert runner.serving.performance is None  # no watcher: no feedback endpoint either
