"""Reading the online stage's evidence from the serving Pods: each ready Pod of the CompressedModel's serving
Deployment answers ``GET /v2/models/{name}/online`` on its Pod IP (not through the Service, which would give one
Pod's counts at random). The counts add up in the core (``kompressor.core.online.fold``), so several replicas,
rolling updates and restarted Pods all count once. A Pod that does not answer adds nothing this time."""

from __future__ import annotations

import asyncio

import aiohttp

from kompressor.api import defaults as d
from kompressor.api.manifest import CompressedModel
from kompressor.console import log
from kompressor.core.observed import OnlineReading
from kompressor.k8s import fetching
from kompressor.k8s import resources as r
from kompressor.k8s.client import ApiClient, ApiError
from kompressor.online_evidence import evidence_path, reading_from


def ready_pod_ips(pods: list[dict]) -> list[str]:
    """The IPs of the Pods that are Ready and not being deleted."""
    out = []
    for pod in pods:
        status = pod.get("status") or {}
        ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])
        if ready and status.get("podIP") and not (pod.get("metadata") or {}).get("deletionTimestamp"):
            out.append(status["podIP"])
    return sorted(out)


async def read_evidence(api: ApiClient, cm: CompressedModel) -> tuple[OnlineReading, ...]:
    try:
        pods = await fetching.list_(api, fetching.LIST_PODS, cm.namespace,
                                    f"{r.LABEL_INSTANCE}={cm.name},{r.LABEL_COMPONENT}=serving")
    except ApiError as err:
        log("cannot list the serving Pods", level="warning", model=f"{cm.namespace}/{cm.name}", error=str(err))
        return ()
    ips = ready_pod_ips(pods)
    if not ips:
        return ()
    timeout = aiohttp.ClientTimeout(total=d.ONLINE_EVIDENCE_TIMEOUT_SECONDS)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        bodies = await asyncio.gather(*(_get(http, f"http://{ip}:{cm.spec.serving.port}" + evidence_path(cm.name))
                                        for ip in ips))
    return tuple(reading for reading in map(reading_from, bodies) if reading is not None)


async def _get(http: aiohttp.ClientSession, url: str):
    try:
        async with http.get(url) as response:
            return await response.json(content_type=None) if response.status == 200 else None
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError) as err:
        log("reading a serving Pod's online evidence failed", level="warning", url=url, error=str(err))
        return None
