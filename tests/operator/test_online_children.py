"""What the operator builds and reads for an online stage: the serving Pod's command with the candidate beside
the serving revision, and the serving Pods whose evidence counts."""

from __future__ import annotations

from kompressor.api import defaults as d
from kompressor.api.manifest import parse_manifest
from kompressor.api.status import Artifact
from kompressor.cli import build_parser
from kompressor.core.actions import OnlineCandidate, Serve
from kompressor.k8s import children
from kompressor.k8s.online import ready_pod_ips
from kompressor.k8s.storage import pod_store
from kompressor.online_evidence import reading_from

STORE = "pvc://kompressor-artifacts/artifacts"


def model(promotion: dict, serving: dict | None = None):
    return parse_manifest({
        "apiVersion": d.API_VERSION, "kind": d.KIND,
        "metadata": {"name": "digits", "namespace": "ml", "uid": "u1", "generation": 1},
        "spec": {"model": {"uri": "builtin://digits-mlp"},
                 "data": {"train": "builtin://digits?split=train", "eval": "builtin://digits?split=eval"},
                 "serving": {"workers": 4, **(serving or {})}, "promotion": promotion}})


def serve_command(cm, candidate: OnlineCandidate | None) -> list[str]:
    serve = Serve(0, Artifact(uri=f"{STORE}/default/digits/r0", sha256="a" * 64), drift_reference=None,
                  candidate=candidate)
    deployment = children.serving_deployment(cm, serve, pod_store(STORE))
    return deployment["spec"]["template"]["spec"]["containers"][0]["command"]


def test_a_canary_candidate_reaches_the_serve_command_that_the_real_parser_accepts():
    cm = model({"strategy": "canary", "onlineGates": {"minAccuracy": 0.9}})
    candidate = OnlineCandidate(revision=3, artifact=Artifact(uri=f"{STORE}/default/digits/r3", sha256="b" * 64),
                                mode="canary", weight=10.0)
    argv = serve_command(cm, candidate)
    args = build_parser().parse_args(argv[1:])
    assert args.candidate.endswith("/default/digits/r3") and args.candidate.startswith("/")
    assert (args.candidate_sha256, args.candidate_mode, args.candidate_weight) == ("b" * 64, "canary", 10.0)
    assert args.workers == 1  # the evidence is per process: one worker, whatever spec.serving.workers says
    assert args.feedback and args.task == "classification"  # minAccuracy takes labels


def test_without_a_candidate_or_under_direct_the_command_has_no_candidate():
    staged = serve_command(model({"strategy": "shadow"}), None)
    assert "--candidate" not in staged and "--feedback" not in staged and "--task" in staged
    direct = serve_command(model({}), None)
    assert "--task" not in direct and build_parser().parse_args(direct[1:]).workers == 4


def test_only_ready_pods_that_are_not_terminating_are_read():
    def pod(ip, ready, deleting=False):
        meta = {"name": ip, **({"deletionTimestamp": "2026-12-02T00:00:00Z"} if deleting else {})}
        return {"metadata": meta, "status": {"podIP": ip, "conditions": [
            {"type": "Ready", "status": "True" if ready else "False"}]}}

    pods = [pod("10.0.0.2", True), pod("10.0.0.1", True), pod("10.0.0.3", False), pod("10.0.0.4", True, True),
            {"metadata": {"name": "pending"}, "status": {}}]
    assert ready_pod_ips(pods) == ["10.0.0.1", "10.0.0.2"]


def test_an_evidence_answer_becomes_a_reading_keyed_by_process_and_candidate():
    buckets = len(d.ONLINE_LATENCY_BUCKETS) + 1
    body = {"instance": "abc", "serving": {"revision": 0}, "candidate": {
        "revision": 3, "sha256": "b" * 64, "mode": "shadow", "weight": 0, "requests": 5, "errors": 1, "dropped": 2,
        "compared": 4, "agreement": 3.5, "labels": 2, "right": 1, "serving_labels": 0, "serving_right": 0,
        "latency_buckets": list(d.ONLINE_LATENCY_BUCKETS) + [None], "candidate_latency": [0] * buckets,
        "serving_latency": [0] * buckets, "since": "2026-12-02T08:00:00Z"}}
    reading = reading_from(body)
    assert reading.source == "abc/2026-12-02T08:00:00Z" and reading.revision == 3 and reading.mode == "shadow"
    assert (reading.counts.requests, reading.counts.errors, reading.counts.agreement) == (5, 1, 3.5)
    assert reading_from({"instance": "abc", "candidate": None}) is None
    assert reading_from({"instance": "abc", "candidate": {"revision": 3}}) is None  # unreadable: ignored


def test_the_operator_exports_the_online_stage_and_forgets_it_when_it_ends():
    from prometheus_client import CollectorRegistry

    from kompressor.api.status import CompressedModelStatus, OnlineCounts, OnlineStage, OnlineVerdict, Revision
    from kompressor.k8s.metrics import OperatorMetrics

    registry = CollectorRegistry()
    metrics = OperatorMetrics(registry)
    staged = CompressedModelStatus(phase="Canary", current_revision=0, revisions=[Revision(revision=0),
                                                                                 Revision(revision=1)],
                                   online=OnlineStage(revision=1, strategy="canary", weight=10.0,
                                                      totals=OnlineCounts(requests=50, compared=40, agreement=30.0)))
    metrics.observe_status("ml", "digits", CompressedModelStatus(), staged)
    labels = {"namespace": "ml", "name": "digits", "revision": "1", "strategy": "canary"}
    assert registry.get_sample_value("kompressor_online_stage_weight", labels) == 10.0
    assert registry.get_sample_value("kompressor_online_stage_requests", labels) == 50
    assert registry.get_sample_value("kompressor_online_stage_agreement", labels) == 0.75

    ended = CompressedModelStatus(phase="Rejected", current_revision=0, revisions=[
        Revision(revision=0), Revision(revision=1, online=OnlineVerdict(strategy="canary", outcome="Failed"))])
    metrics.observe_status("ml", "digits", staged, ended)
    assert registry.get_sample_value("kompressor_online_stage_weight", labels) is None
    assert registry.get_sample_value("kompressor_online_stage_verdicts_total", {"strategy": "canary",
                                                                          "outcome": "Failed"}) == 1
