"""How the core reads the drift watcher's verdict (``status.drift``).

A verdict counts only if it is about the revision being served and was checked after that
revision was promoted and after the last automatic action (older verdicts describe traffic
the last action already answered). Drift is *confirmed* after ``consecutiveWindows``
drifting checks in a row (hysteresis): one drifting check alone is only *suspected*.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from kompressor.api import defaults as d
from kompressor.api.spec import CompressedModelSpec
from kompressor.api.status import CompressedModelStatus, DriftVerdict
from kompressor.core import revisions, times

DriftState = Literal["disabled", "not_serving", "no_verdict", "clear", "inconclusive", "suspected", "confirmed"]


@dataclass(frozen=True)
class DriftReading:
    state: DriftState
    message: str
    verdict: DriftVerdict | None = None

    @property
    def performance(self) -> bool:
        """Whether the verdict is about online accuracy (spec.drift.performance), not the traffic's data."""
        return self.verdict is not None and self.verdict.reason == d.PERFORMANCE_DRIFT_REASON


def read(spec: CompressedModelSpec, status: CompressedModelStatus) -> DriftReading:
    if not spec.drift.enabled:
        return DriftReading("disabled", "drift watching is disabled (spec.drift.enabled is false)")
    if status.current_revision is None:
        return DriftReading("not_serving", "no revision is served yet")
    verdict = status.drift
    if verdict is None or not _is_current(verdict, status):
        return DriftReading("no_verdict", f"no drift verdict yet for revision {status.current_revision}")
    needed = spec.drift.consecutive_windows
    detail = _describe(verdict, needed)
    if verdict.outcome == "Inconclusive":
        return DriftReading("inconclusive", f"drift check inconclusive: {detail}", verdict)
    if not verdict.is_drift:
        return DriftReading("clear", f"no drift: {detail}", verdict)
    if verdict.consecutive >= needed:
        return DriftReading("confirmed", f"{_kind(verdict)} confirmed on revision {verdict.revision}: {detail}",
                            verdict)
    return DriftReading("suspected", f"{_kind(verdict)} suspected, not yet confirmed: {detail}", verdict)


def _kind(verdict: DriftVerdict) -> str:
    return "performance drift" if verdict.reason == d.PERFORMANCE_DRIFT_REASON else "drift"


def _is_current(verdict: DriftVerdict, status: CompressedModelStatus) -> bool:
    if verdict.revision is None or verdict.revision != status.current_revision:
        return False
    checked = times.parse(verdict.checked_at)
    last_action = times.parse(status.last_auto_action_at)
    if checked is None:
        return last_action is None  # cannot be placed in time: trust it only before any automatic action
    if last_action is not None and checked <= last_action:
        return False
    served = revisions.find(status, status.current_revision)
    promoted = times.parse(served.promoted_at) if served else None
    return promoted is None or checked >= promoted


def _describe(verdict: DriftVerdict, needed: int) -> str:
    parts = [f"{verdict.consecutive}/{needed} drifting checks in a row"]
    if verdict.reason == d.PERFORMANCE_DRIFT_REASON:
        if verdict.accuracy is not None:
            floor = f" (floor {verdict.min_accuracy:.4g})" if verdict.min_accuracy is not None else ""
            parts.append(f"online accuracy {verdict.accuracy:.4g}{floor} over {verdict.labels} labels")
        else:
            parts.append("no labelled predictions yet")
    if verdict.p_value is not None:
        parts.append(f"p-value {verdict.p_value:.4g}")
    if verdict.detector:
        parts.append(f"detector {verdict.detector}")
    if verdict.checked_at:
        parts.append(f"checked {verdict.checked_at}")
    return ", ".join(parts)
