"""The online stage in the reconcile core: shadow and canary candidates judged on live evidence, restart-safe."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from reconcile_world import World, drive, events, make_report, of_type

from kompressor.api import defaults as d
from kompressor.api.status import OnlineCounts
from kompressor.core import online, reasons
from kompressor.core.actions import EmitEvent, Serve
from kompressor.core.observed import OnlineReading

BUCKETS = len(d.ONLINE_LATENCY_BUCKETS) + 1


def counts(requests: int, agree: float = 1.0, errors: int = 0, labels: int = 0, right: int = 0,
           slower: int = 0) -> OnlineCounts:
    """Evidence of ``requests`` one-row requests, ``agree`` of them in agreement; the candidate's run times
    ``slower`` buckets above the serving revision's (bucket 3 for both when 0)."""
    serving = [0] * BUCKETS
    serving[3] = requests
    candidate = [0] * BUCKETS
    candidate[3 + slower] = requests
    return OnlineCounts(requests=requests, errors=errors, compared=requests - errors,
                        agreement=agree * (requests - errors), labels=labels, right=right,
                        candidate_latency=candidate, serving_latency=serving)


def reading(world: World, source: str, evidence: OnlineCounts, error: str | None = None) -> OnlineReading:
    """What a serving process given the last Serve's candidate reports."""
    candidate = world.served[-1].candidate
    assert candidate is not None, "the last Serve carries no candidate"
    return OnlineReading(source=source, revision=candidate.revision, sha256=candidate.artifact.sha256,
                         mode=candidate.mode, weight=candidate.weight, counts=evidence, error=error)


def to_online_stage(strategy: str, **promotion) -> World:
    """The first candidate through its offline gates, with the baseline serving it is judged against."""
    world = World.new({"promotion": {"strategy": strategy, "onlineGates": {"minRequests": 100}, **promotion}})
    world.step()
    world.finish("prune")
    world.step()
    world.finish("evaluate")
    decision = world.step()
    assert world.status.current_revision == d.BASELINE_REVISION and world.status.phase == "Promoting"
    assert reasons.ONLINE_STAGE_STARTED in events(decision)
    world.ready()
    world.step()
    return world


def test_shadow_serves_the_baseline_first_then_promotes_an_agreeing_candidate():
    world = to_online_stage("shadow")
    st = world.status
    assert (st.phase, st.current_revision, st.online.revision, st.online.weight) == ("Shadowing", 0, 1, 0.0)
    serve = world.served[-1]
    assert (serve.revision, serve.candidate.revision, serve.candidate.mode) == (0, 1, "shadow")

    world.online = [reading(world, "pod-a", counts(60))]
    world.step()
    assert world.status.phase == "Shadowing" and world.status.online.outcome == "Inconclusive"
    assert "60/100 live requests" in world.status.message

    world.online = [reading(world, "pod-a", counts(120, agree=0.99))]
    decision = world.step()
    assert reasons.ONLINE_GATES_PASSED in events(decision)
    assert (world.status.phase, world.status.current_revision, world.status.online) == ("Promoting", 1, None)
    assert world.served[-1].revision == 1 and world.served[-1].candidate is None
    verdict = world.status.revisions[-1].online
    assert (verdict.strategy, verdict.outcome, verdict.requests) == ("shadow", "Successful", 120)
    world.ready()
    world.step()
    assert world.status.phase == "Serving"


def test_shadow_rejects_a_candidate_that_disagrees_on_live_traffic_and_says_by_how_much():
    world = to_online_stage("shadow")
    world.online = [reading(world, "pod-a", counts(150, agree=0.7))]
    decision = world.step()
    st = world.status
    assert st.phase == "Rejected" and st.current_revision == 0 and st.online is None
    assert "online.minAgreement 0.7 vs 0.95 (Failed)" in st.message and "revision 0 keeps serving" in st.message
    assert reasons.ONLINE_GATES_FAILED in events(decision)
    assert world.served[-1].revision == 0 and world.served[-1].candidate is None  # all traffic on the baseline
    assert st.revisions[-1].online.outcome == "Failed" and st.revisions[-1].promoted_at is None


def test_a_canary_goes_step_by_step_and_each_step_needs_its_own_requests():
    world = to_online_stage("canary", canary={"steps": [10, 50]})
    assert world.status.phase == "Canary" and world.served[-1].candidate.weight == 10
    world.online = [reading(world, "pod-a", counts(100))]
    decision = world.step()
    assert reasons.CANARY_STEP in events(decision)
    assert world.status.online.step == 1 and world.served[-1].candidate.weight == 50

    world.step()  # the same evidence again: the new step has seen none of its own yet
    assert world.status.online.outcome == "Inconclusive" and world.served[-1].candidate.weight == 50
    world.online = [reading(world, "pod-a", counts(150))]  # a Pod of the new step (a weight change rolls Pods)
    world.online.append(reading(world, "pod-b", counts(60)))
    world.step()
    assert world.status.phase == "Promoting" and world.status.current_revision == 1
    assert world.status.revisions[-1].online.steps_passed == 2


def test_a_bad_canary_never_serves_more_than_its_first_share():
    world = to_online_stage("canary", canary={"steps": [10, 50]})
    world.online = [reading(world, "pod-a", counts(100, agree=0.5))]
    world.step()
    assert world.status.phase == "Rejected"
    weights = [s.candidate.weight for s in world.served if s.candidate is not None]
    assert set(weights) == {10.0}
    assert world.served[-1].candidate is None


@pytest.mark.parametrize("gate,evidence,expected", [
    ({"maxErrorRate": 0.01}, counts(200, errors=10), "online.maxErrorRate"),
    ({"maxLatencyRatio": 1.5, "minAgreement": None}, counts(200, slower=2), "online.maxLatencyRatio"),
    ({"minAccuracy": 0.9}, counts(200, labels=150, right=120), "online.minAccuracy"),
])
def test_each_online_gate_rejects_on_its_own(gate, evidence, expected):
    world = to_online_stage("shadow", onlineGates={"minRequests": 100, **gate})
    world.online = [reading(world, "pod-a", evidence)]
    world.step()
    assert world.status.phase == "Rejected", world.status.message
    failed = [r.gate for r in world.status.revisions[-1].online.results if r.outcome == "Failed"]
    assert failed == [expected]


def test_accuracy_waits_for_enough_labels():
    world = to_online_stage("shadow", onlineGates={"minRequests": 100, "minAccuracy": 0.9})
    world.online = [reading(world, "pod-a", counts(300, labels=40, right=40))]
    world.step()
    assert world.status.phase == "Shadowing" and world.status.online.outcome == "Inconclusive"
    world.online = [reading(world, "pod-a", counts(400, labels=120, right=118))]
    world.step()
    assert world.status.phase == "Promoting"


def test_the_same_evidence_read_again_or_after_an_operator_restart_is_counted_once():
    world = to_online_stage("shadow", onlineGates={"minRequests": 100})
    world.online = [reading(world, "pod-a", counts(40))]
    for _ in range(3):
        world.step()
    assert world.status.online.totals.requests == 40
    # the serving Pod restarts: a new source counts from 0, the old one's counts stay
    world.online = [reading(world, "pod-a2", counts(30))]
    world.step()
    assert world.status.online.totals.requests == 70
    # the same process is given the candidate again (its counts went down): it starts over
    world.online = [reading(world, "pod-a2", counts(10))]
    world.step()
    assert world.status.online.totals.requests == 80
    # the operator restarts between reading and writing status: the reading folds once
    before = copy.deepcopy(world.model.status)
    world.online = [reading(world, "pod-a2", counts(25))]
    world.step(write_status=False)
    assert world.model.status == before
    world.step()
    assert world.status.online.totals.requests == 95


def test_evidence_of_another_candidate_is_ignored():
    world = to_online_stage("shadow")
    other = reading(world, "pod-a", counts(500, agree=0.1))
    world.online = [OnlineReading(source=other.source, revision=other.revision, sha256="0" * 64, mode="shadow",
                                  weight=0.0, counts=other.counts)]
    world.step()
    assert world.status.phase == "Shadowing" and world.status.online.totals.requests == 0


def test_a_candidate_the_server_cannot_load_is_an_error():
    world = to_online_stage("shadow")
    world.online = [reading(world, "pod-a", OnlineCounts(), error="sha256 mismatch")]
    world.step()
    assert world.status.phase == "Rejected" and world.status.revisions[-1].online.outcome == "Error"
    assert "sha256 mismatch" in world.status.message


@pytest.mark.parametrize("on_inconclusive,phase", [("reject", "Rejected"), ("promote", "Promoting")])
def test_inconclusive_at_the_deadline_does_what_the_spec_says(on_inconclusive, phase):
    world = to_online_stage("shadow", onInconclusive=on_inconclusive, onlineDeadlineSeconds=600)
    world.online = [reading(world, "pod-a", counts(20))]
    world.advance(599)
    world.step()
    assert world.status.phase == "Shadowing"
    world.advance(2)
    world.step()
    assert world.status.phase == phase
    assert world.status.revisions[-1].online.outcome == "Inconclusive"


def test_a_new_compression_supersedes_the_stage():
    world = to_online_stage("shadow")
    world.edit({"compression": {"pruning": {"sparsity": 0.6}}})
    decision = world.step()
    assert world.status.online is None and world.status.phase == "Compressing"
    assert reasons.ONLINE_STAGE_SUPERSEDED in events(decision)
    assert world.status.revisions[-1].online.outcome == "Superseded"
    assert world.served[-1].candidate is None and world.served[-1].revision == 0


def test_paused_folds_evidence_but_decides_nothing():
    world = to_online_stage("shadow")
    world.edit({"promotion": {"paused": True}})
    world.online = [reading(world, "pod-a", counts(300, agree=0.2))]
    world.step()
    assert world.status.phase == "Paused" and world.status.online.totals.requests == 300
    world.edit({"promotion": {"paused": False}})
    world.step()
    assert world.status.phase == "Rejected"


def test_a_later_candidate_is_judged_against_the_serving_revision():
    world = to_online_stage("shadow")
    world.online = [reading(world, "pod-a", counts(120))]
    world.step()
    world.ready()
    world.step()
    assert (world.status.phase, world.status.current_revision) == ("Serving", 1)
    world.edit({"compression": {"pruning": {"sparsity": 0.6}}})
    world.step()
    world.finish("prune")
    world.step()
    world.finish("evaluate", report=make_report(world.status.candidate.revision, sparsity=0.6))
    world.step()
    assert world.status.phase == "Shadowing" and world.status.online.revision == 2
    assert world.served[-1].revision == 1 and world.served[-1].candidate.revision == 2


def test_p95_from_summed_histograms_interpolates_like_histogram_quantile():
    rng = np.random.default_rng(0)
    times = rng.uniform(0.001, 0.0025, size=2000)  # all inside one bucket: linear interpolation is exact
    bounds = np.array(d.ONLINE_LATENCY_BUCKETS)
    histogram = np.bincount(np.searchsorted(bounds, times), minlength=len(bounds) + 1).tolist()
    assert online.quantile(histogram, 0.95) == pytest.approx(np.quantile(times, 0.95), rel=0.01)
    assert online.quantile([0] * BUCKETS, 0.95) is None


def online_lifecycle(world: World, step) -> None:
    """Shadow rejects a disagreeing candidate; a retry's candidate then passes a two-step canary."""
    step()
    world.finish("prune")
    step()
    world.finish("evaluate")
    step()
    world.ready()
    step()
    world.online = [reading(world, "pod-a", counts(60))]
    step()
    world.online = [reading(world, "pod-a", counts(130, agree=0.5))]
    step()
    world.online = []
    world.edit({"promotion": {"strategy": "canary", "canary": {"steps": [20, 60]}}})
    world.annotate(d.ANNOTATION_RETRY, "again")
    step()
    world.finish("prune")
    step()
    world.finish("evaluate", report=make_report(world.status.candidate.revision))
    step()
    world.online = [reading(world, "pod-a", counts(110))]
    step()
    world.online = [reading(world, "pod-b", counts(50))]
    step()
    world.online.append(reading(world, "pod-c", counts(70)))
    step()
    world.ready()
    step()


def run_online(crash_at: int | None = None, crash: dict | None = None) -> World:
    world = World.new({"promotion": {"strategy": "shadow", "onlineGates": {"minRequests": 100}}})
    return drive(world, online_lifecycle, crash_at, crash)


ONLINE_REFERENCE = run_online()
CRASHES = {
    "status written, no action applied": {"write_status": True, "apply_actions": 0},
    "actions applied, status not written": {"write_status": False, "apply_actions": True},
    "nothing applied": {"write_status": False, "apply_actions": 0},
}


def test_the_online_lifecycle_rejects_then_promotes_through_the_canary():
    st = ONLINE_REFERENCE.status
    assert (st.phase, st.current_revision) == ("Serving", 2)
    assert [(r.revision, r.online.outcome if r.online else None) for r in st.revisions] == [
        (0, None), (1, "Failed"), (2, "Successful")]
    promoted = [e for dec in ONLINE_REFERENCE.decisions for e in of_type(dec, EmitEvent)
                if e.reason == reasons.PROMOTING]
    assert [e.message for e in promoted] == ["Promoting revision 0", "Promoting revision 2"]


@pytest.mark.parametrize("crash", list(CRASHES), ids=list(CRASHES))
def test_a_crash_at_any_point_of_the_online_stage_converges_without_double_counting_or_promoting(crash):
    steps = len(ONLINE_REFERENCE.decisions)
    for crash_at in range(1, steps + 1):
        world = run_online(crash_at, CRASHES[crash])
        where = f"crash at reconcile {crash_at}"
        assert world.status == ONLINE_REFERENCE.status, where
        assert world.created_jobs == ONLINE_REFERENCE.created_jobs, where
        promotions = [s.revision for s in world.served if isinstance(s, Serve)]
        assert sorted(set(promotions)) == [0, 2], where  # revision 1 never served
