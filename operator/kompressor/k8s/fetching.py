"""Reading objects: get one (None when absent)."""

from __future__ import annotations

from kompressor.k8s import resources as r
from kompressor.k8s.access import Access, declare
from kompressor.k8s.client import ApiClient, ApiError

GET_MODEL = declare(r.COMPRESSEDMODELS, "get")
GET_DEPLOYMENT = declare(r.DEPLOYMENTS, "get")
GET_SERVICE = declare(r.SERVICES, "get")


async def get(api: ApiClient, access: Access, namespace: str, name: str) -> dict | None:
    assert access.verb == "get"
    try:
        return await api.call(access, namespace, name)
    except ApiError as err:
        if err.status == 404:
            return None
        raise
