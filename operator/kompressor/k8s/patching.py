"""Merge-patching objects (and the status subresource of CompressedModels)."""

from __future__ import annotations

from typing import Any

from kompressor.k8s import resources as r
from kompressor.k8s.access import Access, declare
from kompressor.k8s.client import ApiClient, ApiError

PATCH_MODEL_STATUS = declare(r.COMPRESSEDMODELS, "patch", subresource="status")
PATCH_DEPLOYMENT = declare(r.DEPLOYMENTS, "patch")
PATCH_SERVICE = declare(r.SERVICES, "patch")
PATCH_AUTOSCALER = declare(r.HORIZONTALPODAUTOSCALERS, "patch")
PATCH_DISRUPTION_BUDGET = declare(r.PODDISRUPTIONBUDGETS, "patch")


async def patch(api: ApiClient, access: Access, namespace: str, name: str, body: dict) -> dict | None:
    """The patched object, or None when it is gone."""
    assert access.verb == "patch"
    try:
        return await api.call(access, namespace, name, body=body)
    except ApiError as err:
        if err.status == 404:
            return None
        raise


_SAME = object()


def merge_patch(old: Any, new: Any) -> dict | None:
    """The RFC 7386 merge patch turning dict ``old`` into dict ``new`` (removed keys become
    null); ``None`` when nothing changed."""
    diff = _diff(old or {}, new or {})
    return None if diff is _SAME else diff


def _diff(old: Any, new: Any) -> Any:
    if not isinstance(old, dict) or not isinstance(new, dict):
        return _SAME if old == new else new
    out = {key: None for key in old.keys() - new.keys()}
    for key, value in new.items():
        sub = _diff(old[key], value) if key in old else value
        if sub is not _SAME:
            out[key] = sub
    return out or _SAME
