"""The RBAC rules the operator needs, derived from the code.

``required_rules()`` = every access declared by the API modules (kompressor.k8s.fetching,
creating, patching, deleting, events) + what creating the watcher's RoleBinding implies
(``bind`` on the drift-watcher ClusterRole) + what Kopf itself does (watching and patching
CompressedModels, indexing Jobs and Deployments, events, CRD and namespace discovery, peering).
The Helm chart's test checks that its RBAC covers this list.
"""

from __future__ import annotations

import importlib

from kompressor.api import defaults as d
from kompressor.k8s import resources as r

API_MODULES = ("fetching", "creating", "patching", "deleting", "events")

KOPF_RULES = (
    # Kopf watches the CRs, adds/removes its finalizer and keeps progress in annotations.
    {"apiGroups": [d.GROUP], "resources": [d.PLURAL], "verbs": ["list", "watch", "patch"]},
    # Kopf's indexes and event handlers on owned children.
    {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["list", "watch"]},
    {"apiGroups": ["apps"], "resources": ["deployments"], "verbs": ["list", "watch"]},
    # Kopf posts its own warnings as Events.
    {"apiGroups": [""], "resources": ["events"], "verbs": ["create"]},
    # Kopf's discovery of CRDs and namespaces (namespace patterns, cluster-wide runs).
    {"apiGroups": ["apiextensions.k8s.io"], "resources": ["customresourcedefinitions"], "verbs": ["list", "watch"]},
    {"apiGroups": [""], "resources": ["namespaces"], "verbs": ["list", "watch"]},
    # Kopf peering (multi-replica safety; off with --standalone).
    {"apiGroups": ["kopf.dev"], "resources": ["clusterkopfpeerings", "kopfpeerings"],
     "verbs": ["list", "watch", "patch", "get"]},
)


def declared_rules() -> list[dict]:
    from kompressor.k8s.access import DECLARED

    for module in API_MODULES:
        importlib.import_module(f"kompressor.k8s.{module}")
    importlib.import_module("kompressor.k8s.controller")  # imports every module that makes calls
    rules = [{"apiGroups": [a.resource.group], "resources": [a.rule_resource], "verbs": [a.verb]}
             for a in DECLARED]
    if any(a.resource == r.ROLEBINDINGS and a.verb == "create" for a in DECLARED):
        rules.append({"apiGroups": ["rbac.authorization.k8s.io"], "resources": ["clusterroles"],
                      "verbs": ["bind"], "resourceNames": [r.WATCHER_CLUSTER_ROLE]})
    return rules


def required_rules() -> list[dict]:
    """Merged by (apiGroup, resource, resourceNames); verbs sorted; stable order."""
    merged: dict[tuple, set[str]] = {}
    for rule in [*declared_rules(), *KOPF_RULES]:
        names = tuple(rule.get("resourceNames", ()))
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                merged.setdefault((group, resource, names), set()).update(rule["verbs"])
    out = []
    for (group, resource, names), verbs in sorted(merged.items()):
        rule = {"apiGroups": [group], "resources": [resource], "verbs": sorted(verbs)}
        if names:
            rule["resourceNames"] = list(names)
        out.append(rule)
    return out
