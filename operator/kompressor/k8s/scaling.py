"""The scaling objects of the serving workload, as plain dicts: the HorizontalPodAutoscaler
(autoscaling/v2), the PodDisruptionBudget (policy/v1), and the scaling parts of the serving Deployment.
What to build is decided by kompressor.core.scaling; nothing here calls the API."""

from __future__ import annotations

import copy

from kompressor.api import defaults as d
from kompressor.api.manifest import CompressedModel
from kompressor.core import names
from kompressor.core.scaling import HPA, PDB, ServingScale, plan
from kompressor.k8s import resources as r

# On the serving Deployment: an annotation naming the scaling objects made for it (so that they are deleted
# when the spec drops them, across operator restarts, without asking the API for each one), and, with an
# HPA, a label saying how many ready Pods make serving ready (a label: the Kopf index reads labels, and
# labels are part of the applied digest, so a new minReplicas is patched in).
ANNOTATION_OWNED = f"{d.GROUP}/scaling-objects"
LABEL_MIN_READY = f"{d.GROUP}/min-ready-replicas"


def _serving_selector(cm: CompressedModel) -> dict:
    return {r.LABEL_INSTANCE: cm.name, r.LABEL_COMPONENT: "serving"}


def _metadata(cm: CompressedModel) -> dict:
    from kompressor.k8s.children import labels, owner_reference

    return {"name": names.serving_name(cm.name), "namespace": cm.namespace, "labels": labels(cm, "serving"),
            "ownerReferences": [owner_reference(cm)]}


def shape_deployment(cm: CompressedModel, body: dict) -> dict:
    """The serving Deployment with its scaling parts: no spec.replicas under an HPA, a CPU request for a CPU
    target, hostname spreading, the record of the scaling objects; re-stamped with its digest."""
    from kompressor.k8s.children import with_hash

    scale = plan(cm.spec.serving)
    spec, meta = body["spec"], body["metadata"]
    pod = spec["template"]["spec"]
    if scale.replicas is None:
        spec.pop("replicas", None)
        meta["labels"][LABEL_MIN_READY] = str(scale.min_ready)
    else:
        spec["replicas"] = scale.replicas
    if scale.cpu_request is not None:
        for container in pod["containers"]:
            container.setdefault("resources", {}).setdefault("requests", {})["cpu"] = scale.cpu_request
    if scale.spread:
        pod["topologySpreadConstraints"] = [{
            "maxSkew": d.SERVING_SPREAD_MAX_SKEW, "topologyKey": d.SERVING_SPREAD_TOPOLOGY_KEY,
            "whenUnsatisfiable": "ScheduleAnyway", "labelSelector": {"matchLabels": _serving_selector(cm)},
            # count only the Pods of the current ReplicaSet: a rollout does not skew against the old ones
            "matchLabelKeys": ["pod-template-hash"],
        }]
    meta.setdefault("annotations", {})[ANNOTATION_OWNED] = ",".join(sorted(scale.owned))
    return with_hash(body)


def creation_body(cm: CompressedModel, desired: dict) -> dict:
    """What creates the serving Deployment: under an HPA, minReplicas replicas from the start (later
    patches leave the count to the HPA)."""
    scale = plan(cm.spec.serving)
    if scale.replicas is not None:
        return desired
    body = copy.deepcopy(desired)
    body["spec"]["replicas"] = scale.create_replicas
    return body


def patch_body(cm: CompressedModel, desired: dict) -> dict:
    """What patches the serving Deployment: the desired state, with explicit nulls for the scaling parts the
    spec dropped (a merge patch keeps a key it does not name), and no spec.replicas under an HPA (kept)."""
    scale = plan(cm.spec.serving)
    body = copy.deepcopy(desired)
    if scale.min_ready is None:
        body["metadata"]["labels"][LABEL_MIN_READY] = None
    if not scale.spread:
        body["spec"]["template"]["spec"]["topologySpreadConstraints"] = None
    return body


def recorded_objects(deployment: dict | None) -> frozenset[str]:
    """The scaling objects an existing serving Deployment says were made for it."""
    value = ((deployment or {}).get("metadata") or {}).get("annotations", {}).get(ANNOTATION_OWNED) or ""
    return frozenset(kind for kind in value.split(",") if kind in (HPA, PDB))


def autoscaler(cm: CompressedModel, scale: ServingScale | None = None) -> dict | None:
    """The HorizontalPodAutoscaler of the serving Deployment, or None when the spec sets no autoscaling."""
    from kompressor.k8s.children import with_hash

    auto = (scale or plan(cm.spec.serving)).autoscaler
    if auto is None:
        return None
    if auto.metric == "cpu":
        metric = {"type": "Resource", "resource": {
            "name": "cpu", "target": {"type": "Utilization", "averageUtilization": auto.target}}}
    else:
        metric = {"type": "Pods", "pods": {
            "metric": {"name": d.SERVING_CONCURRENCY_METRIC},
            "target": {"type": "AverageValue", "averageValue": str(auto.target)}}}
    return with_hash({
        "apiVersion": "autoscaling/v2", "kind": HPA, "metadata": _metadata(cm),
        "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment",
                                    "name": names.serving_name(cm.name)},
                 "minReplicas": auto.min_replicas, "maxReplicas": auto.max_replicas, "metrics": [metric]},
    })


def disruption_budget(cm: CompressedModel, scale: ServingScale | None = None) -> dict | None:
    """The serving PodDisruptionBudget, or None with a single fixed replica (or none)."""
    from kompressor.k8s.children import with_hash

    if not (scale or plan(cm.spec.serving)).disruption_budget:
        return None
    return with_hash({
        "apiVersion": "policy/v1", "kind": PDB, "metadata": _metadata(cm),
        "spec": {"maxUnavailable": d.SERVING_PDB_MAX_UNAVAILABLE,
                 "selector": {"matchLabels": _serving_selector(cm)},
                 # a Pod that is not ready yet (a bad revision crash-looping) may be evicted regardless
                 "unhealthyPodEvictionPolicy": "AlwaysAllow"},
    })
