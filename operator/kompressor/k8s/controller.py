"""One reconcile of one CompressedModel: observe, ask the core, write the status, act.

The controller decides nothing: ``kompressor.core.reconcile.reconcile`` does. Here we only
build ``Observed`` from the API (the CR, the Kopf indexes of owned Jobs and Deployments, the
evaluation reports in the artifact store), write ``Decision.status`` to the status
subresource (never the spec) and apply ``Decision.actions`` in order, each idempotently.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

from kompressor.api import defaults as d
from kompressor.api.manifest import CompressedModel, parse_manifest
from kompressor.api.status import CompressedModelStatus
from kompressor.api.wire import SpecError, to_wire
from kompressor.console import log
from kompressor.core import scaling as core_scaling
from kompressor.core.actions import DeleteJob, EmitEvent, Requeue, RunJob, Serve
from kompressor.core.observed import JobState, ServingState
from kompressor.k8s import children, creating, deleting, events, fetching, online, patching, scaling
from kompressor.k8s.client import ApiClient, ApiError
from kompressor.k8s.config import OperatorConfig
from kompressor.k8s.metrics import OperatorMetrics
from kompressor.k8s.observe import JOB_NAME_LABEL, observe, pod_failure_message, with_message
from kompressor.k8s.storage import pod_store
from kompressor.k8s.workqueue import WorkQueue
from kompressor.store import open_store

Key = tuple[str, str]

# Annotations Kopf writes for itself; changes to them alone need no reconcile.
_KOPF_ANNOTATIONS = (f"{d.GROUP}/last-handled-configuration", f"{d.GROUP}/kopf-managed")
SEEN_STATES = 4  # fingerprints remembered per model (see Controller._seen)
_UNREAD = object()  # _apply_object: the object has not been read yet
# get, create, patch and delete of each scaling object the serving Deployment may have
_SCALING_ACCESS = {
    core_scaling.HPA: (fetching.GET_AUTOSCALER, creating.CREATE_AUTOSCALER, patching.PATCH_AUTOSCALER,
                       deleting.DELETE_AUTOSCALER),
    core_scaling.PDB: (fetching.GET_DISRUPTION_BUDGET, creating.CREATE_DISRUPTION_BUDGET,
                       patching.PATCH_DISRUPTION_BUDGET, deleting.DELETE_DISRUPTION_BUDGET),
}


def fingerprint(body: Any) -> str:
    """What the core can see of a CompressedModel: spec, status, generation, annotations
    (except Kopf's own), deletion."""
    meta = body.get("metadata") or {}
    annotations = {k: v for k, v in (meta.get("annotations") or {}).items() if not k.startswith(_KOPF_ANNOTATIONS)}
    seen = [meta.get("generation"), meta.get("uid"), meta.get("deletionTimestamp"), annotations,
            body.get("spec"), body.get("status")]
    return hashlib.sha256(json.dumps(seen, sort_keys=True, default=str).encode()).hexdigest()


class Controller:
    def __init__(self, config: OperatorConfig, api: ApiClient, metrics: OperatorMetrics,
                 jobs_index: Any = None, deployments_index: Any = None):
        self.config = config
        self.api = api
        self.metrics = metrics
        self.jobs_index = jobs_index if jobs_index is not None else {}
        self.deployments_index = deployments_index if deployments_index is not None else {}
        self.pod_store = pod_store(config.artifact_store)
        self.store = open_store(config.artifact_store)
        self.queue = WorkQueue(self.reconcile, workers=config.workers)
        self._done_once: set[tuple] = set()  # idempotent creations already made by this process
        self._invalid: dict[Key, int] = {}  # generation last reported invalid
        # Fingerprints of each model's last few states as reconciled or written, newest first. Events
        # arrive late: the watch still delivers states older than the one the last reconcile fetched
        # (Kopf's finalizer patch, made before our status write); those need no reconcile either.
        self._seen: dict[Key, tuple[str, ...]] = {}
        self._children: dict[tuple, Any] = {}  # last state of each child seen in an event
        self._failures: dict[tuple, str] = {}  # (namespace, Job) -> its failed Pod's message, read once

    def start(self) -> None:
        self.queue.start()

    async def stop(self) -> None:
        await self.queue.stop()
        await self.api.close()

    def forget(self, key: Key) -> None:
        self.queue.forget(key)
        self.metrics.forget(*key)
        self._seen.pop(key, None)

    # --- triggers ----------------------------------------------------------------------------

    def model_changed(self, key: Key, body: Any) -> None:
        """Reconcile unless only metadata the core never reads changed (or it is our own write)."""
        if fingerprint(body) not in self._seen.get(key, ()):
            self.queue.add(key)

    def _saw(self, key: Key, seen: str) -> None:
        self._seen[key] = (seen, *(s for s in self._seen.get(key, ()) if s != seen))[:SEEN_STATES]

    def child_changed(self, key: Key, child: tuple, state: Any) -> None:
        """Reconcile when a child's observed state changed; a Job merely created changes nothing."""
        previous = self._children.get(child, "unseen")
        if state is None:
            self._children.pop(child, None)
            self._failures.pop((key[0], child[1]), None)
        else:
            self._children[child] = state
        if state != previous and not (previous == "unseen" and state == "Pending"):
            self.queue.add(key)

    # --- one reconcile ---------------------------------------------------------------------

    async def reconcile(self, key: Key) -> None:
        started = time.perf_counter()
        try:
            await self._reconcile(key)
        except Exception:
            self.metrics.reconciles.labels("error").inc()
            raise  # the work queue logs it and retries the key with a delay
        finally:
            self.metrics.reconcile_seconds.observe(time.perf_counter() - started)

    async def _reconcile(self, key: Key) -> None:
        from kompressor.core.reconcile import reconcile  # the pure core

        namespace, name = key
        body = await fetching.get(self.api, fetching.GET_MODEL, namespace, name)
        if body is None or body.get("metadata", {}).get("deletionTimestamp"):
            self.forget(key)
            return
        self._saw(key, fingerprint(body))
        try:
            cm = parse_manifest(body)
        except SpecError as err:
            await self._report_invalid(key, body, err)
            return
        jobs = await self._with_failure_messages(namespace, self._jobs(key))
        self.metrics.observe_jobs(jobs)
        readings = await online.read_evidence(self.api, cm) if cm.status.online is not None else ()
        decision = reconcile(observe(cm, jobs, self._serving(key), self.store, online=readings))
        written = await self._write_status(cm, body.get("status") or {}, decision.status)
        if written is not None:
            self._saw(key, fingerprint(written))  # its watch event is our own echo
        requeue = self.config.resync_seconds
        for action in decision.actions:
            if isinstance(action, Requeue):
                requeue = min(requeue, action.after_seconds)
            else:
                await self.apply(cm, action)
        self.queue.add_after(key, requeue)
        self.metrics.reconciles.labels("ok").inc()

    def _jobs(self, key: Key) -> tuple[JobState, ...]:
        return tuple(self.jobs_index.get(key, ()))

    async def _with_failure_messages(self, namespace: str, jobs: tuple[JobState, ...]) -> tuple[JobState, ...]:
        """Each failed Job says why in its Pod's termination message (the job's own error line); read
        once per failed Job. Without it (no Pods left, no permission) the Job controller's text stays."""
        out = []
        for job in jobs:
            if job.phase == "Failed":
                token = (namespace, job.name)
                if token not in self._failures:
                    try:
                        pods = await fetching.list_(self.api, fetching.LIST_PODS, namespace,
                                                    f"{JOB_NAME_LABEL}={job.name}")
                        self._failures[token] = pod_failure_message(pods, job.kind)
                    except ApiError as err:
                        log("cannot read the failed Job's Pods", level="warning", job=f"{namespace}/{job.name}",
                            error=str(err))
                        if err.status in (403, 404):  # not allowed, or not served: do not ask again
                            self._failures[token] = ""
                job = with_message(job, self._failures.get(token, ""))
            out.append(job)
        return tuple(out)

    def _serving(self, key: Key) -> ServingState | None:
        states = list(self.deployments_index.get(key, ()))
        return states[0] if states else None

    async def _report_invalid(self, key: Key, body: dict, err: SpecError) -> None:
        self.metrics.reconciles.labels("invalid").inc()
        meta = body.get("metadata") or {}
        generation = int(meta.get("generation") or 0)
        if self._invalid.get(key) == generation:
            return
        self._invalid[key] = generation
        log("invalid CompressedModel", level="warning", key=f"{key[0]}/{key[1]}", error=str(err))
        stub = CompressedModel(name=key[1], namespace=key[0], spec=None, uid=meta.get("uid"))  # type: ignore[arg-type]
        await events.emit(self.api, stub, "Warning", "InvalidSpec", str(err))

    async def _write_status(self, cm: CompressedModel, old_wire: dict, new: CompressedModelStatus) -> dict | None:
        change = patching.merge_patch(old_wire, to_wire(new))
        if change is None:
            return None
        written = await patching.patch(self.api, patching.PATCH_MODEL_STATUS, cm.namespace, cm.name,
                                       {"status": change})
        self.metrics.observe_status(cm.namespace, cm.name, cm.status, new)
        return written

    # --- actions -----------------------------------------------------------------------------

    async def apply(self, cm: CompressedModel, action: Any) -> None:
        if isinstance(action, RunJob):
            await self._ensure_spec_configmap(cm)
            await creating.create(self.api, creating.CREATE_JOB, cm.namespace,
                                  children.job(cm, action, self.pod_store))
        elif isinstance(action, DeleteJob):
            await deleting.delete(self.api, deleting.DELETE_JOB, cm.namespace, action.name)
        elif isinstance(action, Serve):
            await self._serve(cm, action)
        elif isinstance(action, EmitEvent):
            await events.emit(self.api, cm, action.type, action.reason, action.message)
            self.metrics.observe_event(action.reason)
        else:
            raise TypeError(f"unknown action {action!r}")

    async def _serve(self, cm: CompressedModel, action: Serve) -> None:
        await self._serve_scaled(cm, children.serving_deployment(cm, action, self.pod_store))
        await self._apply_object(fetching.GET_SERVICE, creating.CREATE_SERVICE, patching.PATCH_SERVICE,
                                 children.service(cm))
        watcher = children.watcher_deployment(cm, action, self.pod_store)
        if action.drift_reference is None:
            await deleting.delete(self.api, deleting.DELETE_DEPLOYMENT, cm.namespace, watcher["metadata"]["name"])
            return
        await self._ensure_watcher_account(cm.namespace)
        await self._ensure_spec_configmap(cm)
        await self._apply_object(fetching.GET_DEPLOYMENT, creating.CREATE_DEPLOYMENT, patching.PATCH_DEPLOYMENT,
                                 watcher)

    async def _serve_scaled(self, cm: CompressedModel, deployment: dict) -> None:
        """The serving Deployment and its scaling objects (kompressor.core.scaling decides which): those the
        spec dropped are deleted first, then the Deployment records the new set, then the others are made,
        so a crash anywhere leaves nothing behind that a later reconcile does not remove."""
        meta = deployment["metadata"]
        existing = await fetching.get(self.api, fetching.GET_DEPLOYMENT, meta["namespace"], meta["name"])
        scale = core_scaling.plan(cm.spec.serving)
        recorded = scaling.recorded_objects(existing)
        for kind in core_scaling.to_delete(recorded, scale):
            await deleting.delete(self.api, _SCALING_ACCESS[kind][3], meta["namespace"], meta["name"])
        await self._apply_object(fetching.GET_DEPLOYMENT, creating.CREATE_DEPLOYMENT, patching.PATCH_DEPLOYMENT,
                                 deployment, existing=existing, create_body=scaling.creation_body(cm, deployment),
                                 patch_body=scaling.patch_body(cm, deployment),
                                 force=existing is not None and recorded != scale.owned)
        for body in (scaling.autoscaler(cm, scale), scaling.disruption_budget(cm, scale)):
            if body is not None:
                get, create, patch, _ = _SCALING_ACCESS[body["kind"]]
                await self._apply_object(get, create, patch, body)

    async def _apply_object(self, get, create, patch, desired: dict, existing: Any = _UNREAD,
                            create_body: dict | None = None, patch_body: dict | None = None,
                            force: bool = False) -> None:
        """Create, or patch when the desired state's digest differs from the applied one (or ``force``).
        ``existing``: the object as already read; ``create_body``/``patch_body``: what to send instead of
        ``desired``."""
        meta = desired["metadata"]
        if existing is _UNREAD:
            existing = await fetching.get(self.api, get, meta["namespace"], meta["name"])
        if existing is None:
            if await creating.create(self.api, create, meta["namespace"], create_body or desired):
                return
            existing = await fetching.get(self.api, get, meta["namespace"], meta["name"])
        if force or children.applied_hash(existing) != children.applied_hash(desired):
            await patching.patch(self.api, patch, meta["namespace"], meta["name"], patch_body or desired)

    async def _ensure_spec_configmap(self, cm: CompressedModel) -> None:
        token = ("configmap", cm.namespace, cm.name, cm.generation, cm.uid)
        if token not in self._done_once:
            await creating.create(self.api, creating.CREATE_CONFIGMAP, cm.namespace, children.spec_configmap(cm))
            self._done_once.add(token)

    async def _ensure_watcher_account(self, namespace: str) -> None:
        token = ("watcher-account", namespace)
        if token not in self._done_once:
            await creating.create(self.api, creating.CREATE_SERVICEACCOUNT, namespace,
                                  children.watcher_account(namespace))
            await creating.create(self.api, creating.CREATE_ROLEBINDING, namespace,
                                  children.watcher_binding(namespace))
            self._done_once.add(token)
