"""The compression in flight: starting candidates, following their prune and evaluate Jobs,
recording the evaluated revision (and the baseline) and judging its gates."""

from __future__ import annotations

import copy

from kompressor.api import defaults as d
from kompressor.api.report import EvalReport
from kompressor.api.status import Candidate, GateResult, Revision
from kompressor.core import conditions, promotion, reasons, revisions
from kompressor.core.actions import DeleteJob
from kompressor.core.context import Run
from kompressor.errors import BAD_INPUT_EXIT_CODE

# How long to wait before looking again for the report of a succeeded evaluation Job.
REPORT_RETRY_SECONDS = 10.0


def candidate_phase(candidate: Candidate) -> str:
    if candidate.stage == "evaluate":
        return "Evaluating"
    return "Retraining" if candidate.reason == "retrain" else "Compressing"


def start_compression(run: Run) -> None:
    """A new candidate on a compression-relevant spec edit (or the first time), or on a retry token."""
    if run.paused:
        return
    st = run.st
    if st.compression_digest != run.digest:
        reason = "initial" if st.compression_digest is None else "specChange"
        stale = st.candidate
        if stale is not None and run.candidate_in_flight():
            run.deletes += [DeleteJob(run.job_name(kind, stale)) for kind in ("prune", "evaluate")]
            run.event(reasons.COMPRESSION_RESTARTED,
                      f"Spec changed (generation {run.gen}) while revision {stale.revision} was in progress; "
                      "its Jobs are deleted")
        start(run, reason)
        return
    token = run.annotations.get(d.ANNOTATION_RETRY)
    if token is None or token == st.handled_retry:
        return
    st.handled_retry = token  # a token set outside Failed/Rejected is consumed without effect
    if st.phase not in ("Failed", "Rejected"):
        return
    if run.candidate_failed():
        retried = st.candidate.reason
    else:
        newest = revisions.newest_compressed(st)
        retried = newest.reason if newest else None
    run.event(reasons.RETRY_REQUESTED, f"Retry requested by annotation {d.ANNOTATION_RETRY}={token}")
    # Retrying a retrain retrains again (on data.retrain); anything else compresses from data.train.
    start(run, "retrain" if retried == "retrain" else "retry")


def start(run: Run, reason: str) -> None:
    st = run.st
    number = revisions.next_number(st)
    candidate = Candidate(revision=number, generation=run.gen, reason=reason, started_at=run.stamp, stage="prune")
    st.candidate = candidate
    st.compression_digest = run.digest
    phase = candidate_phase(candidate)
    verb = "retraining" if reason == "retrain" else "compressing"
    message = f"{verb} revision {number} (reason: {reason})"
    run.phase(phase, message)
    conditions.put(st, "Compressed", "False", reasons.COMPRESSING, message, run.gen, run.stamp)
    conditions.put(st, "GatesPassed", "Unknown", reasons.NOT_EVALUATED, f"revision {number} is not evaluated yet",
                   run.gen, run.stamp)
    run.event(reasons.COMPRESSION_STARTED, message[0].upper() + message[1:])
    run.runs.append(run.run_job("prune", candidate))


def follow_candidate(run: Run) -> None:
    """Move the candidate along its Jobs: prune → evaluate → recorded revision."""
    st, c = run.st, run.st.candidate
    if c is None or run.candidate_failed():
        return
    if st.compression_digest != run.digest and not run.paused:
        return  # the spec changed under it: start_compression replaces it
    if c.stage in (None, "prune"):
        if not _stage_succeeded(run, "prune", c) or run.paused:
            return
        c.stage = "evaluate"
        run.phase("Evaluating", f"evaluating revision {c.revision}")
        run.event(reasons.EVALUATION_STARTED, f"Pruning of revision {c.revision} succeeded; evaluating it")
    if not _stage_succeeded(run, "evaluate", c):
        return
    report = run.obs.reports.get(c.revision)
    if report is None:
        if not run.paused:
            run.st.message = f"evaluation of revision {c.revision} finished; waiting for its report"
        run.wait(REPORT_RETRY_SECONDS)
        return
    record(run, c, report)


def _stage_succeeded(run: Run, kind: str, c: Candidate) -> bool:
    """Start the stage's Job when it is missing (unless paused); a failed Job fails the candidate.
    True once the Job has succeeded."""
    job = run.jobs.get(run.job_name(kind, c))
    if job is None:
        if not run.paused:
            run.runs.append(run.run_job(kind, c))
        return False
    if job.phase == "Failed":
        fail(run, job.name, job.kind, job.message, bad_input=job.bad_input)
        return False
    return job.phase == "Succeeded"


def fail(run: Run, job_name: str, kind: str, why: str, bad_input: bool = False) -> None:
    if bad_input:  # exit 2: the spec or a file it names is wrong; retrying the same input fails the same way
        message = (f"{kind} Job {job_name} failed on bad input, not retried (exit code {BAD_INPUT_EXIT_CODE})"
                   + (f": {why}" if why else ""))
        todo = f"; fix the spec or the files it names, then set annotation {d.ANNOTATION_RETRY} to a new value"
    else:
        message = f"{kind} Job {job_name} failed after its retries" + (f": {why}" if why else "")
        todo = f"; set annotation {d.ANNOTATION_RETRY} to a new value to retry"
    conditions.put(run.st, "Compressed", "False", reasons.JOB_FAILED, message, run.gen, run.stamp)
    run.event(reasons.JOB_FAILED, message, warning=True)
    if not run.paused:
        run.phase("Failed", message + todo)


def record(run: Run, c: Candidate, report: EvalReport) -> None:
    st = run.st
    report = copy.deepcopy(report)  # the status must not share objects with the observation
    revision = Revision(revision=c.revision, artifact=report.artifact, metrics=report.metrics,
                        gates=report.gates, reason=c.reason, generation=c.generation)
    revisions.upsert(st, revision)
    record_baseline(run, c, report)
    st.candidate = None
    sparsity = report.metrics.sparsity
    summary = f"revision {c.revision}" + (f" (sparsity {sparsity:.2f})" if sparsity is not None else "")
    search, note = report.search or {}, ""
    if search.get("evalDisagreed"):  # the search chose on validation; eval did not confirm that choice
        note = (f"; eval disagreed with validation on sparsity {', '.join(map(str, search['evalDisagreed']))}"
                + (f", so the next passing probe ({search.get('chosenSparsity')}) was kept" if search.get("fellBack")
                   else "") + f"; {search.get('probesOnEval')} candidates touched the eval data"
                + (f"; {search['message']}" if search.get("message") and not search.get("fellBack") else ""))
    conditions.put(st, "Compressed", "True", reasons.COMPRESSED, f"{summary} compressed and evaluated{note}",
                   run.gen, run.stamp)
    if report.gates.passed:
        conditions.put(st, "GatesPassed", "True", reasons.GATES_PASSED,
                       f"revision {c.revision} passed all {len(report.gates.results)} gates", run.gen, run.stamp)
        if not run.paused:
            promotion.offer_for_promotion(run, revision)
        return
    failing = failed_gates(report.gates.results)
    message = f"revision {c.revision} failed its gates: {failing}"
    conditions.put(st, "GatesPassed", "False", reasons.GATES_FAILED, message, run.gen, run.stamp)
    run.event(reasons.REJECTED, message, warning=True)
    if not run.paused:
        run.phase("Rejected", message)


def failed_gates(results: list[GateResult]) -> str:
    """``minAccuracy 0.91 vs 0.95 (Failed); ...``: every gate that is not Successful, named."""
    parts = []
    for result in results:
        if result.outcome == "Successful":
            continue
        text = result.gate
        if result.value is not None and result.threshold is not None:
            text += f" {result.value:.4g} vs {result.threshold:.4g}"
        text += f" ({result.outcome})"
        if result.message:
            text += f": {result.message}"
        parts.append(text)
    return "; ".join(parts) or "no failing gate reported"


def record_baseline(run: Run, c: Candidate, report: EvalReport) -> None:
    """Revision 0 is the uncompressed source model; replaced only when the source model changed
    (another sha256) and it is not being served."""
    if report.baseline_artifact is None:
        return
    existing = revisions.find(run.st, d.BASELINE_REVISION)
    if existing is not None and (existing.artifact is not None
                                 and existing.artifact.sha256 == report.baseline_artifact.sha256
                                 or run.st.current_revision == d.BASELINE_REVISION):
        return
    revisions.upsert(run.st, Revision(revision=d.BASELINE_REVISION, artifact=report.baseline_artifact,
                                      metrics=report.baseline_metrics, generation=c.generation))
