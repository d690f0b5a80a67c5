"""A loopback Kubernetes API for the operator's fast tests: kmock 0.8's KubernetesEmulator plus what
the operator and Kopf cannot run without. The truth is the real control plane of e2e/cluster
(tests/cluster, the e2e ``cluster`` target); the emulator stays for speed: the operator-level tests
(tests/operator, the e2e ``emulator`` target, bench/operator_emulator.py) start in a second, with no Go build,
and record every write with its time.

What it still adds to kmock, each shown needed in tests/operator/test_emulator_harness.py:

1. Resources registered explicitly (kmock's discovery answers only for registered ones), namespaces
   included: Kopf does not start handling without it in discovery, even cluster-wide.
2. Metadata a real API server fills: uid (ownerReferences), resourceVersion (Kopf's watches and
   patches), creationTimestamp, generation (bumped on spec changes, never on /status patches: the
   operator's revisions follow it). kmock fills none of them.
3. A JSON patch whose ``test`` op fails (Kopf's finalizer patch, raced by our status write on every
   new CR) answers HTTP 422 like the API server, not kmock's HTTP 500 (which Kopf backs off from).
4. kmock records every request and matches each new one by scanning that record (quadratic:
   minutes for a few hundred resources); the harness keeps only the requests in flight.

What it no longer emulates (the real control plane tests it): garbage collection (deleting a CR
leaves its children here), namespaced Kopf runs (kmock 0.8 answers 500 on listing namespaces, so
the operator runs cluster-wide against it; tests/cluster/test_namespaced_real.py covers ``-n``).

Use: ``async with Emulator() as api: ... api.url ...``; ``write_kubeconfig(path, url)``.
"""

from __future__ import annotations

import copy
import datetime
import itertools
import time
import uuid
from pathlib import Path
from typing import Any

import jsonpatch
import kmock
from kmock._internal import dicts as kmock_dicts  # kmock's own merge-patch, to predict a patch's result

from kompressor.api import defaults as d

RESOURCES = {
    f"{d.GROUP}/{d.VERSION}/{d.PLURAL}": dict(kind=d.KIND, namespaced=True, subresources=["status"],
                                             verbs=["list", "watch", "get", "create", "patch", "delete"]),
    "batch/v1/jobs": dict(kind="Job", namespaced=True, subresources=["status"]),
    "apps/v1/deployments": dict(kind="Deployment", namespaced=True, subresources=["status"]),
    "v1/services": dict(kind="Service", namespaced=True),
    "v1/configmaps": dict(kind="ConfigMap", namespaced=True),
    "v1/serviceaccounts": dict(kind="ServiceAccount", namespaced=True),
    "rbac.authorization.k8s.io/v1/rolebindings": dict(kind="RoleBinding", namespaced=True),
    "v1/events": dict(kind="Event", namespaced=True),
    "v1/namespaces": dict(kind="Namespace", namespaced=False),
    "apiextensions.k8s.io/v1/customresourcedefinitions": dict(kind="CustomResourceDefinition", namespaced=False),
}
_WRITES = (kmock.action.CREATE, kmock.action.UPDATE, kmock.action.DELETE)
_VERBS = ["list", "watch", "get", "create", "patch", "update", "delete"]


def register_resources(emulator: kmock.KubernetesEmulator) -> None:
    for key, info in RESOURCES.items():
        emulator.resources[key] = {"verbs": _VERBS, **info}


class ClusterEmulator(kmock.KubernetesEmulator):
    """KubernetesEmulator + server-filled metadata + 422 on a failed patch test + a bounded request record,
    recording each write (``writes``) and each created body (``creations``)."""

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self._versions = itertools.count(1)
        self.creations: list[tuple[str, str | None, dict]] = []  # (plural, namespace, body) of each object created
        self.writes: list[tuple[float, str, str, str | None, str]] = []  # (monotonic, action, plural, ns, name)
        register_resources(self)

    async def _handle(self, request: kmock.Request) -> Any:
        try:
            return await self._handle_in_flight(request)
        finally:  # forget it: kmock matches each request against every request it remembers
            for i, known in enumerate(self._requests):
                if known is request:
                    del self._requests[i]
                    break

    async def _handle_in_flight(self, request: kmock.Request) -> Any:
        if request.resource is not None and isinstance(request.data, dict):
            self._fill_metadata(request)
        response = await super()._handle(request)
        if request.resource is not None and response.status < 300 and request.action in _WRITES:
            name = request.name or (request.data or {}).get("metadata", {}).get("name")
            self.writes.append((time.monotonic(), request.action.value, request.resource.plural,
                                request.namespace, name))
            if request.action == kmock.action.CREATE:
                self.creations.append((request.resource.plural, request.namespace, copy.deepcopy(request.data)))
        return response

    def _fill_metadata(self, request: kmock.Request) -> None:
        meta = request.data.setdefault("metadata", {})
        if request.action == kmock.action.CREATE:
            meta["uid"] = str(uuid.uuid4())
            meta["generation"] = 1
            meta["creationTimestamp"] = _now()
            meta["resourceVersion"] = str(next(self._versions))
        elif request.action == kmock.action.UPDATE and request.name is not None:
            key = (request.resource, request.namespace, request.name)
            if key not in self.objects or self.objects[key].deleted:
                return
            old = self.objects[key].raw
            meta["resourceVersion"] = str(next(self._versions))
            if request.subresource is None and "spec" in request.data:
                new = kmock_dicts.patch_dict(copy.deepcopy(old), copy.deepcopy(request.data))
                if new.get("spec") != old.get("spec"):
                    meta["generation"] = int(old.get("metadata", {}).get("generation") or 1) + 1
            # Like the API server: uid, generation and creationTimestamp are not the client's to change.
            for field in ("uid", "creationTimestamp"):
                if field in meta and field in old.get("metadata", {}):
                    meta[field] = old["metadata"][field]

    async def _render_error(self, exc: Exception) -> Any:
        if isinstance(exc, jsonpatch.JsonPatchTestFailed):
            exc = kmock.KubernetesError(status=422, reason="Invalid", message=f"the patch's test failed: {exc}")
        return await super()._render_error(exc)

    # Shortcuts for tests ------------------------------------------------------------------

    def get(self, resource: str, namespace: str | None, name: str) -> dict | None:
        for (res, ns, nm), obj in self.objects.items():
            if f"{res.group}/{res.version}/{res.plural}".lstrip("/") == resource and ns == namespace \
                    and nm == name and not obj.deleted:
                return obj.raw
        return None

    def list(self, resource: str, namespace: str | None = None) -> list[dict]:
        out = []
        for (res, ns, _), obj in self.objects.items():
            if f"{res.group}/{res.version}/{res.plural}".lstrip("/") == resource \
                    and (namespace is None or ns == namespace) and not obj.deleted:
                out.append(obj.raw)
        return out


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def write_kubeconfig(path: str | Path, url: str) -> Path:
    """A kubeconfig pointing at the emulator (for Kopf, the operator's client, the watcher)."""
    import yaml

    path = Path(path)
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "emulator",
        "clusters": [{"name": "emulator", "cluster": {"server": str(url).rstrip("/")}}],
        "users": [{"name": "tester", "user": {"token": "emulator-token"}}],
        "contexts": [{"name": "emulator", "context": {"cluster": "emulator", "user": "tester"}}],
    }))
    return path


class Emulator:
    """``async with Emulator() as emulator``: a ClusterEmulator served on a loopback port."""

    def __init__(self) -> None:
        self.api = ClusterEmulator()
        self._server: kmock.Server | None = None

    async def __aenter__(self) -> ClusterEmulator:
        await self.api.__aenter__()
        self._server = kmock.Server(self.api)
        await self._server.__aenter__()
        return self.api

    async def __aexit__(self, *exc) -> None:
        await self._server.__aexit__(*exc)
        await self.api.__aexit__(*exc)
