"""Performance drift (``spec.drift.performance``): the serving revision's online accuracy, from the ground-truth
labels ``kompressor serve --feedback`` takes, read from the serving process' ``/metrics``.

- **What is read.** ``kompressor_online_accuracy`` and ``kompressor_online_accuracy_labels`` (the accuracy over
  the server's ``--feedback-window`` last labelled predictions of the revision, and how many there are) and
  ``kompressor_feedback_labels_accepted`` (labels accepted for the revision so far, a counter).
- **Fresh evidence only.** A check counts once ``window`` new labels were accepted since the last counted check.
  The server runs with ``--feedback-window window`` (commands.serve_argv), so the accuracy then judged is over
  labels no earlier check saw: disjoint windows, as data drift's. Between two such checks nothing is written; a
  polled accuracy that did not move is never counted twice. A counter that went down (the serving process
  restarted) starts over from 0.
- **The verdict** (reason ``PerformanceDrift``): fewer than ``minLabels`` labelled predictions in the window is
  Inconclusive (the count kept, never drift); accuracy below ``minAccuracy`` is a drifting window
  (``consecutive`` + 1), else NoDrift (``consecutive`` 0). The core confirms it after ``consecutiveWindows`` in
  a row and acts on it as on data drift.
- **Restarts.** Where it stands (the counter at the last counted check, ``consecutive``, ``windows``) is kept in
  ``--state`` (``performance-r<revision>.json``) and in the verdict (``labelsSeen``); a restart goes on from the
  newer of the two.
"""

from __future__ import annotations

import json
import math
import os
import urllib.request
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from kompressor.api import defaults as d
from kompressor.api.spec import PerformanceDriftSpec
from kompressor.api.status import DriftVerdict
from kompressor.console import log

ACCURACY, LABELS, ACCEPTED = ("kompressor_online_accuracy", "kompressor_online_accuracy_labels",
                              "kompressor_feedback_labels_accepted")
STATE_FILE = "performance-r{revision}.json"
DETECTOR = "online-accuracy"
FETCH_TIMEOUT_SECONDS = 5.0


@dataclass
class Reading:
    """What the serving process says about one revision's labels."""

    accuracy: float | None  # None: no label yet
    labels: int  # labelled predictions in its window
    accepted: int  # labels accepted so far (a counter of this process)


def read_metrics(url: str, model: str, revision: int | None) -> Reading:
    """The revision's online accuracy, window size and accepted labels from a Prometheus text page at ``url``."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=FETCH_TIMEOUT_SECONDS) as response:  # noqa: S310 (our own server)
        text = response.read().decode()
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name not in (ACCURACY, LABELS, ACCEPTED + "_total", ACCEPTED):
                continue
            if sample.labels.get("model") != model:
                continue
            if revision is not None and sample.labels.get("revision") != str(revision):
                continue
            found[sample.name.removesuffix("_total")] = sample.value
    accuracy = found.get(ACCURACY)
    return Reading(accuracy=None if accuracy is None or math.isnan(accuracy) else accuracy,
                   labels=int(found.get(LABELS, 0)), accepted=int(found.get(ACCEPTED, 0)))


@dataclass
class PerformanceState:
    revision: int | None
    labels_seen: int = 0  # the accepted counter at the last counted check
    consecutive: int = 0
    windows: int = 0


class PerformanceWatch:
    """Online-accuracy checks of one serving revision, each on ``window`` fresh labels."""

    def __init__(self, spec: PerformanceDriftSpec, url: str, model: str, revision: int | None,
                 state_dir: str | Path | None = None, previous: DriftVerdict | None = None):
        self.spec, self.url, self.model, self.revision = spec, url, model, revision
        self.state_file = Path(state_dir) / STATE_FILE.format(revision=revision) if state_dir else None
        self.state = self._resume(previous)

    @property
    def consecutive(self) -> int:
        return self.state.consecutive

    def _resume(self, previous: DriftVerdict | None) -> PerformanceState:
        state = PerformanceState(self.revision)
        if (previous is not None and previous.reason == d.PERFORMANCE_DRIFT_REASON
                and previous.revision == self.revision and previous.labels_seen is not None):
            state = PerformanceState(self.revision, previous.labels_seen, previous.consecutive, previous.windows or 0)
        try:
            saved = PerformanceState(**json.loads(self.state_file.read_text())) if self.state_file else None
        except (FileNotFoundError, ValueError, TypeError):
            saved = None
        if saved is not None and saved.revision == self.revision and saved.windows >= state.windows:
            state = saved
        return state

    def check(self) -> DriftVerdict | None:
        """A verdict once ``window`` new labels arrived since the last one; None until then (or when the serving
        process cannot be read: the next check tries again)."""
        try:
            reading = read_metrics(self.url, self.model, self.revision)
        except OSError as err:
            log("could not read the serving metrics", level="warning", url=self.url, error=str(err))
            return None
        st = self.state
        if reading.accepted < st.labels_seen:  # the serving process restarted: its counter starts over
            log("serving feedback counter went down: counting labels from 0", revision=self.revision,
                was=st.labels_seen, now=reading.accepted)
            st.labels_seen = 0
        if reading.accepted - st.labels_seen < self.spec.window:
            return None
        floor = self.spec.min_accuracy
        if reading.accuracy is None or reading.labels < self.spec.min_labels:
            outcome, drifting, consecutive = "Inconclusive", False, st.consecutive
        else:
            drifting = reading.accuracy < floor
            outcome, consecutive = ("Drift", st.consecutive + 1) if drifting else ("NoDrift", 0)
        return DriftVerdict(
            is_drift=drifting, outcome=outcome, samples=reading.labels,
            consecutive=consecutive, checked_at=_now(), revision=self.revision, detector=DETECTOR,
            windows=st.windows + 1, reason=d.PERFORMANCE_DRIFT_REASON, accuracy=reading.accuracy,
            labels=reading.labels, min_accuracy=floor, labels_seen=reading.accepted)

    def commit(self, verdict: DriftVerdict) -> None:
        """``verdict`` was written (or deliberately not): its labels are spent."""
        self.state = PerformanceState(self.revision, verdict.labels_seen or 0, verdict.consecutive,
                                      verdict.windows or 0)
        if self.state_file is not None:
            self.state_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.state_file.with_name(f".{self.state_file.name}.tmp")
            tmp.write_text(json.dumps(asdict(self.state)))
            os.replace(tmp, self.state_file)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")
