"""The local stand-ins for the serving Deployment and the drift-watcher Deployment.

``Serve`` is applied idempotently: the first time it starts ``kompressor serve`` on
127.0.0.1:PORT; on a revision change it hot-swaps the running server
(``POST /v2/repository/models/{name}/load``), so requests keep flowing; and it (re)starts
``kompressor watch-drift`` whenever the revision, the reference data or the spec changes.
A process that dies is restarted by the next ``Serve``, with a growing back-off.

An online stage's candidate (``Serve.candidate``) is set on the running server, as a cluster's serving Pod
would be given it in its arguments, but without a restart: ``POST .../candidate`` (a new candidate, or the
next canary weight, which keeps the counts) and ``DELETE .../candidate``. ``read_online`` fetches the server's
evidence (``GET /v2/models/{name}/online``) for the next observation; a candidate the server refused is
reported as an error reading.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import aiohttp

from kompressor import commands
from kompressor.console import log
from kompressor.api import defaults as d
from kompressor.api.status import OnlineCounts
from kompressor.core.actions import OnlineCandidate, Serve
from kompressor.core.observed import OnlineReading, ServingState
from kompressor.embedded.layout import ModelDir, append_jsonl
from kompressor.embedded.processes import Child
from kompressor.online_evidence import evidence_path, reading_from
from kompressor.store import resolve_local

HOST = "127.0.0.1"
READY_POLL_SECONDS = 0.2
SWAP_TIMEOUT_SECONDS = 120
MAX_BACKOFF_SECONDS = 30.0


@dataclass
class _Backoff:
    failures: int = 0
    not_before: float = 0.0

    def failed(self) -> None:
        self.failures += 1
        self.not_before = time.monotonic() + min(2.0 ** (self.failures - 1), MAX_BACKOFF_SECONDS)

    def wait_seconds(self) -> float:
        return max(0.0, self.not_before - time.monotonic())


class LocalServing:
    def __init__(self, name: str, port: int, files: ModelDir, changed: Callable[[], None],
                 grpc_port: int | None = None, workers: int | None = None, batching=None, performance=None,
                 online: commands.OnlineServing | None = None):
        self.name = name
        self.port = port
        self.grpc_port = grpc_port  # spec.serving.grpcPort, as given (the embedded mode assigns only REST ports)
        self.workers = workers  # spec.serving.workers (None: one per CPU of this machine's container limit)
        self.batching = batching  # spec.serving.batching
        # spec.drift.performance: the feedback endpoint on (one worker), its accuracy read by the watcher; no token
        # (spec.serving.feedback.tokenSecretRef is a cluster Secret; here the server is on this machine)
        self.performance = performance
        self.online = online  # spec.promotion.strategy shadow or canary (commands.OnlineServing), else None
        self.candidate_target: tuple | None = None  # (revision, sha256, mode, weight) the server was given
        self.candidate_error: tuple[tuple, str] | None = None  # (target, why) when the server refused it
        self.readings: tuple[OnlineReading, ...] = ()
        self.files = files
        self.changed = changed
        self.server: Child | None = None
        self.server_target: tuple[int, str] | None = None  # (revision, sha256) it was asked to serve
        self.served_revision: int | None = None
        self.ready = False
        self.watcher: Child | None = None
        self.watcher_key: tuple | None = None
        self._server_backoff = _Backoff()
        self._watcher_backoff = _Backoff()
        self._tasks: set[asyncio.Task] = set()

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def state(self) -> ServingState | None:
        if self.server is None:
            return None
        return ServingState(revision=self.served_revision, ready=self.ready and self.server.running)

    async def apply(self, action: Serve, spec_file: Path) -> None:
        artifact_dir = resolve_local(action.artifact.uri)
        target = (action.revision, action.artifact.sha256)
        if self.server is None or not self.server.running:
            await self._start_server(artifact_dir, target)
        elif target != self.server_target:
            await self._hot_swap(artifact_dir, target)
        if self.ready:
            await self._ensure_candidate(action.candidate)
        await self._ensure_watcher(action, spec_file)

    async def _ensure_candidate(self, candidate: OnlineCandidate | None) -> None:
        wanted = None if candidate is None else (candidate.revision, candidate.artifact.sha256, candidate.mode,
                                                 candidate.weight)
        if wanted == self.candidate_target or (self.candidate_error and self.candidate_error[0] == wanted):
            return
        url = f"{self.url}/v2/repository/models/{self.name}/candidate"
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=SWAP_TIMEOUT_SECONDS)) as http:
                if wanted is None:
                    async with http.delete(url) as response:
                        text = await response.text()
                else:
                    body = {"parameters": {"artifact": str(resolve_local(candidate.artifact.uri)),
                                           "sha256": candidate.artifact.sha256, "mode": candidate.mode,
                                           "weight": candidate.weight}}
                    async with http.post(url, json=body) as response:
                        text = await response.text()
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as err:
            log("setting the candidate failed", level="warning", model=self.name, message=str(err))
            return  # the next Serve tries again
        if response.status != 200:
            log("candidate refused", level="warning", model=self.name, candidate=str(wanted),
                http_status=response.status, message=text[:300])
            self.candidate_error = (wanted, text[:500])
            self.changed()
            return
        self.candidate_target, self.candidate_error = wanted, None
        log("candidate set" if wanted else "candidate removed", model=self.name,
            **({"revision": wanted[0], "mode": wanted[2], "weight": wanted[3]} if wanted else {}))

    async def read_online(self) -> tuple[OnlineReading, ...]:
        """The server's evidence about its candidate (and a refused candidate as an error reading), kept for
        ``observe``."""
        readings: list[OnlineReading] = []
        if self.candidate_error is not None and self.candidate_error[0] is not None:
            (revision, sha256, mode, weight), why = self.candidate_error
            readings.append(OnlineReading(source="refused", revision=revision, sha256=sha256, mode=mode,
                                          weight=weight, counts=OnlineCounts(), error=why))
        if self.ready and self.candidate_target is not None:
            try:
                timeout = aiohttp.ClientTimeout(total=d.ONLINE_EVIDENCE_TIMEOUT_SECONDS)
                async with aiohttp.ClientSession(timeout=timeout) as http:
                    async with http.get(self.url + evidence_path(self.name)) as response:
                        body = await response.json(content_type=None) if response.status == 200 else None
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError) as err:
                log("reading the online evidence failed", level="warning", model=self.name, message=str(err))
                body = None
            reading = reading_from(body)
            if reading is not None:
                readings.append(reading)
        self.readings = tuple(readings)
        return self.readings

    async def _start_server(self, artifact_dir: Path, target: tuple[int, str]) -> None:
        wait = self._server_backoff.wait_seconds()
        if wait:
            self._later(wait)
            return
        argv = commands.serve_argv(str(artifact_dir), self.name, self.port, str(self.files.capture), host=HOST,
                                   grpc_port=self.grpc_port, workers=self.workers, batching=self.batching,
                                   performance=self.performance, online=self.online)
        self.server = Child(argv, self.files.logs / "serving.log")
        self.server_target, self.served_revision, self.ready = target, None, False
        self.candidate_target, self.candidate_error = None, None  # a new process has no candidate
        await self.server.start()
        log("serving started", model=self.name, revision=target[0], url=self.url, pid=self.server.pid)
        self._spawn(self._await_ready(self.server, target[0]))

    async def _await_ready(self, server: Child, revision: int) -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http:
            while server.running:
                try:
                    async with http.get(f"{self.url}/v2/health/ready") as response:
                        if response.status == 200:
                            break
                except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
                    pass
                await asyncio.sleep(READY_POLL_SECONDS)
        if server is not self.server:
            return
        if server.running:
            self.ready, self.served_revision = True, revision
            self._server_backoff = _Backoff()
            log("serving ready", model=self.name, revision=revision, url=self.url)
            self._record(revision)
            self.changed()
        code = await server.wait()
        if server is self.server:  # not stopped by us
            self.ready, self.served_revision = False, None
            self._server_backoff.failed()
            log("serving exited", level="warning", model=self.name, exit_code=code,
                message=server.failure_message())
            self.changed()

    async def _hot_swap(self, artifact_dir: Path, target: tuple[int, str]) -> None:
        body = {"parameters": {"artifact": str(artifact_dir), "sha256": target[1]}}
        url = f"{self.url}/v2/repository/models/{self.name}/load"
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=SWAP_TIMEOUT_SECONDS)) as http:
                async with http.post(url, json=body) as response:
                    text = await response.text()
                    if response.status != 200:
                        log("hot-swap refused", level="warning", model=self.name, revision=target[0],
                            http_status=response.status, message=text[:300])
                        return
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as err:
            log("hot-swap failed", level="warning", model=self.name, revision=target[0], message=str(err))
            return
        self.server_target, self.served_revision = target, target[0]
        if self.candidate_target is not None and self.candidate_target[1] == target[1]:
            self.candidate_target = None  # the candidate was promoted: the server dropped it
        log("serving swapped", model=self.name, revision=target[0])
        self._record(target[0])
        self.changed()

    async def _ensure_watcher(self, action: Serve, spec_file: Path) -> None:
        if action.drift_reference is None:
            await self._stop_watcher()
            return
        key = (action.revision, action.drift_reference, str(spec_file))
        if self.watcher is not None and self.watcher.running and key == self.watcher_key:
            return
        wait = self._watcher_backoff.wait_seconds()
        if wait:
            self._later(wait)
            return
        await self._stop_watcher()
        argv = commands.watcher_argv(
            str(spec_file), str(self.files.capture), str(self.files.verdict), action.revision,
            reference=action.drift_reference, state=str(self.files.drift_state / f"r{action.revision}"),
            artifact=str(resolve_local(action.artifact.uri)),
            serving_metrics_url=f"{self.url}/metrics" if self.performance is not None else None,
        )
        self.files.capture.mkdir(parents=True, exist_ok=True)
        self.watcher, self.watcher_key = Child(argv, self.files.logs / "drift-watcher.log"), key
        await self.watcher.start()
        log("drift watcher started", model=self.name, revision=action.revision,
            reference=action.drift_reference, pid=self.watcher.pid)
        self._spawn(self._await_watcher_exit(self.watcher))

    async def _await_watcher_exit(self, watcher: Child) -> None:
        code = await watcher.wait()
        if watcher is self.watcher:
            self._watcher_backoff.failed()
            log("drift watcher exited", level="warning", model=self.name, exit_code=code,
                message=watcher.failure_message())
            self.changed()

    async def _stop_watcher(self) -> None:
        watcher, self.watcher, self.watcher_key = self.watcher, None, None
        if watcher:
            await watcher.stop()

    async def stop(self) -> None:
        server, self.server = self.server, None
        self.ready, self.served_revision, self.server_target = False, None, None
        await self._stop_watcher()
        if server:
            await server.stop()
        for task in list(self._tasks):
            task.cancel()

    def _record(self, revision: int) -> None:
        from datetime import datetime, timezone

        append_jsonl(self.files.serving_history, {"time": datetime.now(timezone.utc).isoformat(),
                                                  "revision": revision})

    def _spawn(self, coro) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _later(self, seconds: float) -> None:
        asyncio.get_running_loop().call_later(seconds, self.changed)
