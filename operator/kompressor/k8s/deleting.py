"""Deleting objects, idempotently: "not found" is success."""

from __future__ import annotations

from kompressor.k8s import resources as r
from kompressor.k8s.access import Access, declare
from kompressor.k8s.client import ApiClient, ApiError

DELETE_JOB = declare(r.JOBS, "delete")
DELETE_DEPLOYMENT = declare(r.DEPLOYMENTS, "delete")
DELETE_AUTOSCALER = declare(r.HORIZONTALPODAUTOSCALERS, "delete")
DELETE_DISRUPTION_BUDGET = declare(r.PODDISRUPTIONBUDGETS, "delete")

# Foreground would keep the Job visible until its pods are gone; Background lets the
# garbage collector remove the pods after the Job object is deleted.
_BACKGROUND = {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Background"}


async def delete(api: ApiClient, access: Access, namespace: str, name: str) -> bool:
    """True when deleted, False when it was already gone."""
    assert access.verb == "delete"
    try:
        await api.call(access, namespace, name, body=_BACKGROUND)
        return True
    except ApiError as err:
        if err.status == 404:
            return False
        raise
