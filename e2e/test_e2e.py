"""The end-to-end scenario on each target. KOMPRESSOR_E2E_TARGET=embedded|emulator|cluster runs one only."""

import os

import pytest

from online_scenario import run_online_scenario
from performance_scenario import run_performance_scenario
from scenario import run_scenario
from targets import ClusterTarget, EmbeddedTarget, EmulatorTarget, cluster_unavailable_reason

TARGETS = {"embedded": EmbeddedTarget, "emulator": EmulatorTarget, "cluster": ClusterTarget}


def skip_reason(name: str) -> str | None:
    chosen = os.environ.get("KOMPRESSOR_E2E_TARGET")
    if chosen and chosen not in TARGETS:
        pytest.fail(f"KOMPRESSOR_E2E_TARGET={chosen!r}: must be one of {', '.join(TARGETS)}")
    if chosen and chosen != name:
        return f"KOMPRESSOR_E2E_TARGET={chosen} selects another target"
    if name == "cluster":
        reason = cluster_unavailable_reason()
        if reason and os.environ.get("KOMPRESSOR_REQUIRE_CLUSTER") == "1":  # CI: the cluster target must run
            pytest.fail(f"KOMPRESSOR_REQUIRE_CLUSTER=1 but {reason}")
        return reason
    return None


@pytest.mark.slow
@pytest.mark.parametrize("name", [
    "embedded", "emulator", pytest.param("cluster", marks=pytest.mark.cluster),
])
async def test_create_serve_drift_rollback_delete(name, tmp_path, e2e_env, eval_rows):
    reason = skip_reason(name)
    if reason:
        pytest.skip(reason)
    rows, labels = eval_rows
    async with TARGETS[name](tmp_path, e2e_env) as target:
        timings = await run_scenario(target, rows, labels)
    print(f"[{name}] " + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()))


ONLINE_TARGETS = ["embedded", pytest.param("cluster", marks=pytest.mark.cluster)]


@pytest.mark.slow
@pytest.mark.parametrize("reject_with,promote_with", [("canary", "shadow"), ("shadow", "canary")])
@pytest.mark.parametrize("name", ONLINE_TARGETS)
async def test_online_stage_rejects_a_disagreeing_candidate_then_promotes_an_agreeing_one(
        name, reject_with, promote_with, tmp_path, e2e_env, eval_rows):
    """The online stage (docs/online-stage.md), each strategy rejecting once and promoting once. Not on the
    emulator: the operator reads the evidence of each serving Pod by its Pod IP, which the emulator's stand-in
    controllers do not give."""
    import numpy as np

    reason = skip_reason(name)
    if reason:
        pytest.skip(reason)
    rows, _ = eval_rows
    async with TARGETS[name](tmp_path, e2e_env) as target:
        timings = await run_online_scenario(target, np.array(rows, dtype=np.float32), reject_with, promote_with)
    print(f"[{name}] " + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()))


@pytest.mark.slow
@pytest.mark.parametrize("name", ONLINE_TARGETS)
async def test_delayed_wrong_labels_trigger_the_drift_action(name, tmp_path, e2e_env, eval_rows):
    """spec.drift.performance: delayed true labels show the online accuracy falling; the rollback runs. Not on the
    emulator: its serving Deployments listen on ports of their own, behind no Service name the watcher can read."""
    import numpy as np

    reason = skip_reason(name)
    if reason:
        pytest.skip(reason)
    rows, _ = eval_rows
    async with TARGETS[name](tmp_path, e2e_env) as target:
        timings = await run_performance_scenario(target, np.array(rows, dtype=np.float32))
    print(f"[{name}] " + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()))
