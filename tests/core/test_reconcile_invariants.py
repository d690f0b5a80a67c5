"""Properties that hold for every reconcile: restart safety, purity, determinism, conditions, events."""

import copy
import re
import subprocess
import sys
from datetime import timedelta

import pytest
from reconcile_world import World, drive, events, make_report

from kompressor.api import defaults as d
from kompressor.api.status import CONDITION_TYPES
from kompressor.core import reasons
from kompressor.core.actions import EmitEvent
from kompressor.core.reconcile import reconcile

CAMEL = re.compile(r"^[A-Z][A-Za-z0-9]*$")
KNOWN_REASONS = {v for k, v in vars(reasons).items() if k.isupper()}


def lifecycle(world: World, step) -> None:
    """A long life: promote, recompress (edited mid-way), reject, retry, approve, drift → rollback,
    drift → retrain, pause and unpause, drift → flapping prevented → resume → rollback.
    ``step`` is one reconcile (tests inject crashes into it)."""
    step()
    world.finish("prune")
    step()
    world.finish("evaluate")
    step()
    world.ready()
    step()
    world.advance(60)
    world.edit({"compression": {"pruning": {"sparsity": 0.6}}})
    step()
    world.finish("prune")
    step()
    world.advance(5)
    world.edit({"compression": {"pruning": {"sparsity": 0.7}}})  # mid-compression edit
    step()
    world.finish("prune")
    step()
    world.finish("evaluate", report=make_report(world.status.candidate.revision, passed=False, accuracy=0.9))
    step()
    world.annotate(d.ANNOTATION_RETRY, "1")
    step()
    world.finish("prune")
    step()
    world.advance(5)
    world.edit({"promotion": {"requireApproval": True}})
    world.finish("evaluate", report=make_report(world.status.candidate.revision, sparsity=0.7))
    step()
    world.annotate(d.ANNOTATION_APPROVE, str(world.status.revisions[-1].revision))
    step()
    world.ready()
    step()
    world.watcher(consecutive=1)
    step()
    world.watcher(consecutive=2)
    step()  # rollback to revision 1
    world.ready()
    step()
    world.edit({"drift": {"action": "retrain"}})
    world.advance(60)
    world.watcher(consecutive=2)
    step()  # retrain revision 1 → candidate
    world.finish("prune")
    step()
    world.finish("evaluate", report=make_report(world.status.candidate.revision))
    step()  # awaiting approval: a retrain is gated and approved as usual
    world.annotate(d.ANNOTATION_APPROVE, str(world.status.revisions[-1].revision))
    step()
    world.ready()
    step()
    world.edit({"promotion": {"paused": True}})
    step()
    world.edit({"promotion": {"paused": False}, "drift": {"action": "rollback"}})
    step()
    world.watcher(consecutive=2)
    step()  # the previous promoted revision (1) drifted before: paused, no flapping
    world.annotate(d.ANNOTATION_RESUME, "go")
    step()  # a person resumes: back to revision 1
    world.ready()
    step()


def run_lifecycle(crash_at: int | None = None, crash: dict | None = None) -> World:
    return drive(World.new(), lifecycle, crash_at, crash)


REFERENCE = run_lifecycle()
STEPS = len(REFERENCE.decisions)
CRASHES = {
    "status written, no action applied": {"write_status": True, "apply_actions": 0},
    "status written, first action applied": {"write_status": True, "apply_actions": 1},
    "actions applied, status not written": {"write_status": False, "apply_actions": True},
    "nothing applied": {"write_status": False, "apply_actions": 0},
}


def test_the_lifecycle_reaches_what_it_should():
    st = REFERENCE.status
    assert st.phase == "Serving"
    assert [(r.revision, r.reason) for r in st.revisions] == [
        (0, None), (1, "initial"), (3, "specChange"), (4, "retry"), (5, "retrain")]  # 2: abandoned mid-way
    assert (st.current_revision, st.last_promoted_revision, st.retrains, st.auto_actions) == (1, 5, 1, 1)
    assert [e for d in REFERENCE.decisions for e in events(d)].count(reasons.FLAPPING_PREVENTED) == 1
    assert len(REFERENCE.created_jobs) == len(set(REFERENCE.created_jobs)) == 10  # 5 pairs


@pytest.mark.parametrize("crash", list(CRASHES), ids=list(CRASHES))
def test_a_crash_at_any_point_converges_without_duplicates_or_lost_revisions(crash):
    for crash_at in range(1, STEPS + 1):
        world = run_lifecycle(crash_at, CRASHES[crash])
        where = f"crash at reconcile {crash_at}"
        assert world.status == REFERENCE.status, where
        assert world.created_jobs == REFERENCE.created_jobs, where  # same Jobs, same names, none extra
        assert world.jobs.keys() == REFERENCE.jobs.keys(), where


def observations():
    """The observation behind every reconcile of the lifecycle."""
    seen = []
    world = World.new()

    def step():
        seen.append(world.observed())
        world.step()

    lifecycle(world, step)
    return seen


OBSERVATIONS = observations()


def test_reconcile_is_pure_and_deterministic():
    for observed in OBSERVATIONS:
        before = copy.deepcopy(observed)
        first, second = reconcile(observed), reconcile(observed)
        assert observed == before  # input not mutated
        assert first == second  # same input, same output
        assert first.status is not observed.model.status
        assert all(a is not b for a, b in zip(first.status.revisions, observed.model.status.revisions))
        in_reports = {id(part) for report in observed.reports.values()
                      for part in (report.artifact, report.metrics, report.gates)}
        assert not any(id(part) in in_reports for r in first.status.revisions
                       for part in (r.artifact, r.metrics, r.gates))  # no aliasing with the input


def test_reconcile_does_not_depend_on_the_order_jobs_are_listed_in():
    for observed in OBSERVATIONS:
        shuffled = copy.deepcopy(observed)
        object.__setattr__(shuffled, "jobs", tuple(reversed(observed.jobs)))
        assert reconcile(shuffled).status == reconcile(observed).status


def test_every_condition_follows_the_kubernetes_conventions():
    world = World.new()
    history = []

    def step():
        world.advance(7)
        history.append(world.step().status)

    lifecycle(world, step)
    previous = {}
    for status, observed in zip(history, OBSERVATIONS):
        assert [c.type for c in status.conditions] == list(CONDITION_TYPES)
        for c in status.conditions:
            assert CAMEL.match(c.reason), c
            assert c.message
            assert c.observed_generation == status.observed_generation
            old = previous.get(c.type)
            if old is not None and old.status == c.status:
                assert c.last_transition_time == old.last_transition_time, (old, c)
            elif old is not None:
                assert c.last_transition_time != old.last_transition_time, (old, c)
            previous[c.type] = c
        assert status.message, status.phase


def test_every_event_uses_a_known_camel_case_reason_and_every_phase_change_emits_one():
    world = World.new()
    phases = []

    def step():
        before = world.status.phase
        decision = world.step()
        phases.append((before, decision))

    lifecycle(world, step)
    for before, decision in phases:
        emitted = [a for a in decision.actions if isinstance(a, EmitEvent)]
        for event in emitted:
            assert event.reason in KNOWN_REASONS and CAMEL.match(event.reason)
            assert event.type in ("Normal", "Warning") and event.message
        if decision.status.phase != before:
            assert emitted, f"{before} → {decision.status.phase} emitted no event"


def test_observed_generation_is_the_generation_acted_on():
    world = World.new()
    world.to_serving()
    world.edit({"serving": {"replicas": 2}})
    world.edit({"serving": {"replicas": 3}})
    assert world.step().status.observed_generation == 3


def test_the_core_imports_no_ml_library():
    code = ("import sys, kompressor.core.reconcile;"
            "print([m for m in ('torch', 'onnxruntime', 'alibi_detect', 'onnx', 'sklearn', 'kopf', 'kubernetes')"
            " if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_a_naive_clock_is_read_as_utc():
    world = World.new()
    aware = reconcile(world.observed()).status.candidate.started_at
    world.now = world.now.replace(tzinfo=None)
    assert reconcile(world.observed()).status.candidate.started_at == aware == "2026-11-22T12:00:00Z"


def test_a_decision_is_a_fixed_point_so_idle_reconciles_write_nothing():
    """Reconciling the decided status again, with nothing else changed (a minute later), decides
    the same status: adapters patch nothing and the embedded runner's loop settles."""
    for observed in OBSERVATIONS:
        first = reconcile(observed)
        model = copy.deepcopy(observed.model)
        model.status = first.status
        again = reconcile(type(observed)(model=model, now=observed.now + timedelta(minutes=1), jobs=observed.jobs,
                                         serving=observed.serving, reports=observed.reports))
        assert again.status == first.status, (first.status.phase, again.status.phase)
        assert not [a for a in again.actions if isinstance(a, EmitEvent)]
