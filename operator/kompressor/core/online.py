"""The online stage (``spec.promotion.strategy`` shadow or canary): a revision that passed its offline gates runs
beside the serving revision on live traffic, and is promoted only once the online gates pass on what it saw.

- **Start.** ``begin`` replaces a direct promotion. With nothing served yet, the baseline (revision 0) is
  promoted first and serves while the candidate is judged; later candidates are judged against whichever
  revision serves. ``Serve`` then carries the candidate (``OnlineCandidate``): shadow at weight 0, canary at the
  current step's percentage.
- **Evidence.** Each serving process reports counts since it was given the candidate (``Observed.online``).
  ``fold`` adds each source's growth since the counts last folded into ``status.online.sources``, so a count
  is added once however often the same reading is seen, and a restarted process (a new source) adds from 0:
  what was judged so far survives restarts of the operator, of the runner and of the serving Pods.
- **Verdict** (``judge``), over all the evidence so far, once the current step has seen ``minRequests``
  requests (else Inconclusive): minAgreement (mean agreement over the compared rows), maxErrorRate,
  maxLatencyRatio (p95 from the summed run-time histograms) and minAccuracy (once minRequests labels came).
  A gate with nothing to judge (no rows compared, no labels) is Inconclusive; the candidate failing to load
  anywhere is Error.
- **Acting.** Failed or Error: the candidate is rejected (phase Rejected, ``Serve`` without it: all traffic on
  the serving revision). Successful: the next canary step, or (shadow, last step) promotion. Inconclusive: wait;
  past ``onlineDeadlineSeconds`` in the same step, ``onInconclusive`` rejects or promotes. A newer compression
  supersedes the stage. Paused: evidence is still folded, nothing is decided.
"""

from __future__ import annotations

import copy
from dataclasses import fields

from kompressor.api import defaults as d
from kompressor.api.status import GateResult, OnlineCounts, OnlineStage, OnlineVerdict, Revision
from kompressor.core import promotion, reasons, revisions, times
from kompressor.core.actions import OnlineCandidate
from kompressor.core.context import Run
from kompressor.core.observed import OnlineReading

_ADDED = tuple(f.name for f in fields(OnlineCounts))


def begin(run: Run, revision: Revision) -> None:
    """Start judging ``revision`` on live traffic (instead of promoting it)."""
    st, strategy = run.st, run.spec.promotion.strategy
    if st.current_revision is None:
        baseline = revisions.find(st, d.BASELINE_REVISION)
        if baseline is None or baseline.artifact is None:
            run.event(reasons.ONLINE_STAGE_SKIPPED, f"No baseline to serve while revision {revision.revision} is "
                      f"judged online; promoting it directly", warning=True)
            promotion.promote(run, revision, rollback=False)
            return
        promotion.promote(run, baseline, rollback=False)  # serves while the first candidate is judged
    weight = float(run.spec.promotion.canary.percentages()[0]) if strategy == "canary" else 0.0
    st.online = OnlineStage(revision=revision.revision, strategy=strategy, weight=weight, started_at=run.stamp,
                            step_started_at=run.stamp, sources={})
    what = "shadow (a copy of live requests)" if strategy == "shadow" else f"canary at {weight:g} % of live requests"
    run.event(reasons.ONLINE_STAGE_STARTED, f"Revision {revision.revision} passed its gates; judging it online: {what}"
              f" against revision {st.current_revision}")
    if run.serving_at(st.current_revision):
        run.phase(_phase(strategy), _progress(run, st.online))


def advance(run: Run) -> None:
    """One reconcile of the stage in progress: fold the evidence, judge it, act on the verdict."""
    st = run.st
    stage = st.online
    if stage is None:
        return
    revision = revisions.find(st, stage.revision)
    if run.candidate_in_flight() or revision is None or revision.artifact is None:
        newer = st.candidate.revision if st.candidate is not None else None
        _end(run, stage, "Superseded", [], f"revision {newer} is being compressed" if newer is not None
             else "its revision left the history")
        return
    run.wait(d.ONLINE_POLL_SECONDS)
    # Evidence is folded and judged even while serving is not (yet, or no longer) ready at the current revision:
    # it comes only from processes that run this candidate, and judging it again after a crash that lost the
    # status must decide what the lost reconcile decided.
    readings = [r for r in run.obs.online if r.sha256 == revision.artifact.sha256 and r.mode == stage.strategy
                and (r.revision == stage.revision or r.error)]  # a process that could not load it has no revision
    fold(stage, readings)
    gates = run.spec.promotion.online_gates
    errors = sorted({r.error for r in readings if r.error})
    outcome, results = judge(stage.totals, stage.totals.requests - stage.step_start_requests, gates, errors)
    stage.outcome, stage.results = outcome, results
    if run.paused:
        return
    if outcome in ("Failed", "Error"):
        _reject(run, stage, outcome, results)
    elif outcome == "Successful":
        _passed(run, stage, revision, results)
    elif times.parse(stage.step_started_at) is not None and \
            (run.now - times.parse(stage.step_started_at)).total_seconds() >= run.spec.promotion.online_deadline_seconds:
        if run.spec.promotion.on_inconclusive == "promote":
            run.event(reasons.ONLINE_INCONCLUSIVE, f"Revision {stage.revision} still Inconclusive online after "
                      f"{run.spec.promotion.online_deadline_seconds} s; onInconclusive is promote", warning=True)
            _passed(run, stage, revision, results, inconclusive=True)
        else:
            _reject(run, stage, "Inconclusive", results)
    elif run.serving_at(st.current_revision):  # else still Promoting (the baseline, the first time)
        run.phase(_phase(stage.strategy), _progress(run, stage))


def candidate(run: Run) -> OnlineCandidate | None:
    """What ``Serve`` runs beside the serving revision: the stage's candidate, at its current weight."""
    stage = run.st.online
    if stage is None:
        return None
    revision = revisions.find(run.st, stage.revision)
    if revision is None or revision.artifact is None:
        return None
    return OnlineCandidate(revision=stage.revision, artifact=copy.deepcopy(revision.artifact), mode=stage.strategy,
                           weight=stage.weight)


def fold(stage: OnlineStage, readings: list[OnlineReading]) -> None:
    """Add each reading's growth since its source was last folded; a source whose counts went down (it was given
    the candidate again) starts over from 0. Sources beyond ONLINE_MAX_SOURCES are forgotten, those not read
    now first."""
    sources = stage.sources if stage.sources is not None else {}
    for reading in readings:
        last = sources.get(reading.source)
        grew = last is not None and all(getattr(reading.counts, name) >= getattr(last, name) for name in
                                        ("requests", "errors", "dropped", "compared", "labels", "serving_labels"))
        base = last if grew else OnlineCounts()
        _add(stage.totals, reading.counts, base)
        sources[reading.source] = copy.deepcopy(reading.counts)
    seen = {r.source for r in readings}
    while len(sources) > d.ONLINE_MAX_SOURCES:
        stale = next((key for key in sources if key not in seen), next(iter(sources)))
        del sources[stale]
    stage.sources = sources


def _add(total: OnlineCounts, now: OnlineCounts, base: OnlineCounts) -> None:
    for name in _ADDED:
        value, start, kept = getattr(now, name), getattr(base, name), getattr(total, name)
        if isinstance(value, list):
            width = max(len(value), len(kept))
            pad = lambda xs: list(xs) + [0] * (width - len(xs))  # noqa: E731
            grown = [max(v - s, 0) for v, s in zip(pad(value), pad(start))]
            setattr(total, name, [k + g for k, g in zip(pad(kept), grown)])
        else:
            setattr(total, name, kept + max(value - start, 0))


def judge(totals: OnlineCounts, step_requests: int, gates, errors: list[str] = ()) -> tuple[str, list[GateResult]]:
    """(outcome, one result per set gate) over ``totals``; Inconclusive while the step has fewer than
    minRequests requests."""
    if errors:
        return "Error", [GateResult(gate="online.candidate", outcome="Error",
                                    message="the serving process could not load the candidate: " + "; ".join(errors))]
    results = [GateResult(gate="online.minRequests", value=float(step_requests), threshold=float(gates.min_requests),
                          outcome="Successful" if step_requests >= gates.min_requests else "Inconclusive",
                          message=f"{step_requests} live requests in this step")]
    enough = step_requests >= gates.min_requests
    if gates.min_agreement is not None:
        value = totals.agreement / totals.compared if totals.compared else None
        results.append(_result("online.minAgreement", value, gates.min_agreement, lambda v, t: v >= t, enough,
                               f"over {totals.compared} compared rows"))
    if gates.max_error_rate is not None:
        value = totals.errors / totals.requests if totals.requests else None
        results.append(_result("online.maxErrorRate", value, gates.max_error_rate, lambda v, t: v <= t, enough,
                               f"{totals.errors} of {totals.requests} runs failed"))
    if gates.max_latency_ratio is not None:
        mine, theirs = quantile(totals.candidate_latency, 0.95), quantile(totals.serving_latency, 0.95)
        value = mine / theirs if mine is not None and theirs else None
        results.append(_result("online.maxLatencyRatio", value, gates.max_latency_ratio, lambda v, t: v <= t, enough,
                               "p95 ONNX Runtime time, candidate over serving"
                               + (f" ({mine * 1e3:.3g} ms vs {theirs * 1e3:.3g} ms)" if value is not None else "")))
    if gates.min_accuracy is not None:
        value = totals.right / totals.labels if totals.labels else None
        serving = (f"; the serving revision {totals.serving_right / totals.serving_labels:.4g} on its "
                   f"{totals.serving_labels}" if totals.serving_labels else "")
        results.append(_result("online.minAccuracy", value, gates.min_accuracy, lambda v, t: v >= t,
                               totals.labels >= gates.min_requests, f"over {totals.labels} labelled rows{serving}"))
    outcomes = {r.outcome for r in results}
    outcome = "Failed" if "Failed" in outcomes else "Inconclusive" if "Inconclusive" in outcomes else "Successful"
    return outcome, results


def _result(gate: str, value: float | None, threshold: float, holds, enough: bool, message: str) -> GateResult:
    if value is None or not enough:
        return GateResult(gate=gate, value=value, threshold=threshold, outcome="Inconclusive", message=message)
    return GateResult(gate=gate, value=value, threshold=threshold,
                      outcome="Successful" if holds(value, threshold) else "Failed", message=message)


def quantile(counts: list[int], q: float) -> float | None:
    """The q-quantile of a histogram of per-bucket counts over ONLINE_LATENCY_BUCKETS (+Inf last), interpolated
    linearly inside its bucket as Prometheus' histogram_quantile does; the +Inf bucket answers the last bound."""
    total = sum(counts)
    if total == 0:
        return None
    bounds = list(d.ONLINE_LATENCY_BUCKETS)
    rank, seen = q * total, 0
    for i, count in enumerate(counts):
        if count and seen + count >= rank:
            if i >= len(bounds):
                return bounds[-1]
            lower = bounds[i - 1] if i else 0.0
            return lower + (bounds[i] - lower) * (rank - seen) / count
        seen += count
    return bounds[-1]


def _passed(run: Run, stage: OnlineStage, revision: Revision, results: list[GateResult],
            inconclusive: bool = False) -> None:
    steps = run.spec.promotion.canary.percentages()
    if stage.strategy == "canary" and stage.step + 1 < len(steps) and not inconclusive:
        stage.step += 1
        stage.weight = float(steps[stage.step])
        stage.step_started_at, stage.step_start_requests = run.stamp, stage.totals.requests
        run.event(reasons.CANARY_STEP, f"Revision {stage.revision} passed canary step {stage.step} online; now "
                  f"answering {stage.weight:g} % of live requests")
        if run.serving_at(run.st.current_revision):
            run.phase("Canary", _progress(run, stage))
        return
    _end(run, stage, "Inconclusive" if inconclusive else "Successful", results, "")
    run.event(reasons.ONLINE_GATES_PASSED, f"Revision {stage.revision} passed its online gates "
              f"({stage.strategy}, {stage.totals.requests} live requests)" if not inconclusive else
              f"Revision {stage.revision} promoted with Inconclusive online gates (onInconclusive: promote)")
    promotion.promote(run, revision, rollback=False)


def _reject(run: Run, stage: OnlineStage, outcome: str, results: list[GateResult]) -> None:
    from kompressor.core.compression import failed_gates

    failing = failed_gates(results)
    message = (f"revision {stage.revision} failed its online gates ({stage.strategy}, {stage.totals.requests} live "
               f"requests): {failing}; revision {run.st.current_revision} keeps serving")
    _end(run, stage, outcome, results, message)
    run.event(reasons.ONLINE_GATES_FAILED, message[0].upper() + message[1:], warning=True)
    run.phase("Rejected", message)


def _end(run: Run, stage: OnlineStage, outcome: str, results: list[GateResult], why: str) -> None:
    revision = revisions.find(run.st, stage.revision)
    steps = stage.step + (1 if outcome == "Successful" and stage.strategy == "canary" else 0)
    if revision is not None:
        revision.online = OnlineVerdict(strategy=stage.strategy, outcome=outcome, results=copy.deepcopy(results),
                                        requests=stage.totals.requests, steps_passed=steps, decided_at=run.stamp)
    run.st.online = None
    if outcome == "Superseded":
        run.event(reasons.ONLINE_STAGE_SUPERSEDED, f"The online stage of revision {stage.revision} ended: {why}")


def _phase(strategy: str) -> str:
    return "Shadowing" if strategy == "shadow" else "Canary"


def _progress(run: Run, stage: OnlineStage) -> str:
    need = run.spec.promotion.online_gates.min_requests
    step_requests = stage.totals.requests - stage.step_start_requests
    where = ("shadowing" if stage.strategy == "shadow" else
             f"canary step {stage.step + 1}/{len(run.spec.promotion.canary.percentages())} at {stage.weight:g} %")
    agreement = (f", agreement {stage.totals.agreement / stage.totals.compared:.4f}" if stage.totals.compared else "")
    return (f"revision {stage.revision} {where} against revision {run.st.current_revision}: "
            f"{step_requests}/{need} live requests{agreement}")
