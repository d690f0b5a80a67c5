"""Kubernetes Events on a CompressedModel (from the core's EmitEvent actions)."""

from __future__ import annotations

import os
import time
from datetime import datetime, timezone

from kompressor.api import defaults as d
from kompressor.api.manifest import CompressedModel
from kompressor.k8s import creating, resources as r
from kompressor.k8s.access import declare
from kompressor.k8s.client import ApiClient

CREATE_EVENT = declare(r.EVENTS, "create")
_INSTANCE = os.environ.get("HOSTNAME", "kompressor-operator")


def event_body(cm: CompressedModel, type_: str, reason: str, message: str) -> dict:
    now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {
        "apiVersion": "v1", "kind": "Event",
        "metadata": {"name": f"{cm.name}.{time.time_ns():x}", "namespace": cm.namespace},
        "involvedObject": {"apiVersion": d.API_VERSION, "kind": d.KIND, "name": cm.name,
                           "namespace": cm.namespace, "uid": cm.uid},
        "type": type_, "reason": reason, "message": message[:1024],
        "source": {"component": "kompressor-operator"}, "reportingComponent": "kompressor.io/operator",
        "reportingInstance": _INSTANCE, "firstTimestamp": now, "lastTimestamp": now, "count": 1,
    }


async def emit(api: ApiClient, cm: CompressedModel, type_: str, reason: str, message: str) -> None:
    await creating.create(api, CREATE_EVENT, cm.namespace, event_body(cm, type_, reason, message))
