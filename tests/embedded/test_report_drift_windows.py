"""The report's drift p-value plot has one point per tested window: every window the watcher wrote (its
verdict history), even when several were tested between two reads of the verdict file, and a window seen
twice (the runner's copy and the watcher's line) only once."""

from __future__ import annotations

import json

from kompressor.embedded.report import collect, drift_points, write_report


def verdict(first, p, revision=1, checked="2026-12-01T10:00:00Z", **extra):
    return {"revision": revision, "outcome": "Drift" if p < 0.05 else "NoDrift", "isDrift": p < 0.05,
            "pValue": p, "threshold": 0.05, "checkedAt": checked, "samples": 100, "firstSequence": first,
            "lastSequence": first + 99, "servingSinceSequence": 0, **extra}


def test_one_point_per_window(tmp_path):
    model_dir = tmp_path / "default" / "digits"
    model_dir.mkdir(parents=True)
    (model_dir / "status.json").write_text(json.dumps({"phase": "Serving", "currentRevision": 1}))
    # the watcher tested a burst of three windows in one second; the runner saw only the newest verdict file
    windows = [verdict(0, 0.4), verdict(100, 0.01), verdict(200, 0.001)]
    (model_dir / "verdict.history.jsonl").write_text("".join(json.dumps(v) + "\n" for v in windows))
    (model_dir / "drift.jsonl").write_text(json.dumps({**windows[-1], "seenAt": "x"}) + "\n")
    [record] = collect(tmp_path)
    points = drift_points(record)
    assert [p["firstSequence"] for p in points] == [0, 100, 200]

    # the same window twice (a watcher restarted before its state was saved re-wrote it): one point
    (model_dir / "verdict.history.jsonl").write_text(
        "".join(json.dumps(v) + "\n" for v in [*windows, verdict(200, 0.001, checked="2026-12-01T10:00:05Z")]))
    [record] = collect(tmp_path)
    assert [p["firstSequence"] for p in drift_points(record)] == [0, 100, 200]

    # without the watcher's history, the runner's copies are the points
    (model_dir / "verdict.history.jsonl").unlink()
    [record] = collect(tmp_path)
    assert [p["firstSequence"] for p in drift_points(record)] == [200]
    assert "One point per window" in write_report(tmp_path).read_text()
