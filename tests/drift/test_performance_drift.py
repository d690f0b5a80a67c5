"""Performance drift against a real `kompressor serve --feedback`: delayed labels for served requests, cut into
disjoint windows of `window` rows by the server; the watcher judges each completed window once (never the same
evidence twice; a burst that completes several is several windows), wrong labels confirm drift after
consecutiveWindows fresh windows, right labels clear it, a window filling gives no verdict, and a restarted watcher
goes on from its state."""

from __future__ import annotations

import numpy as np
import pytest

from serving_support import N_CLASSES, N_FEATURES, Server, http, infer_body, make_artifact

from kompressor.api import defaults as d
from kompressor.api.spec import CompressedModelSpec, PerformanceDriftSpec
from kompressor.api.status import CompressedModelStatus
from kompressor.core import drift_policy
from kompressor.api.wire import from_wire
from kompressor_jobs.drift.performance import PerformanceWatch

WINDOW, MIN_LABELS, FLOOR = 4, 2, 0.75


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("perf")
    srv = Server(make_artifact(root / "r1", seed=1, revision=1), "tab", log=root / "server.log",
                 extra=["--feedback", "--feedback-window", str(WINDOW)])
    yield srv
    srv.stop()


def served(server: Server, n: int, right: bool) -> list[dict]:
    """Serve n requests; the true label of each: the predicted class (right) or another (wrong)."""
    rng = np.random.default_rng()
    labels = []
    for _ in range(n):
        status, out = http("POST", server.infer_url(), infer_body(rng.normal(size=(1, N_FEATURES))))
        assert status == 200, out
        predicted = int(np.argmax(out["outputs"][0]["data"]))
        labels.append({"id": out["id"], "label": predicted if right else (predicted + 1) % N_CLASSES})
    return labels


def label(server: Server, n: int, right: bool) -> None:
    """Serve n requests, then send each one's true label, one by one."""
    for item in served(server, n, right):
        status, answer = http("POST", f"{server.url}/v2/models/{server.name}/feedback", item)
        assert status == 200, answer


def drain(watch: PerformanceWatch) -> list:
    """Every verdict the watcher has now, each committed (as the watch-drift loop does)."""
    verdicts = []
    while (verdict := watch.check()) is not None:
        watch.commit(verdict)
        verdicts.append(verdict)
    return verdicts


def confirmed(verdict) -> str:
    spec = from_wire(CompressedModelSpec, {"model": {"uri": "builtin://digits-mlp"},
                                           "data": {"train": "builtin://digits?split=train",
                                                    "eval": "builtin://digits?split=eval"},
                                           "drift": {"performance": {"minAccuracy": FLOOR, "window": WINDOW,
                                                                     "minLabels": MIN_LABELS}}}, "spec")
    return drift_policy.read(spec, CompressedModelStatus(current_revision=1, drift=verdict)).state


def test_wrong_labels_confirm_performance_drift_only_on_fresh_windows(server, tmp_path):
    spec = PerformanceDriftSpec(min_accuracy=FLOOR, window=WINDOW, min_labels=MIN_LABELS)
    watch = PerformanceWatch(spec, f"{server.url}/metrics", "tab", 1, state_dir=tmp_path)
    assert watch.check() is None  # no label yet

    label(server, WINDOW - 1, right=False)
    assert watch.check() is None  # too few labels: no verdict, not drift

    label(server, 1, right=False)
    first = watch.check()
    assert (first.outcome, first.is_drift, first.consecutive) == ("Drift", True, 1)
    assert (first.reason, first.accuracy, first.labels, first.min_accuracy) == (
        d.PERFORMANCE_DRIFT_REASON, 0.0, WINDOW, FLOOR)
    watch.commit(first)
    assert confirmed(first) == "suspected"
    assert watch.check() is None  # the same labels again: not counted twice

    restarted = PerformanceWatch(spec, f"{server.url}/metrics", "tab", 1, state_dir=tmp_path)
    assert restarted.check() is None and restarted.consecutive == 1  # goes on from its state

    label(server, WINDOW, right=False)
    second = restarted.check()
    assert (second.outcome, second.consecutive, second.windows) == ("Drift", 2, 2)
    restarted.commit(second)
    assert confirmed(second) == "confirmed"  # consecutiveWindows (2) fresh windows

    label(server, WINDOW, right=True)
    cleared = restarted.check()
    assert (cleared.outcome, cleared.is_drift, cleared.consecutive, cleared.accuracy) == ("NoDrift", False, 0, 1.0)
    assert confirmed(cleared) == "clear"


def test_accuracy_at_the_floor_is_not_drift(server, tmp_path):
    spec = PerformanceDriftSpec(min_accuracy=FLOOR, window=WINDOW, min_labels=MIN_LABELS)
    watch = PerformanceWatch(spec, f"{server.url}/metrics", "tab", 1, state_dir=tmp_path)
    drain(watch)  # whatever windows the other tests completed
    label(server, WINDOW - 1, right=True)
    label(server, 1, right=False)
    [verdict] = drain(watch)
    assert (verdict.accuracy, verdict.outcome, verdict.consecutive) == (0.75, "NoDrift", 0)


def test_a_burst_of_labels_is_as_many_windows_as_it_completes(server, tmp_path):
    spec = PerformanceDriftSpec(min_accuracy=FLOOR, window=WINDOW, min_labels=MIN_LABELS)
    watch = PerformanceWatch(spec, f"{server.url}/metrics", "tab", 1, state_dir=tmp_path)
    drain(watch)  # whatever windows the other tests completed
    before = watch.state.windows
    burst = served(server, 2 * WINDOW + 1, right=False)  # two windows and one row of a third, in one list
    status, answer = http("POST", f"{server.url}/v2/models/{server.name}/feedback", burst)
    assert status == 200 and answer["accepted"] == len(burst), answer
    verdicts = drain(watch)
    assert [(v.outcome, v.consecutive, v.accuracy) for v in verdicts] == [("Drift", 1, 0.0), ("Drift", 2, 0.0)]
    assert [v.windows for v in verdicts] == [before + 1, before + 2]
    assert confirmed(verdicts[-1]) == "confirmed"  # consecutiveWindows from one burst, as for captured rows
    status, windows = http("GET", f"{server.url}/v2/models/{server.name}/feedback/windows")
    assert status == 200 and windows["size"] == WINDOW and windows["revisions"]["1"]["filling"] == 1
    label(server, WINDOW - 1, right=True)  # the third window completes: judged next, and nothing twice
    [third] = drain(watch)
    assert (third.outcome, third.accuracy, third.labels_seen) == ("NoDrift", (WINDOW - 1) / WINDOW,
                                                                  verdicts[-1].labels_seen + WINDOW)


@pytest.mark.slow
def test_watch_drift_publishes_performance_verdicts_beside_the_data_checks(tmp_path):
    """The real `kompressor watch-drift --once --serving-metrics-url`: each run with `window` fresh wrong labels
    raises the count in the verdict file; the data checks' verdicts (too few rows yet) never hide it; right labels
    clear it."""
    import json

    from drift_support import tabular_rows, write_spec

    from kompressor.cli import main as kompressor

    rng = np.random.default_rng(0)
    reference = tmp_path / "reference.npz"
    np.savez(reference, X=tabular_rows(rng, 400), y=np.zeros(400, np.int64))
    spec = write_spec(tmp_path, f"file://{reference}", windowSize=100, consecutiveWindows=2,
                      performance={"minAccuracy": FLOOR, "window": WINDOW, "minLabels": MIN_LABELS})
    srv = Server(make_artifact(tmp_path / "r1", seed=1, revision=1), "tab", capture=tmp_path / "capture",
                 log=tmp_path / "server.log", extra=["--feedback", "--feedback-window", str(WINDOW)])
    sink = tmp_path / "verdict.json"

    def watch() -> dict:
        assert kompressor(["--json-logs", "watch-drift", "--spec", str(spec), "--capture", str(tmp_path / "capture"),
                           "--verdict", str(sink), "--revision", "1", "--once",
                           "--serving-metrics-url", f"{srv.url}/metrics"]) == 0
        return json.loads(sink.read_text())

    try:
        label(srv, WINDOW, right=False)
        first = watch()
        assert (first["reason"], first["outcome"], first["consecutive"]) == (d.PERFORMANCE_DRIFT_REASON, "Drift", 1)
        label(srv, WINDOW, right=False)
        second = watch()
        assert (second["reason"], second["consecutive"], second["windows"], second["labelsSeen"]) == (
            d.PERFORMANCE_DRIFT_REASON, 2, 2, 2 * WINDOW)
        assert watch() == second  # no new labels: nothing counted again
        history = [json.loads(line) for line in sink.with_name("verdict.history.jsonl").read_text().splitlines()]
        assert [(v.get("reason"), v["consecutive"]) for v in history[-2:]] == [
            (d.PERFORMANCE_DRIFT_REASON, 1), (d.PERFORMANCE_DRIFT_REASON, 2)]
        label(srv, WINDOW, right=True)
        cleared = watch()
        assert (cleared["reason"], cleared["outcome"], cleared["consecutive"]) == (
            d.PERFORMANCE_DRIFT_REASON, "NoDrift", 0)
    finally:
        srv.stop()
