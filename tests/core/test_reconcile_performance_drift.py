"""A performance-drift verdict (online accuracy under spec.drift.performance.minAccuracy) goes through the same
hysteresis and action as a data-drift verdict, with its own reasons in the Drifted condition and the events."""

import dataclasses

import pytest
from reconcile_world import World, condition, events, make_report, of_type

from kompressor.api import defaults as d
from kompressor.core import reasons
from kompressor.core.actions import RunJob, Serve

PERFORMANCE = {"drift": {"performance": {"minAccuracy": 0.8, "window": 50, "minLabels": 20}}}


def serving_revision_2(spec: dict) -> World:
    world = World.new(spec)
    world.to_serving()
    world.advance(60)
    world.edit({"compression": {"pruning": {"sparsity": 0.6}}})
    world.to_serving(make_report(2, sparsity=0.6, accuracy=0.955))
    return world


def performance_verdict(world: World, consecutive: int, accuracy: float) -> None:
    """The watcher's online-accuracy check of the serving revision, as it patches status.drift."""
    world.watcher(consecutive=consecutive)
    world.model.status.drift = dataclasses.replace(
        world.model.status.drift, reason=d.PERFORMANCE_DRIFT_REASON, accuracy=accuracy, labels=50,
        min_accuracy=0.8, labels_seen=50 * max(consecutive, 1), detector="online-accuracy", p_value=None)


@pytest.mark.parametrize("consecutive, status, reason", [
    (0, "False", reasons.NO_DRIFT),
    (1, "False", reasons.PERFORMANCE_DRIFT_SUSPECTED),
    (2, "True", reasons.PERFORMANCE_DRIFT_CONFIRMED),
])
def test_drifted_condition_names_performance_drift(consecutive, status, reason):
    world = serving_revision_2({**PERFORMANCE, "drift": {**PERFORMANCE["drift"], "action": "alert"}})
    performance_verdict(world, consecutive, accuracy=0.6 if consecutive else 0.9)
    decision = world.step()
    drifted = condition(decision.status, "Drifted")
    assert (drifted.status, drifted.reason) == (status, reason)
    if consecutive:
        assert "online accuracy 0.6 (floor 0.8) over 50 labels" in drifted.message


def test_confirmed_performance_drift_rolls_back_like_data_drift():
    world = serving_revision_2(PERFORMANCE)
    performance_verdict(world, consecutive=2, accuracy=0.55)
    decision = world.step()
    st = decision.status
    assert st.phase == "RollingBack" and st.current_revision == 1
    assert events(decision) == [reasons.PERFORMANCE_DRIFT_DETECTED, reasons.ROLLING_BACK]
    assert of_type(decision, RunJob) == [] and of_type(decision, Serve)[0].revision == 1
    assert st.auto_actions == 1


def test_confirmed_performance_drift_retrains_when_the_action_is_retrain():
    world = serving_revision_2({"drift": {**PERFORMANCE["drift"], "action": "retrain"},
                                "data": {"retrain": "builtin://digits?split=train"}})
    performance_verdict(world, consecutive=2, accuracy=0.5)
    first = world.step()
    assert reasons.PERFORMANCE_DRIFT_DETECTED in events(first) and reasons.RETRAINING in events(first)
