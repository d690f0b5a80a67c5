"""Performance drift (``spec.drift.performance``): the serving revision's online accuracy, from the ground-truth
labels ``kompressor serve --feedback`` takes, read from the serving process.

- **What is read.** ``GET /v2/models/{name}/feedback/windows`` on the server whose ``/metrics`` the watcher is
  given (``--serving-metrics-url``; the same address): the revision's labelled rows cut into disjoint windows of
  the server's ``--feedback-window`` (commands.serve_argv sets it to ``window``), each completed one with its
  index and how many rows were right, and the server's ``instance``.
- **Every window once.** Each check judges every completed window it has not judged yet, in order, one verdict
  each: a burst of labels that completes several windows between two checks is several windows (and several
  steps of the consecutiveWindows hysteresis), as a burst of captured rows is for data drift. A window filling is
  not judged. A server keeps the last ``SERVING_FEEDBACK_WINDOWS_KEPT`` completed windows per revision; more
  between two checks loses the oldest, and the watcher says so. A server restart (another ``instance``, or fewer
  windows than already judged) starts over from its first window.
- **The verdict** (reason ``PerformanceDrift``): accuracy below ``minAccuracy`` is a drifting window
  (``consecutive`` + 1), else NoDrift (``consecutive`` 0); a server window smaller than ``minLabels`` (a server
  not started with ``--feedback-window window``) is Inconclusive (the count kept, never drift). The core confirms
  it after ``consecutiveWindows`` in a row and acts on it as on data drift.
- **Restarts.** Where it stands (the labels judged so far: windows × size, ``consecutive``, ``windows``, the
  server's instance) is kept in ``--state`` (``performance-r<revision>.json``) and in the verdict
  (``labelsSeen``); a restart goes on from the newer of the two.
"""

from __future__ import annotations

import json
import os
import urllib.request
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import quote, urljoin

from kompressor.api import defaults as d
from kompressor.api.spec import PerformanceDriftSpec
from kompressor.api.status import DriftVerdict
from kompressor.console import log

STATE_FILE = "performance-r{revision}.json"
DETECTOR = "online-accuracy"
FETCH_TIMEOUT_SECONDS = 5.0


def windows_url(metrics_url: str, model: str) -> str:
    """The feedback windows of ``model`` on the server whose /metrics is ``metrics_url``."""
    return urljoin(metrics_url, f"/v2/models/{quote(model, safe='')}/feedback/windows")


def read_windows(url: str, revision: int | None) -> tuple[str | None, int, int, list[tuple[int, int]]]:
    """(instance, window size, windows completed, [(index, right)] of those kept) of ``revision`` at ``url``."""
    with urllib.request.urlopen(url, timeout=FETCH_TIMEOUT_SECONDS) as response:  # noqa: S310 (our own server)
        doc = json.loads(response.read())
    size = int(doc["size"])
    mine = (doc.get("revisions") or {}).get(str(revision)) or {}
    kept = [(int(w["index"]), int(w["right"])) for w in mine.get("windows") or []]
    return doc.get("instance"), size, int(mine.get("completed", 0)), kept


@dataclass
class PerformanceState:
    revision: int | None
    labels_seen: int = 0  # rows of the server windows judged so far (windows judged x the server's size)
    consecutive: int = 0
    windows: int = 0
    instance: str | None = None  # the serving process those windows are of (None: not known)


class PerformanceWatch:
    """Online-accuracy checks of one serving revision, each on ``window`` fresh labels."""

    def __init__(self, spec: PerformanceDriftSpec, url: str, model: str, revision: int | None,
                 state_dir: str | Path | None = None, previous: DriftVerdict | None = None):
        self.spec, self.model, self.revision = spec, model, revision
        self.url = windows_url(url, model)
        self._instance: str | None = None  # of the window check() last judged
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
        """The verdict on the next completed window not judged yet; None when there is none (or the serving process
        cannot be read: the next check tries again). Call it until None, committing each verdict."""
        try:
            instance, size, completed, kept = read_windows(self.url, self.revision)
        except (OSError, ValueError, KeyError, TypeError) as err:
            log("could not read the serving feedback windows", level="warning", url=self.url, error=str(err))
            return None
        st = self.state
        following = st.labels_seen // size if size else 0  # the index of the next window to judge
        if (st.instance is not None and instance != st.instance) or completed < following:
            log("the serving process restarted: judging its windows from the first", revision=self.revision,
                judged=following, completed=completed)
            following = 0
        fresh = [(index, right) for index, right in kept if index >= following]
        if not fresh:
            return None
        index, right = fresh[0]
        if index > following:
            log("feedback windows lost: more completed between two checks than the server keeps",
                level="warning", revision=self.revision, lost=index - following)
        self._instance = instance
        floor, accuracy = self.spec.min_accuracy, right / size
        if size < self.spec.min_labels:
            outcome, drifting, consecutive = "Inconclusive", False, st.consecutive
        else:
            drifting = accuracy < floor
            outcome, consecutive = ("Drift", st.consecutive + 1) if drifting else ("NoDrift", 0)
        return DriftVerdict(
            is_drift=drifting, outcome=outcome, samples=size,
            consecutive=consecutive, checked_at=_now(), revision=self.revision, detector=DETECTOR,
            windows=st.windows + 1, reason=d.PERFORMANCE_DRIFT_REASON, accuracy=accuracy,
            labels=size, min_accuracy=floor, labels_seen=(index + 1) * size)

    def commit(self, verdict: DriftVerdict) -> None:
        """``verdict`` was written (or deliberately not): its labels are spent."""
        self.state = PerformanceState(self.revision, verdict.labels_seen or 0, verdict.consecutive,
                                      verdict.windows or 0, self._instance)
        if self.state_file is not None:
            self.state_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.state_file.with_name(f".{self.state_file.name}.tmp")
            tmp.write_text(json.dumps(asdict(self.state)))
            os.replace(tmp, self.state_file)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")
