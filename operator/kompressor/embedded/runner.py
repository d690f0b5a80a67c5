"""The embedded runner: the operator's reconcile loop with local processes instead of a cluster.

It plays the parts a cluster plays for the operator: the API server (reads the manifest
file, assigns ``metadata.generation`` on every spec change, stores the status in
status.json), the Job and Deployment controllers (subprocesses, see jobs.py and
serving.py) and the drift watcher's status patch (the verdict file is copied into
``status.drift``). The decisions are the operator's own: ``kompressor.core.reconcile``.

A model is reconciled when something about it changes (a child exits or becomes ready,
the manifest or the verdict file changes, a Requeue timer fires), never in a busy loop:
the only polling is a cheap ``stat`` of the manifest and verdict files.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import shutil
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from kompressor import commands
from kompressor.api import defaults as d
from kompressor.api.manifest import CompressedModel, load_manifests, to_manifest
from kompressor.api.report import METRICS_FILE, EvalReport
from kompressor.api.status import CompressedModelStatus, DriftVerdict
from kompressor.api.wire import SpecError, from_wire, to_wire
from kompressor.console import log
from kompressor.core import names
from kompressor.core.actions import DeleteJob, EmitEvent, Requeue, RunJob, Serve
from kompressor.core.observed import Observed
from kompressor.embedded.jobs import LocalJobs
from kompressor.embedded.layout import (
    ModelDir, append_jsonl, read_json, store_root, store_uri, write_atomic, write_json,
)
from kompressor.embedded.progress import JOB_PROGRESS
from kompressor.embedded.serving import LocalServing
from kompressor.store import open_store

FILE_POLL_SECONDS = 0.5
RESYNC_SECONDS = 60.0  # reconcile at least this often, like an operator's periodic resync
MAX_PASSES = 8  # reconciles in a row while each one still changes the status
SHUTDOWN_SECONDS = 30.0


def check_unique(models: list[CompressedModel], path: Path) -> None:
    seen: set[str] = set()
    for cm in models:
        if cm.key in seen:
            raise SpecError([(f"{path}: metadata.name", f"{cm.key} appears more than once")])
        seen.add(cm.key)


def _holds_no_document(path: Path) -> bool:
    """An emptied manifest (every model removed from it) means: no models. Only a running runner
    accepts that; at start an empty file is an error, since there would be nothing to run."""
    try:
        return not any(doc is not None for doc in yaml.safe_load_all(path.read_text()))
    except yaml.YAMLError:
        return False


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _note_cluster_only(cm: CompressedModel) -> None:
    """Say which spec fields only a cluster acts on: the embedded mode runs one local server per model."""
    if cm.spec.serving.autoscaling is not None:
        log("spec.serving.autoscaling is a cluster feature (a HorizontalPodAutoscaler and a PodDisruptionBudget "
            "for the serving Deployment): the embedded mode serves one process and ignores it", model=cm.key)
    if cm.spec.serving.feedback is not None and cm.spec.serving.feedback.token_secret_ref is not None:
        log("spec.serving.feedback.tokenSecretRef is a cluster feature (a Secret mounted into the serving Pod): the "
            "embedded mode's feedback endpoint listens on 127.0.0.1 only and takes labels without a token",
            model=cm.key)


class ModelRunner:
    """One CompressedModel: its reconcile loop, its jobs, its server and watcher."""

    def __init__(self, cm: CompressedModel, workdir: Path, port: int):
        self.workdir = workdir
        self.files = ModelDir.of(workdir, cm.namespace, cm.name)
        self.store = open_store(store_uri(workdir))
        self.port = port
        self.wake = asyncio.Event()
        self.requeue_at: float | None = None
        self.status = self._load_status()
        self.cm = self._assign_generation(cm)
        _note_cluster_only(self.cm)
        self.jobs = LocalJobs(self.files.jobs, self.files.logs, self.poke, self._job_output)
        self.serving = LocalServing(cm.name, port, self.files, self.poke, grpc_port=cm.spec.serving.grpc_port,
                                    workers=cm.spec.serving.workers, batching=cm.spec.serving.batching,
                                    performance=cm.spec.drift.performance if cm.spec.drift.enabled else None,
                                    online=commands.OnlineServing.of(cm.spec))
        self._reports: dict[int, tuple[float, EvalReport]] = {}
        self._verdict_text: str | None = None
        self.task: asyncio.Task | None = None

    @property
    def key(self) -> str:
        return self.cm.key

    def start(self) -> None:
        self.read_verdict()
        self.task = asyncio.create_task(self._loop())
        self.poke()

    def poke(self) -> None:
        self.wake.set()

    # -- the API server's part -------------------------------------------------------------

    def _load_status(self) -> CompressedModelStatus:
        data = read_json(self.files.status)
        if isinstance(data, dict):
            try:
                return from_wire(CompressedModelStatus, data, "status")
            except SpecError as err:
                log("ignoring an unreadable status.json", level="warning", path=str(self.files.status),
                    error=str(err))
        return CompressedModelStatus()

    def _assign_generation(self, cm: CompressedModel) -> CompressedModel:
        """Bump metadata.generation when the (defaulted) spec differs from the stored one."""
        spec = to_wire(cm.spec)
        stored = read_json(self.files.object, {}) or {}
        generation = int(stored.get("generation") or 0)
        if stored.get("spec") != spec or generation < 1:
            generation += 1
            write_json(self.files.object, {"generation": generation, "spec": spec})
        cm = dataclasses.replace(cm, generation=generation)
        spec_file = self.files.spec_file(generation)
        if not spec_file.exists():
            write_atomic(spec_file, yaml.safe_dump(to_manifest(cm, with_status=False), sort_keys=False))
        return cm

    def update(self, cm: CompressedModel) -> None:
        before = self.cm
        self.cm = self._assign_generation(cm)
        serving = self.cm.spec.serving  # taken up when the server (re)starts
        self.serving.grpc_port, self.serving.workers, self.serving.batching = (serving.grpc_port, serving.workers,
                                                                               serving.batching)
        self.serving.performance = self.cm.spec.drift.performance if self.cm.spec.drift.enabled else None
        self.serving.online = commands.OnlineServing.of(self.cm.spec)
        if self.cm.generation != before.generation:
            log("spec changed", model=self.key, generation=self.cm.generation)
            _note_cluster_only(self.cm)
        if self.cm.annotations != before.annotations:
            log("annotations changed", model=self.key, annotations=self.cm.annotations)
        self.poke()

    def read_verdict(self) -> bool:
        """Copy a new verdict file into status.drift (the watcher's status patch). True if it changed."""
        try:
            text = self.files.verdict.read_text()
        except FileNotFoundError:
            return False
        if text == self._verdict_text:
            return False
        self._verdict_text = text
        try:
            data = json.loads(text)
            verdict = from_wire(DriftVerdict, data, "status.drift")
        except (ValueError, SpecError) as err:
            log("ignoring an unreadable drift verdict", level="warning", model=self.key, error=str(err))
            return False
        if self.status.drift != verdict:
            self.status = dataclasses.replace(self.status, drift=verdict)
            append_jsonl(self.files.drift_history, {**to_wire(verdict), "seenAt": _now().isoformat()})
            return True
        return False

    # -- the reconcile loop ----------------------------------------------------------------

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            timeout = RESYNC_SECONDS
            if self.requeue_at is not None:
                timeout = min(timeout, max(0.0, self.requeue_at - loop.time()))
            try:
                await asyncio.wait_for(self.wake.wait(), timeout)
            except asyncio.TimeoutError:
                pass
            self.wake.clear()
            if self.requeue_at is not None and loop.time() >= self.requeue_at:
                self.requeue_at = None
            try:
                await self.reconcile_until_stable()
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug must not take the other models down; try again a bit later
                log("reconcile failed", level="error", model=self.key, error=traceback.format_exc(limit=5))
                self.requeue_at = loop.time() + 5.0

    def observe(self) -> Observed:
        status = self.status
        return Observed(
            model=dataclasses.replace(self.cm, status=status),
            now=_now(),
            jobs=self.jobs.states(),
            serving=self.serving.state(),
            reports=self._read_reports(status),
            online=self.serving.readings if status.online is not None else (),
        )

    def _read_reports(self, status: CompressedModelStatus) -> dict[int, EvalReport]:
        revisions = {job.revision for job in self.jobs.states() if job.kind == "evaluate" and job.phase == "Succeeded"}
        if status.candidate is not None:
            revisions.add(status.candidate.revision)
        reports = {}
        for revision in sorted(revisions):
            path = self.store.path(names.eval_key(self.cm.namespace, self.cm.name, revision)) / METRICS_FILE
            try:
                mtime = path.stat().st_mtime
            except FileNotFoundError:
                continue
            cached = self._reports.get(revision)
            if cached is None or cached[0] != mtime:
                try:
                    self._reports[revision] = (mtime, EvalReport.read(path.parent))
                except (OSError, ValueError, KeyError, SpecError) as err:
                    log("unreadable metrics.json", level="warning", model=self.key, path=str(path), error=str(err))
                    continue
            reports[revision] = self._reports[revision][1]
        return reports

    async def reconcile_until_stable(self) -> None:
        from kompressor.core.reconcile import reconcile

        if self.status.online is not None:  # the online stage's evidence, read once per pass
            await self.serving.read_online()
        for _ in range(MAX_PASSES):
            decision = reconcile(self.observe())
            changed = self._write_status(decision.status)
            await self._apply(decision.actions)
            if not changed:
                return

    def _write_status(self, status: CompressedModelStatus) -> bool:
        wire = to_wire(status)
        if self.files.status.exists() and wire == to_wire(self.status):
            return False
        before = self.status
        self.status = status
        write_json(self.files.status, wire)
        self._record_online(before, status)
        if (before.phase, before.current_revision) != (status.phase, status.current_revision) \
                or before.message != status.message:
            log(f"{self.key}: {status.phase}", model=self.key, phase=status.phase,
                revision=status.current_revision, message=status.message or "")
        return True

    def _record_online(self, before: CompressedModelStatus, after: CompressedModelStatus) -> None:
        """online.jsonl: the online stage's evidence whenever it moved (for the report's plot)."""
        stage = after.online
        if stage is None or (before.online is not None and (before.online.totals, before.online.step) ==
                             (stage.totals, stage.step) and before.online.revision == stage.revision):
            return
        totals = stage.totals
        append_jsonl(self.files.online_history, {
            "time": _now().isoformat(), "revision": stage.revision, "strategy": stage.strategy, "step": stage.step,
            "weight": stage.weight, "requests": totals.requests, "errors": totals.errors, "dropped": totals.dropped,
            "agreement": totals.agreement / totals.compared if totals.compared else None,
            "accuracy": totals.right / totals.labels if totals.labels else None, "outcome": stage.outcome,
            "servingRevision": after.current_revision})

    async def _apply(self, actions) -> None:
        loop = asyncio.get_running_loop()
        requeue = None
        for action in actions:
            if isinstance(action, RunJob):
                self._run_job(action)
            elif isinstance(action, DeleteJob):
                await self.jobs.delete(action.name)
            elif isinstance(action, Serve):
                await self.serving.apply(action, self.files.spec_file(self.cm.generation))
            elif isinstance(action, EmitEvent):
                append_jsonl(self.files.events, {"time": _now().isoformat(), "type": action.type,
                                                 "reason": action.reason, "message": action.message})
                log(f"event {action.reason}", level="warning" if action.type == "Warning" else "info",
                    model=self.key, message=action.message)
            elif isinstance(action, Requeue):
                at = loop.time() + action.after_seconds
                requeue = at if requeue is None else min(requeue, at)
        self.requeue_at = requeue

    def _run_job(self, action: RunJob) -> None:
        spec_file = self.files.spec_file(action.generation)
        if not spec_file.exists():  # a job for a generation this runner never saw: the core will move on
            log("no spec file for the job's generation", level="warning", job=action.name,
                generation=action.generation)
            return
        candidate = str(self.store.path(action.candidate_key))
        if action.kind == "prune":
            argv = commands.prune_argv(str(spec_file), candidate, action.revision,
                                       str(store_root(self.workdir) / "baselines"), retrain=action.retrain)
        else:
            argv = commands.evaluate_argv(str(spec_file), candidate, str(self.store.path(action.eval_key)))
        jobs_spec = self.cm.spec.jobs
        self.jobs.start(action.name, action.kind, action.revision, action.generation, argv,
                        backoff_limit=jobs_spec.backoff_limit, deadline_seconds=jobs_spec.active_deadline_seconds)

    def _job_output(self, job: str, record: dict) -> None:
        JOB_PROGRESS.update(job, record)

    # -- stopping --------------------------------------------------------------------------

    async def stop(self) -> None:
        if self.task:
            self.task.cancel()
            try:
                await self.task
            except (asyncio.CancelledError, Exception):
                pass
        await asyncio.gather(self.jobs.stop_all(), self.serving.stop())

    def kill_children(self) -> None:
        """SIGKILL every child process group at once (the last resort of a stuck shutdown)."""
        children = [job.child for job in self.jobs.jobs.values()] + [self.serving.server, self.serving.watcher]
        for child in children:
            if child is not None:
                child.kill()

    async def delete(self) -> None:
        """The CompressedModel was removed: stop everything it owns and remove its files."""
        await self.stop()
        shutil.rmtree(self.files.root, ignore_errors=True)
        shutil.rmtree(store_root(self.workdir) / self.cm.namespace / self.cm.name, ignore_errors=True)
        log("deleted", model=self.key)


class Runner:
    """Every CompressedModel of one manifest file."""

    def __init__(self, manifest: Path, workdir: Path, first_port: int = d.SERVING_PORT):
        self.manifest = manifest
        self.workdir = workdir
        self.first_port = first_port
        self.models: dict[str, ModelRunner] = {}
        self.ports: dict[str, int] = {}
        self._manifest_stamp: Any = None

    def _port_for(self, key: str) -> int:
        if key not in self.ports:
            used = set(self.ports.values())
            port = self.first_port
            while port in used:
                port += 1
            self.ports[key] = port
        return self.ports[key]

    def _stamp(self) -> Any:
        try:
            stat = self.manifest.stat()
        except FileNotFoundError:
            return None
        return (stat.st_mtime_ns, stat.st_size)

    async def apply_manifest(self, models: list[CompressedModel]) -> None:
        wanted = {cm.key: cm for cm in models}
        for key, runner in list(self.models.items()):
            if key not in wanted:
                del self.models[key]
                self.ports.pop(key, None)
                await runner.delete()
        for key, cm in wanted.items():
            if key in self.models:
                self.models[key].update(cm)
            else:
                runner = ModelRunner(cm, self.workdir, self._port_for(key))
                self.models[key] = runner
                log("model added", model=key, generation=runner.cm.generation, url=runner.serving.url)
                runner.start()

    async def _reload_manifest(self) -> None:
        stamp = self._stamp()
        if stamp == self._manifest_stamp:
            return
        self._manifest_stamp = stamp
        if stamp is None:
            log("manifest file is gone; keeping the models as they are", level="warning",
                path=str(self.manifest))
            return
        try:
            models = [] if _holds_no_document(self.manifest) else load_manifests(self.manifest)
            check_unique(models, self.manifest)
        except (SpecError, OSError) as err:
            for path, message in getattr(err, "problems", [(str(self.manifest), str(err))]):
                log(f"manifest rejected: {path}: {message}", level="error")
            return
        await self.apply_manifest(models)

    def _check_verdicts(self) -> None:
        for runner in self.models.values():
            if runner.read_verdict():
                runner.poke()

    async def run(self, stop: asyncio.Event) -> None:
        try:
            while not stop.is_set():
                await self._reload_manifest()
                self._check_verdicts()
                try:
                    await asyncio.wait_for(stop.wait(), FILE_POLL_SECONDS)
                except asyncio.TimeoutError:
                    pass
        finally:
            log("stopping: terminating the jobs, servers and watchers")
            stopping = asyncio.gather(*(runner.stop() for runner in self.models.values()), return_exceptions=True)
            try:
                await asyncio.wait_for(stopping, SHUTDOWN_SECONDS)
            except asyncio.TimeoutError:  # never hang on the way out: kill whatever is left
                log("children did not stop in time; killing them", level="error")
                for runner in self.models.values():
                    runner.kill_children()
            JOB_PROGRESS.close()
            log("stopped")
