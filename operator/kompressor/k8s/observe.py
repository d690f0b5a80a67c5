"""Turning what the API shows into the reconcile core's ``Observed``. Pure except reading
metrics.json from the artifact store."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timezone
from typing import Any, Iterable

from kompressor.api.manifest import CompressedModel
from kompressor.api.report import EvalReport
from kompressor.core import names
from kompressor.core.observed import JobState, Observed, OnlineReading, ServingState
from kompressor.core.scaling import wanted_ready
from kompressor.k8s import resources as r
from kompressor.k8s.scaling import LABEL_MIN_READY

JOB_REASON_POD_FAILURE_POLICY = "PodFailurePolicy"  # the Job controller's reason when a FailJob rule matched


def _time(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def job_state(name: str, labels: dict, status: dict) -> JobState | None:
    """A Job's state from its labels and status; None for Jobs that are not ours."""
    try:
        kind = labels[r.LABEL_COMPONENT]
        revision = int(labels[r.LABEL_REVISION])
        generation = int(labels[r.LABEL_GENERATION])
    except (KeyError, ValueError):
        return None
    if kind not in ("prune", "evaluate"):
        return None
    conditions = {c.get("type"): c for c in status.get("conditions") or [] if c.get("status") == "True"}
    phase, message, finished, bad_input = "Pending", "", None, False
    if "Complete" in conditions or "SuccessCriteriaMet" in conditions:
        phase = "Succeeded"
        finished = _time(status.get("completionTime") or conditions.get("Complete", {}).get("lastTransitionTime"))
    elif "Failed" in conditions:
        phase = "Failed"
        failed = conditions["Failed"]
        message = failed.get("message") or failed.get("reason") or "the Job failed"
        # The only FailJob rule of children.pod_failure_policy is exit code 2: bad input.
        bad_input = failed.get("reason") == JOB_REASON_POD_FAILURE_POLICY
        finished = _time(failed.get("lastTransitionTime"))
    elif status.get("active") or status.get("startTime"):
        phase = "Running"
    return JobState(name=name, kind=kind, revision=revision, generation=generation, phase=phase,
                    message=message, bad_input=bad_input, started_at=_time(status.get("startTime")), finished_at=finished)


JOB_NAME_LABEL = "batch.kubernetes.io/job-name"  # the Job controller labels each Pod of a Job with it
MESSAGE_CHARS = 500  # of a Pod's termination message, in the CompressedModel's status


def pod_failure_message(pods: Iterable[dict], container: str) -> str:
    """The termination message of ``container`` in the last failed Pod: the job's own last line (what it
    wrote to its termination log, or the tail of its log when it crashed), "" when there is none."""
    finished = []
    for pod in pods:
        for status in (pod.get("status") or {}).get("containerStatuses") or []:
            terminated = (status.get("state") or {}).get("terminated") or {}
            if status.get("name") == container and terminated.get("exitCode") and terminated.get("message"):
                finished.append((terminated.get("finishedAt") or "", terminated["message"]))
    if not finished:
        return ""
    lines = [line.strip() for line in max(finished)[1].splitlines() if line.strip()]
    return lines[-1][:MESSAGE_CHARS] if lines else ""


def with_message(job: JobState, message: str) -> JobState:
    """The Job's state with its Pod's message as why it failed (the Job controller's text otherwise)."""
    return replace(job, message=message) if message else job


def serving_state(labels: dict, spec: dict, status: dict, generation: int | None) -> ServingState:
    """Ready = the current template is rolled out and every wanted replica is ready (under an HPA: its
    minReplicas, from the Deployment's label, so that scaling up under load does not clear Ready)."""
    try:
        revision = int(labels[r.LABEL_REVISION])
    except (KeyError, ValueError):
        revision = None
    try:
        min_ready = int(labels[LABEL_MIN_READY])
    except (KeyError, ValueError):
        min_ready = None
    wanted = wanted_ready(int(spec.get("replicas", 1)), min_ready)
    rolled_out = generation is None or int(status.get("observedGeneration") or 0) >= generation
    ready = (rolled_out and int(status.get("updatedReplicas") or 0) >= wanted
             and int(status.get("readyReplicas") or 0) >= wanted)
    return ServingState(revision=revision, ready=ready)


def read_reports(store: Any, cm: CompressedModel, jobs: Iterable[JobState]) -> dict[int, EvalReport]:
    """metrics.json of every succeeded evaluation Job that is still around."""
    reports: dict[int, EvalReport] = {}
    for job in jobs:
        if job.kind == "evaluate" and job.phase == "Succeeded":
            try:
                reports[job.revision] = EvalReport.read(store.path(names.eval_key(cm.namespace, cm.name, job.revision)))
            except (OSError, ValueError, KeyError):
                pass  # not readable (yet): the core waits for it
    return reports


def observe(cm: CompressedModel, jobs: Iterable[JobState], serving: ServingState | None, store: Any,
            now: datetime | None = None, online: tuple[OnlineReading, ...] = ()) -> Observed:
    jobs = tuple(sorted(jobs, key=lambda j: j.name))
    return Observed(model=cm, now=now or datetime.now(timezone.utc), jobs=jobs, serving=serving,
                    reports=read_reports(store, cm, jobs), online=tuple(sorted(online, key=lambda o: o.source)))
