"""The operator's Prometheus metrics (served on --metrics-port)."""

from __future__ import annotations

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

from kompressor.api.status import CompressedModelStatus
from kompressor.core.observed import JobState


class OperatorMetrics:
    def __init__(self, registry: CollectorRegistry = REGISTRY):
        self.reconciles = Counter("kompressor_reconciles", "Reconciles by result (ok, error, invalid).",
                                  ["result"], registry=registry)
        self.reconcile_seconds = Histogram("kompressor_reconcile_duration_seconds", "Time per reconcile.",
                                           registry=registry)
        self.phase_transitions = Counter("kompressor_phase_transitions", "Phase transitions.",
                                         ["from_phase", "to_phase"], registry=registry)
        self.job_seconds = Histogram("kompressor_job_duration_seconds", "Duration of finished Jobs.",
                                     ["kind", "phase"], buckets=(5, 15, 30, 60, 120, 300, 600, 1800, 3600),
                                     registry=registry)
        self.gate_outcomes = Counter("kompressor_gate_outcomes", "Gate verdicts of new revisions.",
                                     ["gate", "outcome"], registry=registry)
        self.rollbacks = Counter("kompressor_rollbacks", "Automatic rollbacks.", registry=registry)
        self.retrains = Counter("kompressor_retrains", "Automatic retrains.", registry=registry)
        self.current_revision = Gauge("kompressor_current_revision", "Revision being served.",
                                      ["namespace", "name"], registry=registry)
        # the online stage (shadow, canary), from status.online: what the core judged, summed over serving Pods
        self.online_weight = Gauge("kompressor_online_stage_weight", "Percent of live traffic the candidate answers "
                                   "(shadow: 0).", ["namespace", "name", "revision", "strategy"], registry=registry)
        self.online_requests = Gauge("kompressor_online_stage_requests", "Live requests the candidate saw in its online "
                                     "stage.", ["namespace", "name", "revision", "strategy"], registry=registry)
        self.online_agreement = Gauge("kompressor_online_stage_agreement", "Mean agreement of the candidate with the "
                                      "serving revision on live requests.", ["namespace", "name", "revision",
                                                                            "strategy"], registry=registry)
        self.online_verdicts = Counter("kompressor_online_stage_verdicts", "Online stages ended, by outcome.",
                                       ["strategy", "outcome"], registry=registry)
        self._online_labels: dict[tuple[str, str], tuple] = {}
        self._jobs_seen: set[str] = set()

    def observe_jobs(self, jobs: tuple[JobState, ...]) -> None:
        for job in jobs:
            if job.finished_at and job.started_at and job.name not in self._jobs_seen:
                self._jobs_seen.add(job.name)
                self.job_seconds.labels(job.kind, job.phase).observe(
                    max(0.0, (job.finished_at - job.started_at).total_seconds()))

    def observe_status(self, namespace: str, name: str, old: CompressedModelStatus,
                       new: CompressedModelStatus) -> None:
        if old.phase != new.phase:
            self.phase_transitions.labels(old.phase, new.phase).inc()
        known = {rev.revision for rev in old.revisions}
        for rev in new.revisions:
            if rev.revision not in known and rev.gates:
                for result in rev.gates.results:
                    self.gate_outcomes.labels(result.gate, result.outcome).inc()
        if new.current_revision is not None:
            self.current_revision.labels(namespace, name).set(new.current_revision)
        ended = {rev.revision for rev in old.revisions if rev.online is not None}
        for rev in new.revisions:
            if rev.online is not None and rev.revision not in ended:
                self.online_verdicts.labels(rev.online.strategy, rev.online.outcome).inc()
        self._observe_online(namespace, name, new)

    def _observe_online(self, namespace: str, name: str, status: CompressedModelStatus) -> None:
        stage = status.online
        labels = None if stage is None else (namespace, name, str(stage.revision), stage.strategy)
        previous = self._online_labels.pop((namespace, name), None)
        if previous is not None and previous != labels:
            self._drop_online(previous)
        if stage is None:
            return
        self._online_labels[(namespace, name)] = labels
        totals = stage.totals
        self.online_weight.labels(*labels).set(stage.weight)
        self.online_requests.labels(*labels).set(totals.requests)
        if totals.compared:
            self.online_agreement.labels(*labels).set(totals.agreement / totals.compared)

    def observe_event(self, reason: str) -> None:
        from kompressor.core import reasons

        if reason == reasons.ROLLING_BACK:
            self.rollbacks.inc()
        elif reason == reasons.RETRAINING:
            self.retrains.inc()

    def forget(self, namespace: str, name: str) -> None:
        try:
            self.current_revision.remove(namespace, name)
        except KeyError:
            pass
        labels = self._online_labels.pop((namespace, name), None)
        if labels is not None:
            self._drop_online(labels)

    def _drop_online(self, labels: tuple) -> None:
        for gauge in (self.online_weight, self.online_requests, self.online_agreement):
            try:
                gauge.remove(*labels)
            except KeyError:  # never set (agreement before any row was compared)
                pass
