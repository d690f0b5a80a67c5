"""The reconcile core: ``reconcile(observed) -> Decision``. Pure: no I/O, no clock, no randomness.

Adapters write ``Decision.status``, then apply ``Decision.actions`` in order (each idempotent).
Everything the core needs to resume lives in the status it wrote, and every name it hands out
is derived from that status, so calling it again after a crash at any point converges without
duplicate Jobs or lost revisions.

State machine (phase, what moves it on, what is emitted)::

    Pending ──(no compression yet)──────────────────────────────► Compressing  RunJob(prune)
    Compressing/Retraining ──prune Job Succeeded──────────────────► Evaluating   RunJob(evaluate)
    Compressing/Retraining/Evaluating ──Job Failed (after backoff)► Failed
    Evaluating ──report read, gates failed────────────────────────► Rejected
    Evaluating ──gates passed, requireApproval, not approved──────► AwaitingApproval
    Evaluating ──gates passed (and approved)──────────────────────► Promoting    Serve(revision)
    AwaitingApproval ──annotation kompressor.io/approve=<revision>─► Promoting
    Promoting/RollingBack ──serving ready at the target revision──► Serving
    Evaluating/AwaitingApproval ──gates passed, strategy shadow|canary► Shadowing | Canary  Serve(serving, candidate)
        (nothing served yet: the baseline is promoted first and serves meanwhile; see online.py)
    Shadowing/Canary ──online gates Successful (canary: after the last step)► Promoting
    Shadowing/Canary ──online gates Failed or Error (or Inconclusive at the deadline)► Rejected  Serve(serving)
    Canary ──a step's online gates Successful──────────────────────► Canary (next step's weight)
    Serving ──drift confirmed (consecutiveWindows checks)─────────► DriftDetected, then the spec's action:
        rollback ─► RollingBack (target: previous promoted revision, or 0 with rollbackTo: baseline)
        retrain  ─► Retraining  RunJob(prune, retrain=True) ─► Evaluating ─► … (gated as usual)
        alert    ─► stays DriftDetected until a verdict clears it ─► Serving
        held in DriftDetected: cooldown running (Requeue), no rollback target, maxRetrains reached
        ─► Paused: maxAutoActions reached, or the rollback target drifted before (no flapping)
    any ──compression inputs edited──► Compressing (stale Jobs deleted; serving/drift edits only re-Serve)
    Failed/Rejected ──new kompressor.io/retry token──► Compressing (or Retraining, retrying a retrain)
    any ──spec.promotion.paused──► Paused (observe and record only) ──unpaused──► phase re-derived
    Paused (automatic) ──generation change or new kompressor.io/resume token──► phase re-derived

Drift rules (see drift_policy.py for which verdicts count): a confirmed drift is acted on only
in Serving or DriftDetected with no candidate in flight and not paused; elsewhere (a retrain
running, Failed, Rejected, AwaitingApproval, Promoting) it is only recorded (Drifted condition,
``revisions[].driftedAt``). ``autoActions`` counts rollbacks and retrains since a person last
touched the resource; when it has reached ``maxAutoActions`` the next action pauses instead.
Alerts are not actions. A resume token also forgets which revisions drifted.

``status.current_revision`` is the revision the serving workload is (being) switched to; it is
set when a promotion or rollback is decided, and ``Serve`` is emitted for it on every reconcile
unless paused (no ``Serve`` means: leave the serving workload as it is). A revision keeps
serving through a later Compressing, Rejected or Failed.

Conditions (recomputed or kept every reconcile; ``lastTransitionTime`` moves only with ``status``):
Ready (serving is ready at the current revision and its traffic has no confirmed drift; else the
phase, Promoting, RollingBack, ServingNotReady or DriftDetected as reason), Compressed (the latest
candidate produced an artifact; JobFailed when it could not), GatesPassed (the latest evaluated
candidate), Promoted (True: Promoted, or RolledBack when serving an older revision), Drifted
(the verdict for the current revision). Event and condition reasons are the constants of reasons.py.
"""

from __future__ import annotations

from kompressor.api import defaults as d
from kompressor.core import (compression, conditions, drift_actions, drift_policy, names, online, promotion, reasons,
                             revisions)
from kompressor.core.actions import Decision, DeleteJob
from kompressor.core.context import Run
from kompressor.core.observed import Observed


def reconcile(observed: Observed) -> Decision:
    run = Run(observed)
    _human_signals(run)
    compression.follow_candidate(run)
    compression.start_compression(run)
    promotion.approve(run)
    promotion.settle_serving(run)
    online.advance(run)
    drift_actions.handle_drift(run)
    promotion.serve(run)
    revisions.trim(run.st, run.spec.revision_history_limit)
    _collect_stale_jobs(run)
    _refresh_conditions(run)
    run.st.observed_generation = run.gen
    return run.decision()


def _human_signals(run: Run) -> None:
    """A generation change or a new resume token means a person touched the resource."""
    st = run.st
    generation_changed = st.observed_generation != run.gen
    token = run.annotations.get(d.ANNOTATION_RESUME)
    resumed = token is not None and token != st.handled_resume
    if resumed:
        st.handled_resume = token
        for revision in st.revisions:  # "carry on": forget which revisions drifted
            revision.drifted_at = None
    if generation_changed or resumed:
        st.auto_actions = 0
    spec_paused = run.spec.promotion.paused
    if st.phase == "Paused" and not spec_paused and (generation_changed or resumed):
        phase, message = _settled_phase(run)
        why = "a new resume token" if resumed else f"spec generation {run.gen}"
        run.phase(phase, f"resumed after {why}: {message}")
        run.event(reasons.RESUMED, f"Resumed after {why}; phase {phase}")
    if spec_paused:
        if st.phase != "Paused":
            run.event(reasons.PAUSED, "Paused by spec.promotion.paused")
        run.phase("Paused", "spec.promotion.paused is true: observing and recording only")
    run.paused = st.phase == "Paused"


def _settled_phase(run: Run) -> tuple[str, str]:
    """The phase (and why) the recorded state stands in, used when leaving Paused."""
    st = run.st
    if run.candidate_failed():
        return "Failed", conditions.get(st, "Compressed").message
    if st.candidate is not None:
        return compression.candidate_phase(st.candidate), f"revision {st.candidate.revision} in progress"
    if st.online is not None and run.serving_at(st.current_revision):
        return ("Shadowing" if st.online.strategy == "shadow" else "Canary"), \
            f"revision {st.online.revision} judged online against revision {st.current_revision}"
    newest = revisions.newest_compressed(st)
    if newest is not None and newest.gates is not None and newest.promoted_at is None \
            and newest.revision != st.current_revision:
        if newest.gates.passed:
            return "AwaitingApproval", f"revision {newest.revision} passed its gates"
        failing = compression.failed_gates(newest.gates.results)
        return "Rejected", f"revision {newest.revision} failed its gates: {failing}"
    if st.current_revision is not None:
        # Still switching over only if the last status said so: serving may also be off its
        # revision because an earlier reconcile's Serve was applied and its status lost.
        promoted = conditions.get(st, "Promoted")
        if not run.serving_at(st.current_revision) and promoted is not None \
                and promoted.reason in (reasons.PROMOTING, reasons.ROLLING_BACK):
            if promoted.reason == reasons.ROLLING_BACK:
                return "RollingBack", f"rolling back to revision {st.current_revision}"
            return "Promoting", f"promoting revision {st.current_revision}"
        return "Serving", f"serving revision {st.current_revision}"
    return "Pending", "nothing compressed yet"


def _collect_stale_jobs(run: Run) -> None:
    """Delete the Jobs of abandoned work: neither the candidate's nor those of a revision in the
    history (e.g. a candidate replaced by a spec edit, with the reconcile that replaced it
    interrupted before its DeleteJob, or revisions trimmed from the history)."""
    owners = [(r.revision, r.generation) for r in run.st.revisions if r.generation is not None]
    if run.st.candidate is not None:
        owners.append((run.st.candidate.revision, run.st.candidate.generation))
    keep = {names.job_name(run.model.name, kind, revision, generation)
            for revision, generation in owners for kind in ("prune", "evaluate")}
    for job in sorted(run.obs.jobs, key=lambda j: j.name):
        if job.name not in keep:
            run.deletes.append(DeleteJob(job.name))


def _refresh_conditions(run: Run) -> None:
    st, gen, now = run.st, run.gen, run.stamp
    if conditions.get(st, "Compressed") is None:
        conditions.put(st, "Compressed", "False", reasons.PENDING, "no compression has run yet", gen, now)
    if conditions.get(st, "GatesPassed") is None:
        conditions.put(st, "GatesPassed", "Unknown", reasons.NOT_EVALUATED, "nothing evaluated yet", gen, now)
    current, serving_ok = st.current_revision, run.serving_at(st.current_revision)

    if current is None:
        reason = reasons.AWAITING_APPROVAL if st.phase == "AwaitingApproval" else reasons.NOTHING_PROMOTED
        conditions.put(st, "Promoted", "False", reason, "no revision has been promoted yet", gen, now)
    elif not serving_ok:
        reason = reasons.PROMOTING if current == st.last_promoted_revision else reasons.ROLLING_BACK
        conditions.put(st, "Promoted", "False", reason, f"waiting for serving to be ready at revision {current}",
                       gen, now)
    elif current == st.last_promoted_revision:
        conditions.put(st, "Promoted", "True", reasons.PROMOTED, f"revision {current} is serving", gen, now)
    else:
        conditions.put(st, "Promoted", "True", reasons.ROLLED_BACK,
                       f"revision {current} is serving (rolled back from revision {st.last_promoted_revision})",
                       gen, now)

    reading = drift_policy.read(run.spec, st)
    status, reason = {
        "disabled": ("False", reasons.DRIFT_DISABLED),
        "not_serving": ("False", reasons.NOT_SERVING),
        "no_verdict": ("Unknown", reasons.AWAITING_VERDICT),
        "clear": ("False", reasons.NO_DRIFT),
        "inconclusive": ("Unknown", reasons.DRIFT_INCONCLUSIVE),
        "suspected": ("False", reasons.DRIFT_SUSPECTED),
        "confirmed": ("True", reasons.DRIFT_CONFIRMED),
    }[reading.state]
    if reading.performance and reading.state in ("suspected", "confirmed"):
        reason = {"suspected": reasons.PERFORMANCE_DRIFT_SUSPECTED,
                  "confirmed": reasons.PERFORMANCE_DRIFT_CONFIRMED}[reading.state]
    conditions.put(st, "Drifted", status, reason, reading.message, gen, now)

    if current is None:
        conditions.put(st, "Ready", "False", st.phase, st.message or "no revision is served yet", gen, now)
    elif not serving_ok:
        reason = st.phase if st.phase in ("Promoting", "RollingBack") else reasons.SERVING_NOT_READY
        conditions.put(st, "Ready", "False", reason, f"serving is not ready at revision {current}", gen, now)
    elif reading.state == "confirmed":
        if reading.performance:
            conditions.put(st, "Ready", "False", reasons.PERFORMANCE_DRIFT_DETECTED,
                           f"revision {current} is serving, but its online accuracy fell below the floor", gen, now)
        else:
            conditions.put(st, "Ready", "False", reasons.DRIFT_DETECTED,
                           f"revision {current} is serving, but its traffic drifted", gen, now)
    else:
        conditions.put(st, "Ready", "True", reasons.SERVING, f"revision {current} is serving", gen, now)
    for condition in st.conditions:
        condition.observed_generation = gen
