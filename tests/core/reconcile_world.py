"""Small factories for reconcile-core tests, and a tiny world that applies decisions like an adapter.

The world is not a mock of our code: it plays the cluster (Jobs, the serving workload, the drift
watcher) the way the adapters report it, so that a test can drive the real ``reconcile`` through
a whole lifecycle and inspect what it decided.
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone

from kompressor.api import defaults as d
from kompressor.api.manifest import CompressedModel, parse_manifest
from kompressor.api.report import EvalReport
from kompressor.api.status import Artifact, DriftVerdict, GateResult, Gates, Metrics
from kompressor.core import names
from kompressor.core.actions import Decision, DeleteJob, EmitEvent, Requeue, RunJob, Serve
from kompressor.core.observed import JobState, Observed, ServingState
from kompressor.core.reconcile import reconcile
from kompressor.core.times import rfc3339
from support.dicts import merge

T0 = datetime(2026, 11, 22, 12, 0, 0, tzinfo=timezone.utc)
NAME = "digits"
NAMESPACE = "team-a"
BASELINE_ACCURACY = 0.97


BASE_SPEC = {
    "model": {"uri": "builtin://digits-mlp"},
    "data": {"train": "builtin://digits?split=train", "eval": "builtin://digits?split=eval",
             "retrain": "file:///data/recent.npz"},
    "compression": {"pruning": {"sparsity": 0.5}},
    "gates": {"maxAccuracyDrop": 0.02},
    "drift": {"consecutiveWindows": 2, "cooldownSeconds": 0, "action": "rollback"},
}


def make_model(spec: dict | None = None, generation: int = 1, annotations: dict | None = None) -> CompressedModel:
    doc = {"apiVersion": d.API_VERSION, "kind": d.KIND,
           "metadata": {"name": NAME, "namespace": NAMESPACE, "generation": generation,
                        "annotations": annotations or {}},
           "spec": merge(BASE_SPEC, spec or {})}
    return parse_manifest(doc)


def artifact(tag: str) -> Artifact:
    return Artifact(uri=f"file:///store/{tag}", sha256=hashlib.sha256(tag.encode()).hexdigest())


def make_report(revision: int, passed: bool = True, accuracy: float = 0.96, sparsity: float = 0.5,
                baseline_tag: str = "baseline-digits-mlp") -> EvalReport:
    drop = BASELINE_ACCURACY - accuracy
    results = [GateResult(gate="maxAccuracyDrop", value=drop, threshold=0.02,
                          outcome="Successful" if passed else "Failed",
                          message="" if passed else "accuracy dropped too much")]
    return EvalReport(
        metrics=Metrics(accuracy=accuracy, sparsity=sparsity, f1=accuracy - 0.01),
        gates=Gates(passed=passed, results=results),
        artifact=artifact(f"r{revision}"),
        baseline_artifact=artifact(baseline_tag),
        baseline_metrics=Metrics(accuracy=BASELINE_ACCURACY, sparsity=0.0),
    )


def verdict(revision: int, consecutive: int, checked_at: datetime, is_drift: bool | None = None,
            outcome: str | None = None) -> DriftVerdict:
    drifting = consecutive > 0 if is_drift is None else is_drift
    return DriftVerdict(is_drift=drifting, outcome=outcome or ("Drift" if drifting else "NoDrift"),
                        p_value=0.001 if drifting else 0.4, consecutive=consecutive,
                        checked_at=rfc3339(checked_at), revision=revision, detector="ks", samples=200)


def events(decision: Decision) -> list[str]:
    return [a.reason for a in decision.actions if isinstance(a, EmitEvent)]


def of_type(decision: Decision, kind: type) -> list:
    return [a for a in decision.actions if isinstance(a, kind)]


def condition(status, type_: str):
    return next(c for c in status.conditions if c.type == type_)


@dataclass
class World:
    """The cluster as the adapters would report it, applying decisions the way they do."""

    model: CompressedModel
    now: datetime = T0
    jobs: dict[str, JobState] = field(default_factory=dict)
    serving: ServingState | None = None
    reports: dict[int, EvalReport] = field(default_factory=dict)
    online: list = field(default_factory=list)  # OnlineReadings the serving processes give now
    created_jobs: list[str] = field(default_factory=list)  # every Job ever created, in order
    served: list[Serve] = field(default_factory=list)
    decisions: list[Decision] = field(default_factory=list)

    @classmethod
    def new(cls, spec: dict | None = None, annotations: dict | None = None) -> "World":
        return cls(model=make_model(spec, annotations=annotations))

    # -- what the adapters do ----------------------------------------------------------------
    def observed(self, snapshot: bool = True) -> Observed:
        """What an adapter would observe now (``snapshot``: a copy later world changes do not touch)."""
        model = copy.deepcopy(self.model) if snapshot else self.model
        return Observed(model=model, now=self.now, jobs=tuple(self.jobs.values()),
                        serving=self.serving, reports=dict(self.reports), online=tuple(self.online))

    def step(self, write_status: bool = True, apply_actions: bool | int = True) -> Decision:
        """One reconcile. ``write_status=False`` or ``apply_actions`` = False / a count simulate a
        crash after part of the decision was applied."""
        decision = reconcile(self.observed(snapshot=False))  # reconcile never mutates its input (tested)
        self.decisions.append(decision)
        if write_status:
            self.model.status = copy.deepcopy(decision.status)
        actions = decision.actions
        if apply_actions is not True:
            actions = actions[: int(apply_actions)]
        for action in actions:
            self.apply(action)
        return decision

    def apply(self, action) -> None:
        if isinstance(action, RunJob):
            if action.name not in self.jobs:  # "already exists" is fine
                self.jobs[action.name] = JobState(name=action.name, kind=action.kind, revision=action.revision,
                                                  generation=action.generation, phase="Running")
                self.created_jobs.append(action.name)
        elif isinstance(action, DeleteJob):
            self.jobs.pop(action.name, None)  # "not found" is fine
        elif isinstance(action, Serve):
            self.served.append(action)
            if self.serving is None or self.serving.revision != action.revision:
                self.serving = ServingState(revision=action.revision, ready=False)
        elif isinstance(action, (EmitEvent, Requeue)):
            pass

    def settle(self, limit: int = 10) -> Decision:
        """Reconcile until the status stops changing and no Job is created."""
        for _ in range(limit):
            before, jobs = copy.deepcopy(self.model.status), set(self.jobs)
            decision = self.step()
            if decision.status == before and set(self.jobs) == jobs:
                return decision
        raise AssertionError("reconcile did not settle")

    # -- what the cluster does -----------------------------------------------------------------
    @property
    def status(self):
        return self.model.status

    def job(self, kind: str, revision: int | None = None, generation: int | None = None) -> JobState:
        matches = [j for j in self.jobs.values() if j.kind == kind
                   and (revision is None or j.revision == revision)
                   and (generation is None or j.generation == generation)]
        assert len(matches) == 1, f"expected one {kind} job, have {list(self.jobs)}"
        return matches[0]

    def finish(self, kind: str, phase: str = "Succeeded", message: str = "", report: EvalReport | None = None) -> None:
        job = self.job(kind, revision=self.status.candidate.revision if self.status.candidate else None)
        self.jobs[job.name] = replace(job, phase=phase, message=message)
        if kind == "evaluate" and phase == "Succeeded":
            self.reports[job.revision] = report or make_report(job.revision)

    def ready(self) -> None:
        assert self.serving is not None
        self.serving = ServingState(revision=self.serving.revision, ready=True)

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)

    def edit(self, spec: dict) -> None:
        """A person edits the spec: the API server bumps the generation."""
        self.model.spec = make_model(merge(self.model.raw_spec, spec)).spec
        self.model.raw_spec = merge(self.model.raw_spec, spec)
        self.model.generation += 1

    def annotate(self, key: str, value: str) -> None:
        self.model.annotations[key] = value

    def watcher(self, consecutive: int, revision: int | None = None, **kw) -> None:
        """The drift watcher patches status.drift (checked one second after now)."""
        self.advance(1)
        rev = self.status.current_revision if revision is None else revision
        self.model.status.drift = verdict(rev, consecutive, self.now, **kw)

    def to_serving(self, report: EvalReport | None = None) -> None:
        """Drive the current candidate through prune, evaluate and promotion to Serving."""
        self.step()
        self.finish("prune")
        self.step()
        self.finish("evaluate", report=report)
        self.step()
        self.ready()
        self.step()
        assert self.status.phase == "Serving", self.status.message


def names_of(world: World, kind: str, revision: int, generation: int) -> str:
    return names.job_name(NAME, kind, revision, generation)


def drive(world: World, lifecycle, crash_at: int | None = None, crash: dict | None = None) -> World:
    """Run ``lifecycle(world, step)``; at the ``crash_at``-th reconcile the adapter first dies part-way through
    applying the decision (``crash``: World.step's arguments), and the next reconcile runs on what it left."""
    count = 0

    def step():
        nonlocal count
        count += 1
        if count == crash_at:
            world.step(**crash)
        world.step()

    lifecycle(world, step)
    return world
