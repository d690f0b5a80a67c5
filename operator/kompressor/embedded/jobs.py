"""Pruning and evaluation jobs as local subprocesses, with the semantics of a Kubernetes Job and the
operator's ``podFailurePolicy`` (kompressor.k8s.children.pod_failure_policy): an attempt that exits 2
(bad input) fails the job at once; any other failed attempt is retried until ``spec.jobs.backoffLimit``
retries are spent; a job running longer
than ``activeDeadlineSeconds`` (all attempts together) is stopped and failed, and a finished job
keeps its phase until deleted.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from kompressor.console import log
from kompressor.core.observed import JobState
from kompressor.embedded.layout import read_json, write_json
from kompressor.embedded.processes import Child
from kompressor.embedded.progress import JOB_PROGRESS
from kompressor.errors import BAD_INPUT_EXIT_CODE


@dataclass
class LocalJob:
    state: JobState
    argv: list[str]
    backoff_limit: int
    deadline_seconds: float
    attempts: int = 0
    child: Child | None = None
    task: asyncio.Task | None = field(default=None, repr=False)


def _now() -> datetime:
    return datetime.now(timezone.utc)


class LocalJobs:
    """The jobs of one CompressedModel. ``changed()`` is called whenever a job's phase changes."""

    def __init__(self, jobs_file: Path, logs: Path, changed: Callable[[], None],
                 on_line: Callable[[str, dict], None] | None = None):
        self.jobs_file = jobs_file
        self.logs = logs
        self.changed = changed
        self.on_line = on_line
        self.jobs: dict[str, LocalJob] = {}
        for record in read_json(jobs_file, []):  # finished jobs of an earlier run
            state = JobState(
                name=record["name"], kind=record["kind"], revision=record["revision"],
                generation=record["generation"], phase=record["phase"], message=record.get("message", ""),
                bad_input=bool(record.get("badInput", False)),
                started_at=_parse_time(record.get("startedAt")), finished_at=_parse_time(record.get("finishedAt")),
            )
            self.jobs[state.name] = LocalJob(state=state, argv=record.get("argv", []), backoff_limit=0,
                                             deadline_seconds=0)

    def states(self) -> tuple[JobState, ...]:
        return tuple(job.state for job in self.jobs.values())

    def running(self) -> list[LocalJob]:
        return [job for job in self.jobs.values() if job.child and job.child.running]

    def start(self, name: str, kind: str, revision: int, generation: int, argv: list[str], backoff_limit: int,
              deadline_seconds: float) -> bool:
        """Start a job unless one of that name exists (idempotent). True when it was started."""
        if name in self.jobs:
            return False
        job = LocalJob(
            state=JobState(name=name, kind=kind, revision=revision, generation=generation, phase="Pending",
                           started_at=_now()),
            argv=argv, backoff_limit=backoff_limit, deadline_seconds=deadline_seconds,
        )
        self.jobs[name] = job
        job.task = asyncio.create_task(self._run(job))
        return True

    async def _run(self, job: LocalJob) -> None:
        name = job.state.name
        loop = asyncio.get_running_loop()
        deadline = loop.time() + job.deadline_seconds  # like activeDeadlineSeconds: for the whole job
        while True:
            job.attempts += 1
            job.child = Child(job.argv, self.logs / f"{name}.log",
                              on_line=(lambda record: self.on_line(name, record)) if self.on_line else None)
            try:
                await job.child.start()
            except OSError as err:  # e.g. the interpreter vanished: nothing to retry with
                self._finish(job, "Failed", f"{name} could not be started: {err}")
                return
            job.state = replace(job.state, phase="Running")
            log("job started", job=name, attempt=job.attempts, pid=job.child.pid)
            self.changed()
            try:
                code = await asyncio.wait_for(job.child.wait(), max(0.0, deadline - loop.time()))
                message = job.child.failure_message() if code else ""
            except asyncio.TimeoutError:
                await job.child.stop()
                code, message = -1, f"DeadlineExceeded: the job ran longer than {job.deadline_seconds:g} s"
            if code == 0:
                self._finish(job, "Succeeded", "")
                return
            log("job attempt failed", level="warning", job=name, attempt=job.attempts, exit_code=code,
                message=message)
            if code == BAD_INPUT_EXIT_CODE:  # the same input fails the same way: not retried
                self._finish(job, "Failed", message or f"exit code {code}", bad_input=True)
                return
            if code == -1 or job.attempts > job.backoff_limit:
                reason = message or f"exit code {code}"
                self._finish(job, "Failed", f"{name} failed after {job.attempts} attempt(s): {reason}")
                return

    def _finish(self, job: LocalJob, phase: str, message: str, bad_input: bool = False) -> None:
        JOB_PROGRESS.finished(job.state.name)
        job.state = replace(job.state, phase=phase, message=message, bad_input=bad_input, finished_at=_now())
        log(f"job {phase.lower()}", level="info" if phase == "Succeeded" else "warning", job=job.state.name,
            **({"message": message} if message else {}))
        self._save()
        self.changed()

    async def delete(self, name: str) -> None:
        job = self.jobs.pop(name, None)
        if job is None:
            return
        JOB_PROGRESS.finished(name)
        if job.task and not job.task.done():
            job.task.cancel()
        if job.child:
            await job.child.stop()
        self._save()

    async def stop_all(self) -> None:
        for job in list(self.jobs.values()):
            if job.task and not job.task.done():
                job.task.cancel()
            if job.child:
                await job.child.stop()

    def _save(self) -> None:
        write_json(self.jobs_file, [
            {"name": j.state.name, "kind": j.state.kind, "revision": j.state.revision,
             "generation": j.state.generation, "phase": j.state.phase, "message": j.state.message,
             "badInput": j.state.bad_input, "attempts": j.attempts,
             "startedAt": _format_time(j.state.started_at), "finishedAt": _format_time(j.state.finished_at),
             "argv": j.argv}
            for j in self.jobs.values() if j.state.phase in ("Succeeded", "Failed")
        ])


def _format_time(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def _parse_time(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None
