"""`kompressor run` with spec.drift.performance, end to end on builtin digits: the local server takes delayed true
labels for the requests it answered; when they show the online accuracy below the floor for consecutiveWindows
fresh windows, the drift action (here: roll back to the baseline) runs, with the PerformanceDriftDetected event
and PerformanceDrift verdicts in status.drift."""

from __future__ import annotations

import copy
import json
import urllib.request

import numpy as np
import pytest

from kompressor.api import defaults as d
from kompressor.embedded.layout import read_jsonl
from runner_process import DIGITS, RunnerProcess, write_manifest
from support.net import free_port

pytestmark = pytest.mark.slow
WINDOW, CONSECUTIVE = 10, 2


def post(url: str, body) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def test_delayed_wrong_labels_roll_back_to_the_baseline(tmp_path, job_env):
    from kompressor_jobs.data import load_dataset

    doc = copy.deepcopy(DIGITS)
    doc["spec"]["drift"].update(consecutiveWindows=CONSECUTIVE,
                                performance={"minAccuracy": 0.5, "window": WINDOW, "minLabels": WINDOW // 2})
    manifest = tmp_path / "cm.yaml"
    write_manifest(manifest, doc)
    runner = RunnerProcess(manifest, tmp_path / "work", free_port(), job_env)
    try:
        runner.wait_status("serving revision 1", lambda s: s.get("phase") == "Serving"
                           and s.get("currentRevision") == 1, 300)
        base = f"http://127.0.0.1:{runner.port}/v2/models/digits"
        rows = load_dataset("builtin://digits?split=eval").X[:WINDOW * CONSECUTIVE]  # the reference's own rows
        predicted = {}
        for i, row in enumerate(rows):  # served now...
            answer = post(f"{base}/infer", {"id": f"r{i}", "inputs": [{"name": "input", "shape": [1, *row.shape],
                                                                      "datatype": "FP32",
                                                                      "data": row.flatten().tolist()}]})
            predicted[answer["id"]] = int(np.argmax(answer["outputs"][0]["data"]))
        ids = list(predicted)
        for window in range(CONSECUTIVE):  # ...labelled later, a window at a time, every label disagreeing
            for request_id in ids[window * WINDOW:(window + 1) * WINDOW]:
                label = (predicted[request_id] + 1) % 10
                assert post(f"{base}/feedback", {"id": request_id, "label": label})["status"] == "accepted"
            if window + 1 < CONSECUTIVE:
                runner.wait_status(f"performance verdict {window + 1}", lambda s, n=window + 1: (
                    (s.get("drift") or {}).get("reason") == d.PERFORMANCE_DRIFT_REASON
                    and s["drift"]["consecutive"] == n), 60)

        done = runner.wait_status("rolled back to the baseline", lambda s: s.get("phase") == "Serving"
                                  and s.get("currentRevision") == d.BASELINE_REVISION, 120)
        reasons = [e["reason"] for e in read_jsonl(runner.model_dir() / "events.jsonl")]
        assert "PerformanceDriftDetected" in reasons and "DriftDetected" not in reasons
        assert reasons.index("PerformanceDriftDetected") < reasons.index("RollingBack")
        verdicts = [v for v in read_jsonl(runner.model_dir() / "drift.jsonl") if v.get("revision") == 1]
        acted_on = [v for v in verdicts if v.get("reason") == d.PERFORMANCE_DRIFT_REASON]
        assert [v["consecutive"] for v in acted_on] == list(range(1, CONSECUTIVE + 1))
        assert all(v["accuracy"] < 0.5 and v["labels"] == WINDOW for v in acted_on)
        assert done["autoActions"] == 1
    finally:
        runner.kill()
