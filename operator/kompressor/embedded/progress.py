"""The jobs' progress, as the runner shows it: one Rich progress bar per running job on a terminal,
or (JSON logs) at most one progress line per job every few seconds.

The jobs report progress as JSON log lines with ``step`` and ``total`` (kompressor.console.progress).
"""

from __future__ import annotations

import time

from kompressor.console import json_logs, log

LOG_EVERY_SECONDS = 2.0


class JobProgress:
    def __init__(self) -> None:
        self._bar = None
        self._tasks: dict[str, int] = {}
        self._logged: dict[str, float] = {}

    def update(self, job: str, record: dict) -> None:
        if not isinstance(record.get("step"), int) or not isinstance(record.get("total"), int):
            return
        step, total, what = record["step"], record["total"], str(record.get("event", "working"))
        if json_logs():
            now = time.monotonic()
            if step == total or now - self._logged.get(job, 0.0) >= LOG_EVERY_SECONDS:
                self._logged[job] = now
                log(f"{job}: {what}", job=job, step=step, total=total)
            return
        bar = self._ensure_bar()
        if job not in self._tasks:
            self._tasks[job] = bar.add_task(job, total=total)
        bar.update(self._tasks[job], completed=step, total=total, description=f"{job}: {what}")

    def finished(self, job: str) -> None:
        self._logged.pop(job, None)
        task = self._tasks.pop(job, None)
        if task is not None and self._bar is not None:
            self._bar.remove_task(task)
            if not self._tasks:
                self._bar.stop()
                self._bar = None

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
        self._tasks.clear()

    def _ensure_bar(self):
        if self._bar is None:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), transient=True)
            self._bar.start()
        return self._bar


JOB_PROGRESS = JobProgress()
