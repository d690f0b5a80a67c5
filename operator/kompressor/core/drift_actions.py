"""What a confirmed drift does: the spec's action (rollback, retrain, alert), within the cooldown,
maxRetrains and maxAutoActions limits, never flapping back to a revision that drifted before.
Which verdicts count is drift_policy.py's business."""

from __future__ import annotations

from datetime import timedelta

from kompressor.api import defaults as d
from kompressor.core import compression, drift_policy, promotion, reasons, revisions, times
from kompressor.core.context import Run

# A confirmed drift is acted on only from these phases; elsewhere it is recorded, not acted on.
ACTING_PHASES = ("Serving", "DriftDetected")  # Failed/Rejected/AwaitingApproval wait for a person


def handle_drift(run: Run) -> None:
    """Record a confirmed drift on the serving revision and, where allowed, act on it."""
    st, drift = run.st, run.spec.drift
    reading = drift_policy.read(run.spec, st)
    if reading.state != "confirmed":
        if st.phase == "DriftDetected" and not run.paused:
            run.phase("Serving", f"drift cleared on revision {st.current_revision}")
            run.event(reasons.DRIFT_CLEARED, f"Drift cleared on revision {st.current_revision}")
        return
    served = revisions.find(st, st.current_revision)
    if served is not None and served.drifted_at is None:
        served.drifted_at = run.stamp  # remembered, so that nothing rolls back to it later (no flapping)
    if run.paused or run.candidate_in_flight() or st.phase not in ACTING_PHASES:
        return  # recorded (Drifted condition, drifted_at), not acted on
    entering = st.phase != "DriftDetected"
    if entering:
        reason = reasons.PERFORMANCE_DRIFT_DETECTED if reading.performance else reasons.DRIFT_DETECTED
        run.event(reason, reading.message[0].upper() + reading.message[1:], warning=True)
    current = st.current_revision
    if drift.action == "alert":
        hold(run, None, f"drift confirmed on revision {current}; action is alert only")
        return
    if st.auto_actions >= drift.max_auto_actions:
        message = (f"drift confirmed on revision {current}, but {st.auto_actions} automatic actions ran since a "
                   f"person last touched the resource (maxAutoActions {drift.max_auto_actions}); paused — edit the "
                   f"spec or set annotation {d.ANNOTATION_RESUME} to a new value")
        _pause(run, reasons.AUTO_ACTIONS_EXHAUSTED, message)
        return
    last = times.parse(st.last_auto_action_at)
    if last is not None and drift.cooldown_seconds > 0:
        until = last + timedelta(seconds=drift.cooldown_seconds)
        if run.now < until:
            hold(run, reasons.COOLDOWN, f"drift confirmed on revision {current}; {drift.action} waits for the "
                                        f"cooldown until {times.rfc3339(until)}")
            run.wait((until - run.now).total_seconds())
            return
    if drift.action == "rollback":
        roll_back(run)
    else:
        retrain(run)


def _pause(run: Run, reason: str, message: str) -> None:
    """Stop acting automatically until a person edits the spec or sets a new resume token."""
    run.phase("Paused", message)
    run.event(reason, message, warning=True)
    run.paused = True


def hold(run: Run, reason: str | None, message: str) -> None:
    """Stay in DriftDetected; tell once (an event when the situation changes, not every reconcile)."""
    if reason is not None and (run.st.phase != "DriftDetected" or run.st.message != message):
        run.event(reason, message[0].upper() + message[1:], warning=True)
    run.phase("DriftDetected", message)


def roll_back(run: Run) -> None:
    st, drift = run.st, run.spec.drift
    if drift.rollback_to == "baseline":
        target = revisions.find(st, d.BASELINE_REVISION)
    else:
        target = revisions.previous_promoted(st)
    if target is None or target.artifact is None or target.revision == st.current_revision:
        what = "the baseline (revision 0)" if drift.rollback_to == "baseline" else "a previously promoted revision"
        hold(run, reasons.NO_ROLLBACK_TARGET,
             f"drift confirmed on revision {st.current_revision}, but there is no rollback target: {what} "
             "is not available")
        return
    if target.drifted_at is not None:
        message = (f"drift confirmed on revision {st.current_revision}, but rollback target revision "
                   f"{target.revision} drifted before ({target.drifted_at}); paused to avoid flapping — edit the "
                   f"spec or set annotation {d.ANNOTATION_RESUME} to a new value")
        _pause(run, reasons.FLAPPING_PREVENTED, message)
        return
    count_auto_action(run)
    promotion.promote(run, target, rollback=True)  # no gates re-run: the target was gated (or is the baseline)


def retrain(run: Run) -> None:
    st, drift = run.st, run.spec.drift
    if st.retrains >= drift.max_retrains:
        hold(run, reasons.RETRAIN_LIMIT_REACHED,
             f"drift confirmed on revision {st.current_revision}, but maxRetrains ({drift.max_retrains}) "
             "retrains already ran")
        return
    if run.spec.data.retrain is None:
        hold(run, reasons.NO_RETRAIN_DATA,
             f"drift confirmed on revision {st.current_revision}, but spec.data.retrain is not set")
        return
    count_auto_action(run)
    st.retrains += 1
    run.event(reasons.RETRAINING, f"Drift on revision {st.current_revision}: retraining on {run.spec.data.retrain}",
              warning=True)
    compression.start(run, "retrain")


def count_auto_action(run: Run) -> None:
    run.st.auto_actions += 1
    run.st.last_auto_action_at = run.stamp
