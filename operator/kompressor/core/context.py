"""One reconcile's working state: a private copy of the status, the observation, and the actions
collected so far. The steps in compression.py, promotion.py and drift_actions.py edit it."""

from __future__ import annotations

import copy
import hashlib
import json

from kompressor.api.spec import compression_inputs
from kompressor.api.status import Candidate, CompressedModelStatus
from kompressor.core import conditions, names, reasons, times
from kompressor.core.actions import Action, Decision, DeleteJob, EmitEvent, Requeue, RunJob, Serve
from kompressor.core.observed import Observed


def compression_digest(spec) -> str:
    """Digest of the spec parts whose edit starts a new compression."""
    text = json.dumps(compression_inputs(spec), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


class Run:
    """One reconcile's working state: a private copy of the status and the actions collected."""

    def __init__(self, observed: Observed):
        self.obs = observed
        self.model = observed.model
        self.spec = observed.model.spec
        self.gen = observed.model.generation
        self.annotations = observed.model.annotations
        self.st: CompressedModelStatus = copy.deepcopy(observed.model.status)
        self.now = times.aware(observed.now)
        self.stamp = times.rfc3339(self.now)
        self.digest = compression_digest(self.spec)
        self.jobs = {job.name: job for job in observed.jobs}
        self.deletes: list[DeleteJob] = []
        self.runs: list[RunJob] = []
        self.events: list[EmitEvent] = []
        self.serves: list[Serve] = []
        self.requeue: float | None = None
        self.paused = False

    # -- helpers -------------------------------------------------------------------------------
    def phase(self, phase: str, message: str) -> None:
        self.st.phase, self.st.message = phase, message

    def event(self, reason: str, message: str, warning: bool = False) -> None:
        self.events.append(EmitEvent(type="Warning" if warning else "Normal", reason=reason, message=message))

    def wait(self, seconds: float) -> None:
        seconds = max(float(seconds), 1.0)
        self.requeue = seconds if self.requeue is None else min(self.requeue, seconds)

    def job_name(self, kind: str, candidate: Candidate) -> str:
        return names.job_name(self.model.name, kind, candidate.revision, candidate.generation)

    def run_job(self, kind: str, candidate: Candidate) -> RunJob:
        return RunJob(kind=kind, name=self.job_name(kind, candidate), revision=candidate.revision,
                      generation=candidate.generation,
                      candidate_key=names.candidate_key(self.model.namespace, self.model.name, candidate.revision),
                      eval_key=names.eval_key(self.model.namespace, self.model.name, candidate.revision),
                      retrain=candidate.reason == "retrain")

    def serving_at(self, revision: int | None) -> bool:
        serving = self.obs.serving
        return revision is not None and serving is not None and serving.ready and serving.revision == revision

    def candidate_failed(self) -> bool:
        """A failed candidate stays in status (so a retry knows what it retries) until replaced."""
        compressed = conditions.get(self.st, "Compressed")
        return self.st.candidate is not None and compressed is not None and compressed.reason == reasons.JOB_FAILED

    def candidate_in_flight(self) -> bool:
        return self.st.candidate is not None and not self.candidate_failed()

    def decision(self) -> Decision:
        deletes, seen = [], set()
        for action in self.deletes:
            if action.name not in seen:
                seen.add(action.name)
                deletes.append(action)
        actions: list[Action] = [*deletes, *self.runs, *self.serves, *self.events]
        if self.requeue is not None:
            actions.append(Requeue(after_seconds=self.requeue))
        return Decision(status=self.st, actions=tuple(actions))
