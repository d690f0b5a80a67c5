"""Reading objects: get one (None when absent), list by label."""

from __future__ import annotations

from kompressor.k8s import resources as r
from kompressor.k8s.access import Access, declare
from kompressor.k8s.client import ApiClient, ApiError

GET_MODEL = declare(r.COMPRESSEDMODELS, "get")
GET_DEPLOYMENT = declare(r.DEPLOYMENTS, "get")
GET_SERVICE = declare(r.SERVICES, "get")
GET_AUTOSCALER = declare(r.HORIZONTALPODAUTOSCALERS, "get")
GET_DISRUPTION_BUDGET = declare(r.PODDISRUPTIONBUDGETS, "get")
LIST_PODS = declare(r.PODS, "list")  # a failed Job's Pods: their termination messages


async def get(api: ApiClient, access: Access, namespace: str, name: str) -> dict | None:
    assert access.verb == "get"
    try:
        return await api.call(access, namespace, name)
    except ApiError as err:
        if err.status == 404:
            return None
        raise


async def list_(api: ApiClient, access: Access, namespace: str, label_selector: str) -> list[dict]:
    assert access.verb == "list"
    out = await api.call(access, namespace, params={"labelSelector": label_selector})
    return list((out or {}).get("items") or [])
