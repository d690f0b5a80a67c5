"""The operator's RBAC for the serving workload's scaling objects: exactly get, create, patch and delete on
HorizontalPodAutoscalers (autoscaling) and PodDisruptionBudgets (policy), derived from the code's API calls,
granted by the chart in every mode and in the plain-manifest bundle; no list or watch (they are not
watched: the serving Deployment records which ones exist)."""

from __future__ import annotations

import pytest
import yaml

from chartkit import REPO, render
from kompressor.k8s import permissions

SCALING = {("autoscaling", "horizontalpodautoscalers"), ("policy", "poddisruptionbudgets")}
VERBS = ["create", "delete", "get", "patch"]
MODES = {"cluster-wide": {}, "namespaced": {"watchNamespace": ["team-a", "team-b"]}}


def _scaling_rules(rules: list[dict]) -> dict[tuple[str, str], list[str]]:
    out: dict[tuple[str, str], set[str]] = {}
    for rule in rules:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                if (group, resource) in SCALING:
                    out.setdefault((group, resource), set()).update(rule["verbs"])
    return {key: sorted(verbs) for key, verbs in out.items()}


def test_the_code_needs_exactly_these_verbs():
    assert _scaling_rules(permissions.required_rules()) == {key: VERBS for key in SCALING}


@pytest.mark.parametrize("mode", sorted(MODES))
def test_the_chart_grants_exactly_these_verbs(mode):
    objects = render(MODES[mode])
    account = next(o for o in objects if o["kind"] == "Deployment")["spec"]["template"]["spec"]["serviceAccountName"]
    roles = {}
    for binding in objects:
        if binding["kind"] in ("RoleBinding", "ClusterRoleBinding") and any(
                s.get("name") == account for s in binding["subjects"]):
            ref = binding["roleRef"]
            namespace = binding["metadata"].get("namespace") if ref["kind"] == "Role" else None
            [role] = [o for o in objects if o["kind"] == ref["kind"] and o["metadata"]["name"] == ref["name"]
                      and o["metadata"].get("namespace") == namespace]
            roles[(binding["kind"], binding["metadata"].get("namespace"), binding["metadata"]["name"])] = \
                _scaling_rules(role["rules"])
    granting = {scope[:2]: rules for scope, rules in roles.items() if rules}
    expected = {key: VERBS for key in SCALING}
    if MODES[mode]:  # in the watched namespaces alone
        assert granting == {("RoleBinding", ns): expected for ns in MODES[mode]["watchNamespace"]}
    else:
        assert granting == {("ClusterRoleBinding", None): expected}


def test_the_bundle_grants_them():
    docs = [d for d in yaml.safe_load_all((REPO / "charts" / "bundle" / "kompressor.yaml").read_text()) if d]
    rules = [r for d in docs if d["kind"] in ("ClusterRole", "Role") for r in d["rules"]]
    assert _scaling_rules(rules) == {key: VERBS for key in SCALING}
