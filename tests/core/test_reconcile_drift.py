"""Drift verdicts and what they trigger: hysteresis, rollback, retrain, alert, cooldown, limits, pausing."""

from datetime import timedelta

import pytest
from reconcile_world import World, condition, events, make_report, of_type

from kompressor.api import defaults as d
from kompressor.core import reasons
from kompressor.core.actions import Requeue, RunJob, Serve
from kompressor.core.times import rfc3339


def two_promoted(spec=None) -> World:
    """Revision 1 promoted, then revision 2 (a spec change) promoted and serving."""
    world = World.new(spec)
    world.to_serving()
    world.advance(60)
    world.edit({"compression": {"pruning": {"sparsity": 0.6}}})
    world.to_serving(make_report(2, sparsity=0.6, accuracy=0.955))
    assert world.status.current_revision == 2
    return world


def test_one_drifting_check_alone_does_nothing():
    world = two_promoted()
    world.watcher(consecutive=1)
    decision = world.step()
    assert decision.status.phase == "Serving" and decision.status.current_revision == 2
    drifted = condition(decision.status, "Drifted")
    assert (drifted.status, drifted.reason) == ("False", reasons.DRIFT_SUSPECTED)
    assert events(decision) == [] and condition(decision.status, "Ready").status == "True"


@pytest.mark.parametrize("verdict_kw, status, reason", [
    ({"consecutive": 0}, "False", reasons.NO_DRIFT),
    ({"consecutive": 0, "is_drift": False, "outcome": "Inconclusive"}, "Unknown", reasons.DRIFT_INCONCLUSIVE),
    ({"consecutive": 1}, "False", reasons.DRIFT_SUSPECTED),
    ({"consecutive": 2}, "True", reasons.DRIFT_CONFIRMED),
])
def test_drifted_condition_follows_the_verdict(verdict_kw, status, reason):
    world = two_promoted({"drift": {"action": "alert"}})
    world.watcher(**verdict_kw)
    drifted = condition(world.step().status, "Drifted")
    assert (drifted.status, drifted.reason) == (status, reason)


def test_drifted_condition_without_verdict_or_watcher():
    world = two_promoted()
    assert condition(world.status, "Drifted").reason == reasons.AWAITING_VERDICT
    world.edit({"drift": {"enabled": False}})
    world.watcher(consecutive=5)
    decision = world.step()
    assert condition(decision.status, "Drifted").reason == reasons.DRIFT_DISABLED
    assert decision.status.phase == "Serving"  # no watcher: no action


def test_confirmed_drift_rolls_back_to_the_previous_promoted_revision_without_regating():
    world = two_promoted()
    world.watcher(consecutive=2)
    decision = world.step()
    st = decision.status
    assert st.phase == "RollingBack" and st.current_revision == 1 and st.last_promoted_revision == 2
    assert events(decision) == [reasons.DRIFT_DETECTED, reasons.ROLLING_BACK]
    assert of_type(decision, RunJob) == []  # no gates re-run
    assert of_type(decision, Serve)[0].revision == 1
    assert (st.auto_actions, st.last_auto_action_at) == (1, st.revisions[1].promoted_at)
    assert next(r for r in st.revisions if r.revision == 2).drifted_at is not None
    assert (st.sparsity, st.accuracy) == (0.5, 0.96)  # of the serving revision
    world.ready()
    done = world.step()
    assert done.status.phase == "Serving" and events(done) == [reasons.ROLLED_BACK]
    promoted = condition(done.status, "Promoted")
    assert (promoted.status, promoted.reason) == ("True", reasons.ROLLED_BACK)
    drifted = condition(done.status, "Drifted")  # the old verdict is about revision 2: not ours any more
    assert (drifted.status, drifted.reason) == ("Unknown", reasons.AWAITING_VERDICT)


def test_rollback_to_baseline_serves_revision_0():
    world = two_promoted({"drift": {"rollbackTo": "baseline"}})
    world.watcher(consecutive=3)
    decision = world.step()
    assert decision.status.current_revision == 0 and of_type(decision, Serve)[0].revision == 0
    assert of_type(decision, Serve)[0].artifact == world.status.revisions[0].artifact


def test_nothing_to_roll_back_to_is_said_once():
    world = World.new()
    world.to_serving()  # revision 1 is the only promoted revision
    world.watcher(consecutive=2)
    decision = world.step()
    st = decision.status
    assert st.phase == "DriftDetected" and "no rollback target" in st.message and st.current_revision == 1
    assert events(decision) == [reasons.DRIFT_DETECTED, reasons.NO_ROLLBACK_TARGET]
    ready = condition(st, "Ready")
    assert (ready.status, ready.reason) == ("False", reasons.DRIFT_DETECTED)
    assert st.auto_actions == 0
    assert events(world.step()) == []  # not repeated
    world.watcher(consecutive=0)
    cleared = world.step()
    assert cleared.status.phase == "Serving" and events(cleared) == [reasons.DRIFT_CLEARED]


def test_alert_only_raises_the_condition_and_an_event():
    world = two_promoted({"drift": {"action": "alert"}})
    world.watcher(consecutive=2)
    decision = world.step()
    assert decision.status.phase == "DriftDetected" and decision.status.current_revision == 2
    assert events(decision) == [reasons.DRIFT_DETECTED] and of_type(decision, RunJob) == []
    assert decision.status.auto_actions == 0
    world.watcher(consecutive=3)
    assert events(world.step()) == []


@pytest.mark.parametrize("verdict_kw", [
    {"revision": 1, "consecutive": 5},  # about another revision than the serving one
])
def test_verdicts_about_another_revision_are_ignored(verdict_kw):
    world = two_promoted()
    world.watcher(**verdict_kw)
    assert world.step().status.phase == "Serving"


def test_verdicts_checked_before_the_last_automatic_action_are_ignored():
    world = two_promoted({"drift": {"rollbackTo": "baseline"}})
    world.watcher(consecutive=2)
    world.step()  # rollback to 0 at t
    world.ready()
    world.step()
    stale = world.status.drift
    stale.revision = 0  # same instant as the rollback: written before it
    stale.checked_at = world.status.last_auto_action_at
    world.model.status.drift = stale
    decision = world.step()
    assert decision.status.phase == "Serving" and decision.status.current_revision == 0


class TestRetrain:
    def test_retrain_makes_a_new_candidate_gated_and_promoted_as_usual(self):
        world = World.new({"drift": {"action": "retrain"}})
        world.to_serving()
        world.watcher(consecutive=2)
        decision = world.step()
        st = decision.status
        assert st.phase == "Retraining" and (st.candidate.revision, st.candidate.reason) == (2, "retrain")
        assert [(a.kind, a.retrain) for a in of_type(decision, RunJob)] == [("prune", True)]
        assert events(decision) == [reasons.DRIFT_DETECTED, reasons.RETRAINING, reasons.COMPRESSION_STARTED]
        assert (st.retrains, st.auto_actions) == (1, 1)
        assert of_type(decision, Serve)[0].revision == 1  # revision 1 keeps serving meanwhile
        world.watcher(consecutive=3)  # recorded during the retrain, not acted on twice
        during = world.step()
        assert during.status.retrains == 1 and of_type(during, RunJob) == [] and events(during) == []
        assert condition(during.status, "Drifted").status == "True"
        world.finish("prune")
        assert world.step().status.phase == "Evaluating"
        world.finish("evaluate", report=make_report(2))
        world.step()
        world.ready()
        served = world.step()
        assert served.status.phase == "Serving" and served.status.current_revision == 2
        assert served.status.revisions[-1].reason == "retrain"
        assert of_type(served, Serve)[0].drift_reference == "file:///data/recent.npz"  # the reference moved

    def test_max_retrains_holds(self):
        world = World.new({"drift": {"action": "retrain", "maxRetrains": 1, "maxAutoActions": 10}})
        world.to_serving()
        world.watcher(consecutive=2)
        world.step()
        world.to_serving(make_report(2))
        world.watcher(consecutive=2)
        decision = world.step()
        assert decision.status.phase == "DriftDetected" and "maxRetrains" in decision.status.message
        assert events(decision) == [reasons.DRIFT_DETECTED, reasons.RETRAIN_LIMIT_REACHED]
        assert of_type(decision, RunJob) == [] and decision.status.retrains == 1

    def test_a_rejected_retrain_can_be_retried_and_retrains_again(self):
        world = World.new({"drift": {"action": "retrain"}})
        world.to_serving()
        world.watcher(consecutive=2)
        world.step()
        world.finish("prune")
        world.step()
        world.finish("evaluate", report=make_report(2, passed=False, accuracy=0.5))
        assert world.step().status.phase == "Rejected"
        world.annotate(d.ANNOTATION_RETRY, "again")
        decision = world.step()
        assert decision.status.candidate.reason == "retrain"
        assert [a.retrain for a in of_type(decision, RunJob)] == [True]
        assert decision.status.retrains == 1  # a person asked: not an automatic retrain


def test_cooldown_holds_the_next_action_and_requeues_for_its_end():
    world = two_promoted({"drift": {"cooldownSeconds": 300, "rollbackTo": "baseline", "maxAutoActions": 5}})
    world.watcher(consecutive=2)
    world.step()  # rolled back to 0 at T
    world.ready()
    world.step()
    world.advance(99)
    world.watcher(consecutive=2)  # revision 0 drifts 100 s later
    decision = world.step()
    assert decision.status.phase == "DriftDetected" and "cooldown" in decision.status.message
    assert events(decision) == [reasons.DRIFT_DETECTED, reasons.COOLDOWN]
    assert of_type(decision, Requeue) == [Requeue(after_seconds=200.0)]
    world.advance(200)
    after = world.step()
    assert after.status.phase == "DriftDetected" and "no rollback target" in after.status.message


def test_max_auto_actions_pauses_until_a_person_resumes():
    world = World.new({"drift": {"action": "retrain", "maxAutoActions": 2, "maxRetrains": 10}})
    world.to_serving()
    for revision in (2, 3):
        world.watcher(consecutive=2)
        world.step()
        world.to_serving(make_report(revision))
    assert world.status.auto_actions == 2
    world.watcher(consecutive=2)
    decision = world.step()
    st = decision.status
    assert st.phase == "Paused" and "maxAutoActions" in st.message
    assert events(decision) == [reasons.DRIFT_DETECTED, reasons.AUTO_ACTIONS_EXHAUSTED]
    assert of_type(decision, RunJob) == [] and of_type(decision, Serve) == []
    assert world.step().actions == ()  # nothing more until a person acts
    world.annotate(d.ANNOTATION_RESUME, "ok")
    resumed = world.step()
    assert resumed.status.handled_resume == "ok" and resumed.status.auto_actions == 1
    assert resumed.status.phase == "Retraining"  # the still-confirmed drift is acted on again
    assert events(resumed)[:2] == [reasons.RESUMED, reasons.DRIFT_DETECTED]


def test_a_generation_change_resets_the_automatic_action_count():
    world = World.new({"drift": {"action": "retrain", "maxAutoActions": 1, "maxRetrains": 10}})
    world.to_serving()
    world.watcher(consecutive=2)
    world.step()
    world.to_serving(make_report(2))
    world.watcher(consecutive=2)
    assert world.step().status.phase == "Paused"
    world.edit({"serving": {"replicas": 2}})
    decision = world.step()
    assert decision.status.phase == "Retraining" and decision.status.auto_actions == 1


def test_never_flap_back_to_a_revision_that_drifted_before():
    world = two_promoted({"drift": {"maxAutoActions": 10}})
    world.watcher(consecutive=2)
    world.step()  # revision 2 drifted: back to 1
    world.ready()
    world.step()
    world.watcher(consecutive=2)  # now revision 1 drifts; the previous promoted revision is 2, which drifted
    decision = world.step()
    st = decision.status
    assert st.phase == "Paused" and "flapping" in st.message and st.current_revision == 1
    assert events(decision) == [reasons.DRIFT_DETECTED, reasons.FLAPPING_PREVENTED]
    assert of_type(decision, Serve) == []


def test_spec_paused_observes_and_records_but_does_not_act():
    world = World.new()
    world.step()
    world.finish("prune")
    world.step()  # evaluating
    world.edit({"promotion": {"paused": True}})
    paused = world.step()
    assert paused.status.phase == "Paused" and events(paused) == [reasons.PAUSED]
    world.finish("evaluate")
    decision = world.step()
    st = decision.status
    assert st.phase == "Paused" and [r.revision for r in st.revisions] == [0, 1]  # recorded
    assert st.current_revision is None and of_type(decision, Serve) == [] and of_type(decision, RunJob) == []
    assert condition(st, "GatesPassed").status == "True"
    world.edit({"promotion": {"paused": False}})
    resumed = world.step()
    assert resumed.status.phase == "Promoting" and of_type(resumed, Serve)[0].revision == 1
    assert events(resumed) == [reasons.RESUMED, reasons.PROMOTING]


def test_spec_paused_starts_no_jobs_and_does_not_roll_back():
    world = World.new({"promotion": {"paused": True}})
    decision = world.step()
    assert decision.status.phase == "Paused" and of_type(decision, RunJob) == []
    world.edit({"promotion": {"paused": False}})
    assert world.step().status.phase == "Compressing"
    world2 = two_promoted()
    world2.edit({"promotion": {"paused": True}})
    world2.watcher(consecutive=2)
    held = world2.step()
    assert held.status.current_revision == 2 and held.status.phase == "Paused"
    assert condition(held.status, "Drifted").status == "True"  # observed and recorded


def test_drift_detected_moves_on_to_the_rollback_when_the_cooldown_ends():
    world = two_promoted({"drift": {"cooldownSeconds": 120}})
    world.model.status.last_auto_action_at = rfc3339(world.now - timedelta(seconds=20))  # an earlier one
    world.watcher(consecutive=2)  # checked 21 s after it
    held = world.step()
    assert held.status.phase == "DriftDetected" and of_type(held, Requeue) == [Requeue(after_seconds=99.0)]
    world.advance(99)
    decision = world.step()
    assert decision.status.phase == "RollingBack" and decision.status.current_revision == 1
    assert events(decision) == [reasons.ROLLING_BACK]  # DriftDetected was already announced


def test_a_failed_retrain_fails_the_resource_but_keeps_serving():
    world = World.new({"drift": {"action": "retrain"}})
    world.to_serving()
    world.watcher(consecutive=2)
    world.step()
    world.finish("prune", phase="Failed", message="OOMKilled")
    decision = world.step()
    assert decision.status.phase == "Failed" and "OOMKilled" in decision.status.message
    assert of_type(decision, Serve)[0].revision == 1
    world.watcher(consecutive=3)  # still drifting: recorded, but a failed resource waits for a person
    waiting = world.step()
    assert waiting.status.phase == "Failed" and of_type(waiting, RunJob) == []
    assert condition(waiting.status, "Ready").reason == reasons.DRIFT_DETECTED
    world.annotate(d.ANNOTATION_RETRY, "x")
    retried = world.step()
    assert retried.status.candidate.reason == "retrain" and retried.status.retrains == 1


def test_a_resume_after_a_flapping_pause_forgets_which_revisions_drifted():
    world = two_promoted({"drift": {"maxAutoActions": 10}})
    world.watcher(consecutive=2)
    world.step()
    world.ready()
    world.step()
    world.watcher(consecutive=2)
    assert world.step().status.phase == "Paused"
    world.annotate(d.ANNOTATION_RESUME, "carry-on")
    decision = world.step()
    assert decision.status.phase == "RollingBack" and decision.status.current_revision == 2
    assert [r.revision for r in decision.status.revisions if r.drifted_at] == [1]
