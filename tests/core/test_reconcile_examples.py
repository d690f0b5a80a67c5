"""Every shipped example goes through the core to Serving, and reacts to drift as its spec says."""

from pathlib import Path

import pytest
from reconcile_world import World, make_report, of_type

from kompressor.api import defaults as d
from kompressor.api.manifest import load_manifests
from kompressor.core.actions import RunJob, Serve

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_reaches_serving_and_answers_drift(path):
    for model in load_manifests(path):
        world = World(model=model)
        world.step()
        world.finish("prune")
        world.step()
        world.finish("evaluate", report=make_report(1))
        if world.step().status.phase == "AwaitingApproval":
            assert model.spec.promotion.require_approval
            world.annotate(d.ANNOTATION_APPROVE, "1")
            world.step()
        world.ready()
        assert world.step().status.phase == "Serving"
        drift = model.spec.drift
        if not drift.enabled:
            continue
        world.watcher(consecutive=drift.consecutive_windows)
        decision = world.step()
        st = decision.status
        expected = {
            ("rollback", "baseline"): "RollingBack",
            ("rollback", "previous"): "DriftDetected",  # nothing promoted before revision 1
            ("retrain", drift.rollback_to): "Retraining",
            ("alert", drift.rollback_to): "DriftDetected",
        }[(drift.action, drift.rollback_to)]
        assert st.phase == expected, st.message
        if expected == "RollingBack":
            assert of_type(decision, Serve)[0].revision == 0
        if expected == "Retraining":
            assert [a.retrain for a in of_type(decision, RunJob)] == [True]
