"""The Kopf handlers: they only feed the controller's work queue and keep two indexes.

Triggers of a reconcile: any event of the CompressedModel (create, spec edit, annotation,
the drift watcher's status patch, resume after a restart), any change of an owned Job or
Deployment, and the timer the controller sets after each reconcile (Requeue or resync).
"""

from __future__ import annotations

import asyncio
import logging
import shutil

import kopf

from kompressor.api import defaults as d
from kompressor.console import log
from kompressor.k8s import resources as r
from kompressor.k8s.client import ApiClient
from kompressor.k8s.metrics import OperatorMetrics
from kompressor.k8s.observe import job_state, serving_state

MANAGED = {r.LABEL_MANAGED_BY: r.MANAGED_BY}
FINALIZER = f"{d.GROUP}/artifacts"

_metrics: OperatorMetrics | None = None


class NoDiffBase(kopf.DiffBaseStorage):
    """Keeps no last-handled state: every object's essence is the same empty one, so Kopf sees no
    change in any event (no creation or update cause, nothing stored), and the deletion handler fires
    on deletionTimestamp, which needs no diff. Nor does it build Kopf's essence (a deep copy of the
    whole object, twice per event)."""

    def build(self, *, body, extra_fields=None):
        return {}

    def fetch(self, *, body):
        return {}

    def store(self, *, body, patch, essence):
        pass


def operator_metrics() -> OperatorMetrics:
    """One set of metric families per process (prometheus-client refuses duplicates)."""
    global _metrics
    if _metrics is None:
        _metrics = OperatorMetrics()
    return _metrics


def build_registry() -> kopf.OperatorRegistry:
    registry = kopf.OperatorRegistry()

    @kopf.on.login(registry=registry)
    def login(**kwargs):
        return kopf.login_via_client(**kwargs)

    @kopf.on.startup(registry=registry)
    async def start(settings: kopf.OperatorSettings, memo: kopf.Memo, kompressor_jobs, kompressor_serving, **_):
        from kompressor.k8s.controller import Controller

        # The status schema is structural (unknown fields are pruned): Kopf keeps its own state
        # in annotations instead.
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=d.GROUP)
        # Our only change handler is on.delete, which needs no diff: no diff-base annotation either
        # (it was one more patch, and one more event, per CompressedModel created or edited).
        settings.persistence.diffbase_storage = NoDiffBase()
        settings.persistence.finalizer = FINALIZER
        settings.posting.level = logging.WARNING
        settings.watching.server_timeout = 300
        controller = Controller(memo.config, ApiClient(), operator_metrics(), kompressor_jobs, kompressor_serving)
        controller.start()
        memo.controller = controller

    @kopf.on.cleanup(registry=registry)
    async def stop(memo: kopf.Memo, **_):
        if getattr(memo, "controller", None) is not None:
            await memo.controller.stop()

    @kopf.index("batch", "v1", "jobs", labels=MANAGED, id="kompressor_jobs", registry=registry)
    async def kompressor_jobs(namespace, name, labels, status, **_):
        state = job_state(name, dict(labels), dict(status))
        return {(namespace, labels[r.LABEL_INSTANCE]): state} if state else None

    @kopf.index("apps", "v1", "deployments", labels={**MANAGED, r.LABEL_COMPONENT: "serving"},
                id="kompressor_serving", registry=registry)
    async def kompressor_serving(namespace, labels, spec, status, meta, **_):
        state = serving_state(dict(labels), dict(spec), dict(status), meta.get("generation"))
        return {(namespace, labels[r.LABEL_INSTANCE]): state}

    # The event handlers skip events that change nothing the core looks at (Kopf's own
    # annotation and finalizer patches, the echo of our status patch, a Job merely created).
    # The index and event handlers are coroutines: they only touch dicts, and Kopf runs plain
    # functions in a thread pool (a thread hop per event, thousands of them at 1000 CRs).
    @kopf.on.event(d.GROUP, d.VERSION, d.PLURAL, registry=registry)
    async def model_event(type, body, namespace, name, memo: kopf.Memo, **_):
        if type == "DELETED":
            memo.controller.forget((namespace, name))
        else:
            memo.controller.model_changed((namespace, name), body)

    @kopf.on.event("batch", "v1", "jobs", labels=MANAGED, registry=registry)
    async def job_event(type, namespace, name, labels, status, memo: kopf.Memo, **_):
        state = job_state(name, dict(labels), dict(status))
        memo.controller.child_changed((namespace, labels[r.LABEL_INSTANCE]), ("job", name),
                                      None if type == "DELETED" else state and state.phase)

    @kopf.on.event("apps", "v1", "deployments", labels=MANAGED, registry=registry)
    async def deployment_event(type, namespace, name, labels, spec, status, meta, memo: kopf.Memo, **_):
        state = serving_state(dict(labels), dict(spec), dict(status), meta.get("generation"))
        memo.controller.child_changed((namespace, labels[r.LABEL_INSTANCE]), ("deployment", name),
                                      None if type == "DELETED" else state)

    @kopf.on.delete(d.GROUP, d.VERSION, d.PLURAL, registry=registry)
    async def delete_artifacts(namespace, name, memo: kopf.Memo, logger, **_):
        """The CR's artifact folder is the only thing outside the cluster; children are
        garbage-collected through their ownerReferences. Never blocks deletion for long."""
        folder = memo.controller.store.path(f"{namespace}/{name}")
        attempts = memo.config.cleanup_attempts
        for attempt in range(1, attempts + 1):
            try:
                await asyncio.to_thread(shutil.rmtree, folder, False)
                return
            except FileNotFoundError:
                return
            except OSError as err:
                if attempt == attempts:
                    logger.warning(f"giving up deleting the artifacts in {folder} after {attempts} attempts: {err}")
                    log("artifact cleanup gave up", level="warning", folder=str(folder), error=str(err))
                    return
                await asyncio.sleep(min(2.0 ** attempt, 10.0))

    return registry
