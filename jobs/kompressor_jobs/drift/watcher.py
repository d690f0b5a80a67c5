"""The watch loop: read captured rows, check them, count drifting checks, hand verdicts to a sink."""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from kompressor.api.manifest import CompressedModel, load_manifests
from kompressor.api.status import DriftVerdict
from kompressor.console import log
from kompressor.errors import UserError
from kompressor_jobs import capture
from kompressor_jobs.drift.detectors import Check, Detector, OnlineDetector, build_detector

POSITION_FILE = "position.json"
DETECTOR_STATE = "detector"


def pick_model(spec_path: str, verdict_target: str) -> CompressedModel:
    models = load_manifests(spec_path)
    if len(models) == 1:
        return models[0]
    name = verdict_target.rstrip("/").rsplit("/", 1)[-1] if verdict_target.startswith("k8s://") else None
    matching = [m for m in models if m.name == name]
    if len(matching) != 1:
        raise UserError(f"{spec_path}: holds {len(models)} CompressedModels; give a file with one")
    return matching[0]


def reference_rows(cm: CompressedModel, uri: str | None) -> tuple[np.ndarray, str]:
    from kompressor_jobs.data import load_dataset

    uri = uri or cm.spec.data.reference or cm.spec.data.eval
    data = load_dataset(uri)
    return data.X.reshape(len(data.X), -1).astype(np.float32), uri


def next_verdict(check: Check, previous: DriftVerdict | None, revision: int | None, detector: str) -> DriftVerdict:
    """The verdict for ``check``; ``consecutive`` continues the previous verdict's count when that one was
    about the same revision, and restarts at 0 on any check that is not Drift."""
    carried = previous.consecutive if previous is not None and previous.revision == revision else 0
    return DriftVerdict(
        is_drift=check.is_drift, outcome=check.outcome, p_value=check.p_value, distance=check.distance,
        threshold=check.threshold, samples=check.samples, consecutive=carried + 1 if check.is_drift else 0,
        checked_at=datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z"),
        revision=revision, detector=detector, feature_p_values=check.feature_p_values,
    )


class Watcher:
    def __init__(self, detector: Detector, capture_dir: str | Path, revision: int | None,
                 state_dir: str | Path | None = None, n_features: int | None = None):
        self.detector = detector
        self.n_features = n_features
        self.capture_dir = Path(capture_dir)
        self.revision = revision
        self.state_dir = Path(state_dir) if state_dir else None
        self.position = capture.Position()
        self._mark: tuple | None = None
        if isinstance(detector, OnlineDetector) and self.state_dir:
            self._resume()

    def _resume(self) -> None:
        folder = self.state_dir / DETECTOR_STATE
        saved = _read_json(folder / POSITION_FILE)
        if not saved or saved.get("revision") != self.revision:
            return  # nothing saved, or a new revision: a new stream
        if self.detector.load_state(folder):
            self.position = capture.Position(int(saved["seq"]), int(saved["records"]))
            log("online detector resumed", t=self.detector.t, seq=self.position.seq, records=self.position.records)

    def has_new_rows(self) -> bool:
        """Whether anything was captured since the last call (cheap: newest segment and its size)."""
        segments = [seg for seg in capture.list_segments(self.capture_dir)
                    if self.revision is None or seg.revision == self.revision]
        try:
            mark = (segments[-1].seq, segments[-1].path.stat().st_size) if segments else None
        except FileNotFoundError:  # dropped by the size cap just now
            mark = None
        changed, self._mark = mark != self._mark, mark
        return changed

    def forget_mark(self) -> None:
        """Make the next has_new_rows() answer True (re-check after a failed write)."""
        self._mark = None

    def check(self) -> Check:
        if isinstance(self.detector, OnlineDetector):
            rows, self.position = capture.read_since(self.capture_dir, self.position, self.revision)
            self._check_width(rows)
            found = self.detector.check(rows)
            if self.state_dir:
                self._save_state()
            return found
        rows = capture.read_newest(self.capture_dir, self.detector.rows_needed, self.revision)
        self._check_width(rows)
        return self.detector.check(rows)

    def _check_width(self, rows: np.ndarray | None) -> None:
        if rows is not None and self.n_features is not None and rows.shape[1] != self.n_features:
            raise UserError(f"{self.capture_dir}: captured rows have {rows.shape[1]} features, the reference "
                            f"data has {self.n_features}; is --reference the data this model is served on?")

    def _save_state(self) -> None:
        """Detector state and capture position together, in a new folder swapped in by renames, so a crash
        leaves either the old pair or the new one."""
        target = self.state_dir / DETECTOR_STATE
        fresh, stale = self.state_dir / f".{DETECTOR_STATE}.new", self.state_dir / f".{DETECTOR_STATE}.old"
        for leftover in (fresh, stale):
            shutil.rmtree(leftover, ignore_errors=True)
        fresh.mkdir(parents=True)
        self.detector.save_state(fresh)
        _write_json(fresh / POSITION_FILE, {**asdict(self.position), "revision": self.revision})
        if target.exists():
            os.replace(target, stale)
        os.replace(fresh, target)
        shutil.rmtree(stale, ignore_errors=True)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return None


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def run(args) -> int:
    from kompressor_jobs.drift.metrics import DriftMetrics
    from kompressor_jobs.drift.sinks import open_sink

    cm = pick_model(args.spec, args.verdict)
    spec = cm.spec.drift
    sink = open_sink(args.verdict)
    x_ref, uri = reference_rows(cm, args.reference)
    log("building drift detector", detector=spec.detector, mode=spec.mode, reference=uri, rows=len(x_ref),
        features=x_ref.shape[1])
    detector = build_detector(spec, x_ref)
    watcher = Watcher(detector, args.capture, args.revision, args.state, n_features=x_ref.shape[1])
    metrics = DriftMetrics(cm.name, args.metrics_port) if args.metrics_port else None
    previous = sink.read()
    while True:
        if args.once or watcher.has_new_rows():
            found = watcher.check()
            verdict = next_verdict(found, previous, args.revision, detector.name)
            try:
                sink.write(verdict)
            except Exception as err:  # e.g. the API server briefly unreachable: keep watching, retry next time
                if args.once:
                    raise
                log("could not write the drift verdict", level="warning", sink=str(sink), error=str(err))
                watcher.forget_mark()  # check again next time; the count goes on from the last verdict written
                time.sleep(spec.check_interval_seconds)
                continue
            previous = verdict
            if metrics:
                metrics.observe(verdict)
            log("drift check", outcome=verdict.outcome, p_value=verdict.p_value, distance=verdict.distance,
                samples=verdict.samples, consecutive=verdict.consecutive, revision=args.revision,
                sink=str(sink))
        if args.once:
            return 0
        time.sleep(spec.check_interval_seconds)
