"""Creating objects, idempotently: "already exists" is success."""

from __future__ import annotations

from kompressor.k8s import resources as r
from kompressor.k8s.access import Access, declare
from kompressor.k8s.client import ApiClient, ApiError

CREATE_JOB = declare(r.JOBS, "create")
CREATE_CONFIGMAP = declare(r.CONFIGMAPS, "create")
CREATE_DEPLOYMENT = declare(r.DEPLOYMENTS, "create")
CREATE_SERVICE = declare(r.SERVICES, "create")
CREATE_AUTOSCALER = declare(r.HORIZONTALPODAUTOSCALERS, "create")
CREATE_DISRUPTION_BUDGET = declare(r.PODDISRUPTIONBUDGETS, "create")
CREATE_SERVICEACCOUNT = declare(r.SERVICEACCOUNTS, "create")
CREATE_ROLEBINDING = declare(r.ROLEBINDINGS, "create")


async def create(api: ApiClient, access: Access, namespace: str, body: dict) -> bool:
    """True when created, False when it already existed."""
    assert access.verb == "create"
    try:
        await api.call(access, namespace, body=body)
        return True
    except ApiError as err:
        if err.status == 409:
            return False
        raise
