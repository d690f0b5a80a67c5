"""The Argo CD files: the CompressedModel health check (run as Lua 5.1, the dialect of Argo CD's
gopher-lua, through lupa) on sample objects for every phase, and the Application manifests."""

from __future__ import annotations

import pytest
import yaml

from chartkit import REPO

lupa = pytest.importorskip("lupa")

from kompressor.api.status import PHASES  # noqa: E402

ARGOCD = REPO / "charts" / "argocd"
HEALTH_LUA = (ARGOCD / "health.lua").read_text()


def health(obj: dict) -> dict:
    """Run the health script the way Argo CD does: the object as the global `obj`, a table back."""
    from lupa import lua51

    lua = lua51.LuaRuntime(unpack_returned_tuples=True)
    lua.globals().obj = lua.table_from(obj, recursive=True)
    result = lua.execute(HEALTH_LUA)
    return {"status": result["status"], "message": result["message"]}


def model(phase: str | None = None, generation: int = 3, observed: int | None = 3, ready: str | None = None,
          ready_reason: str = "", action: str | None = "rollback", message: str | None = None) -> dict:
    obj = {"apiVersion": "kompressor.io/v1alpha1", "kind": "CompressedModel",
           "metadata": {"name": "digits", "namespace": "ml", "generation": generation},
           "spec": {"model": {"uri": "builtin://digits-mlp"}}}
    if action is not None:
        obj["spec"]["drift"] = {"action": action}
    if phase is None:
        return obj
    status = {"phase": phase, "currentRevision": 2, "conditions": [
        {"type": "Compressed", "status": "True", "reason": "Compressed"}]}
    if observed is not None:
        status["observedGeneration"] = observed
    if ready is not None:
        status["conditions"].append({"type": "Ready", "status": ready, "reason": ready_reason})
    if message is not None:
        status["message"] = message
    obj["status"] = status
    return obj


# Phase -> Argo CD health, for an up-to-date status (observedGeneration == generation), Ready as given.
EXPECTED = {
    ("Pending", None): "Progressing",
    ("Compressing", None): "Progressing",
    ("Evaluating", None): "Progressing",
    ("Promoting", "False"): "Progressing",
    ("Retraining", "True"): "Progressing",
    ("RollingBack", "True"): "Progressing",
    ("Shadowing", "True"): "Progressing",
    ("Canary", "True"): "Progressing",
    ("Serving", "True"): "Healthy",
    ("Serving", None): "Progressing",
    ("Serving", "Unknown"): "Progressing",
    ("Serving", "False"): "Degraded",
    ("AwaitingApproval", None): "Suspended",
    ("Paused", "True"): "Suspended",
    ("Rejected", "False"): "Degraded",
    ("Failed", "False"): "Degraded",
    ("DriftDetected", "True"): "Progressing",   # rollback/retrain on its way
    ("DriftDetected", "False"): "Degraded",     # the reaction could not restore a ready model
}


def test_every_phase_of_the_api_is_covered():
    assert {phase for phase, _ in EXPECTED} == set(PHASES)


@pytest.mark.parametrize("phase,ready", sorted(EXPECTED, key=str), ids=lambda v: str(v))
def test_health_of_each_phase(phase, ready):
    result = health(model(phase, ready=ready, message=f"{phase} because of reasons"))
    assert result["status"] == EXPECTED[(phase, ready)]
    assert result["message"] == f"{phase}: {phase} because of reasons"


def test_drift_with_alert_action_is_degraded_since_nothing_will_fix_it():
    assert health(model("DriftDetected", ready="True", action="alert"))["status"] == "Degraded"
    for action in ("rollback", "retrain", None):  # None: the default action (rollback) applies
        assert health(model("DriftDetected", ready="True", action=action))["status"] == "Progressing"


def test_progressing_until_the_operator_catches_up_with_the_spec():
    for phase in ("Serving", "Rejected", "Failed", "Paused"):
        stale = health(model(phase, generation=4, observed=3, ready="True"))
        assert stale == {"status": "Progressing", "message": "Waiting for the operator to act on generation 4"}
        assert health(model(phase, generation=4, observed=None))["status"] == "Progressing"
    assert health(model(None))["status"] == "Progressing"  # no status at all yet


def test_message_falls_back_to_the_phase_and_unknown_phases_say_so():
    assert health(model("Serving", ready="True"))["message"] == "Serving: serving revision 2"
    no_revision = model("Serving", ready="True")
    del no_revision["status"]["currentRevision"]
    assert health(no_revision) == {"status": "Healthy", "message": "Serving: serving"}
    assert health(model("Quantizing")) == {"status": "Unknown", "message": "Unknown phase Quantizing"}


def test_applications_deploy_the_chart_and_then_the_models():
    operator = yaml.safe_load((ARGOCD / "application.yaml").read_text())
    models = yaml.safe_load((ARGOCD / "models-application.yaml").read_text())
    for app in (operator, models):
        assert app["apiVersion"] == "argoproj.io/v1alpha1" and app["kind"] == "Application"
        assert app["spec"]["destination"]["server"] == "https://kubernetes.default.svc"
        assert app["spec"]["syncPolicy"]["automated"] == {"prune": True, "selfHeal": True}
    assert operator["spec"]["source"]["path"] == "charts/kompressor"
    assert (REPO / operator["spec"]["source"]["path"] / "Chart.yaml").is_file()
    assert (REPO / models["spec"]["source"]["path"] / models["spec"]["source"]["directory"]["include"]).is_file()
    # The models sync after the operator (and the CRD, wave -1, before both).
    wave = lambda app: int(app["metadata"]["annotations"]["argocd.argoproj.io/sync-wave"])  # noqa: E731
    assert -1 < wave(operator) < wave(models)
    assert "SkipDryRunOnMissingResource=true" in models["spec"]["syncPolicy"]["syncOptions"]
    assert "CreateNamespace=true" in operator["spec"]["syncPolicy"]["syncOptions"]
    # The values the Application passes are values the chart accepts.
    import helm_python

    from chartkit import CHART

    with helm_python.Chart.load(CHART) as chart:
        chart.validate_schema(chart.merge_values(operator["spec"]["source"]["helm"]["valuesObject"]))
