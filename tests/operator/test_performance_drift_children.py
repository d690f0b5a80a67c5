"""spec.drift.performance in a cluster: the serving Pod runs `kompressor serve --feedback --feedback-window` with
one worker (whatever serving.workers says), spec.serving.feedback.tokenSecretRef is mounted read-only and passed
as --feedback-token-file, and the watcher reads the serving Service's /metrics; all valid for Kubernetes 1.30
and Pod Security "restricted". Unset: none of it."""

from __future__ import annotations

import copy

import kubernetes_validate
import pytest

from kompressor.api.spec import FeedbackSpec, PerformanceDriftSpec, SecretKeyRef
from kompressor.cli import build_parser
from kompressor.core import names
from test_child_objects import K8S_VERSION, MODELS, children_of, container, pod_specs, restricted_violations


def model(performance: bool, token: bool):
    cm = copy.deepcopy(next(iter(MODELS)))
    cm.spec.serving.workers = 4
    if performance:
        cm.spec.drift.performance = PerformanceDriftSpec(min_accuracy=0.9, window=200, min_labels=50)
    if token:
        cm.spec.serving.feedback = FeedbackSpec(token_secret_ref=SecretKeyRef(name="labels-token", key="bearer"))
    return cm


@pytest.mark.parametrize("token", [True, False])
def test_performance_drift_turns_the_feedback_endpoint_on_with_one_worker(token):
    cm = model(performance=True, token=token)
    objs = children_of(cm)
    serving, watcher = container(objs, "serving"), container(objs, "drift-watcher")
    args = build_parser().parse_args(serving["command"][1:])
    assert (args.feedback, args.feedback_window, args.workers) == (True, 200, 1)
    watch = build_parser().parse_args(watcher["command"][1:])
    assert watch.serving_metrics_url == (f"http://{names.serving_name(cm.name)}.{cm.namespace}.svc:"
                                         f"{cm.spec.serving.port}/metrics")
    [deployment] = [o for o in objs if o["kind"] == "Deployment"
                    and o["metadata"]["labels"]["app.kubernetes.io/component"] == "serving"]
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    if token:
        mount = next(m for m in serving["volumeMounts"] if m["name"] == "feedback-token")
        assert mount["readOnly"] is True and args.feedback_token_file == f"{mount['mountPath']}/bearer"
        assert volumes["feedback-token"]["secret"] == {"secretName": "labels-token", "defaultMode": 0o400,
                                                       "items": [{"key": "bearer", "path": "bearer"}]}
    else:
        assert args.feedback_token_file is None and "feedback-token" not in volumes
    for obj in (o for o in objs if o["kind"] == "Deployment"):
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    for where, pod in pod_specs(objs):
        assert restricted_violations(pod) == [], where


def test_without_performance_drift_nothing_changes_even_with_a_token():
    objs = children_of(model(performance=False, token=True))
    args = build_parser().parse_args(container(objs, "serving")["command"][1:])
    assert (args.feedback, args.feedback_token_file, args.workers) == (False, None, 4)
    assert build_parser().parse_args(container(objs, "drift-watcher")["command"][1:]).serving_metrics_url is None
