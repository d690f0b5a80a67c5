"""The chart's RBAC grants the operator exactly what it uses: every API call the code makes
(kompressor.k8s.permissions.required_rules(), derived from the code) is allowed in every mode, nothing
more is, no wildcards, no Secrets; the drift watcher gets its two permissions."""

from __future__ import annotations

import pytest

from chartkit import find, one, render
from kompressor.k8s import permissions, resources  # an import error here must fail these tests, not skip them

# Cluster-scoped in Kubernetes (and Kopf's cluster peering); everything else is namespaced.
# `bind` on a ClusterRole is checked in the namespace of the RoleBinding being created: namespaced here.
CLUSTER_SCOPED = {("", "namespaces"), ("apiextensions.k8s.io", "customresourcedefinitions"),
                  ("kopf.dev", "clusterkopfpeerings")}

MODES = {
    "cluster-wide, peering": {},
    "cluster-wide, standalone": {"peering": {"enabled": False}},
    "namespaced, peering": {"watchNamespace": ["team-a", "team-b"]},
    "namespaced, standalone": {"watchNamespace": "ml", "peering": {"enabled": False}},
}


def expand(rules: list[dict]):
    """(apiGroup, resource, verb, resourceName or None) for every permission a rule list grants."""
    for rule in rules:
        for group in rule["apiGroups"]:
            for res in rule["resources"]:
                for verb in rule["verbs"]:
                    for name in rule.get("resourceNames") or [None]:
                        yield group, res, verb, name


def grants(objects: list[dict], account: str, account_namespace: str) -> dict[str | None, set]:
    """What the ServiceAccount may do: {None: cluster-wide grants, namespace: grants there}."""
    roles = {(o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]): o["rules"]
             for o in objects if o["kind"] in ("ClusterRole", "Role")}
    out: dict[str | None, set] = {}
    for binding in objects:
        if binding["kind"] not in ("ClusterRoleBinding", "RoleBinding"):
            continue
        if {"kind": "ServiceAccount", "name": account, "namespace": account_namespace} not in binding["subjects"]:
            continue
        ref = binding["roleRef"]
        scope = binding["metadata"].get("namespace") if binding["kind"] == "RoleBinding" else None
        role_ns = scope if ref["kind"] == "Role" else None
        out.setdefault(scope, set()).update(expand(roles[(ref["kind"], role_ns, ref["name"])]))
    return out


def allowed(granted: dict, namespace: str | None, permission: tuple) -> bool:
    group, res, verb, name = permission
    pool = granted.get(None, set()) | (granted.get(namespace, set()) if namespace else set())
    return (group, res, verb, name) in pool or (name is not None and (group, res, verb, None) in pool)


def needed_in_mode(permission: tuple, clusterwide: bool, peering: bool) -> bool:
    group, res, _, _ = permission
    if group == "kopf.dev":  # Kopf peers cluster-wide or per namespace, matching how it watches
        return peering and (res == "clusterkopfpeerings") == clusterwide
    return True


@pytest.mark.parametrize("mode", sorted(MODES))
def test_rbac_covers_every_api_call_the_operator_makes(mode):
    values = MODES[mode]
    objects = render(values)
    account = one(objects, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"]
    granted = grants(objects, account, "kompressor")
    watch = values.get("watchNamespace")
    namespaces = [watch] if isinstance(watch, str) else (watch or [])
    clusterwide, peering = not namespaces, values.get("peering", {}).get("enabled", True)
    required = [p for p in expand(permissions.required_rules()) if needed_in_mode(p, clusterwide, peering)]
    assert required, "required_rules() is empty"
    missing = []
    for permission in required:
        if (permission[0], permission[1]) in CLUSTER_SCOPED:
            ok = allowed(granted, None, permission)  # only a ClusterRoleBinding grants these
        else:
            ok = all(allowed(granted, ns, permission) for ns in (namespaces or [None]))
        if not ok:
            missing.append(permission)
    assert missing == [], f"{mode}: the chart does not grant {missing}"
    if namespaces:  # namespaced mode: nothing namespaced is granted cluster-wide
        assert {(g, r) for g, r, _, _ in granted.get(None, set())} <= CLUSTER_SCOPED


@pytest.mark.parametrize("mode", sorted(MODES))
def test_rbac_grants_nothing_the_operator_does_not_use(mode):
    objects = render(MODES[mode])
    account = one(objects, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"]
    required = set(expand(permissions.required_rules()))
    granted = set().union(*grants(objects, account, "kompressor").values())
    assert sorted(granted - required) == [], "least privilege: grant only what required_rules() lists"


def test_no_wildcards_no_secrets_no_escalation(renderings):
    for label, objects in renderings.items():
        for role in find(objects, "ClusterRole") + find(objects, "Role"):
            for group, res, verb, name in expand(role["rules"]):
                where = f"{label}: {role['kind']} {role['metadata']['name']}"
                assert "*" not in (group, res, verb), f"{where}: wildcard"
                assert res.split("/")[0] != "secrets", f"{where}: the operator never reads Secrets"
                assert verb not in ("escalate", "impersonate"), where
                if verb == "bind":
                    assert name == resources.WATCHER_CLUSTER_ROLE, f"{where}: bind only the watcher role"


def test_drift_watcher_cluster_role_is_the_one_the_operator_binds(default_objects):
    role = one(default_objects, "ClusterRole", resources.WATCHER_CLUSTER_ROLE)
    assert sorted(expand(role["rules"])) == [("kompressor.io", "compressedmodels", "get", None),
                                             ("kompressor.io", "compressedmodels/status", "patch", None)]
    # The operator may bind exactly this role (and create the RoleBinding that does).
    required = set(expand(permissions.required_rules()))
    assert ("rbac.authorization.k8s.io", "clusterroles", "bind", resources.WATCHER_CLUSTER_ROLE) in required
    assert ("rbac.authorization.k8s.io", "rolebindings", "create", None) in required
