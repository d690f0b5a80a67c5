"""Plays the cluster's controllers (Job controller, Deployment controller, kubelet) against the
loopback API, with local subprocesses instead of pods.

- Job: runs the container's command (the real `kompressor prune|evaluate`) as a subprocess,
  with volume mounts mapped to local folders (ConfigMap -> files, PVC -> ``pvc_root/CLAIM``,
  hostPath -> itself; an emptyDir is not mapped: the process uses the local temp dir), retries up
  to ``backoffLimit``, honours ``activeDeadlineSeconds``, and writes the Job's status back (startTime,
  active, succeeded, failed, conditions Complete/Failed) through the API, as the real controller does.
- Deployment: runs one process per Deployment (replicas > 0) from its pod template; the serving
  container gets a free loopback port (``ports[(namespace, deployment)]``), and the status
  (observedGeneration, updated/ready replicas) is written once its readiness probe answers.
  A container port named ``metrics`` (the drift watcher's) becomes a free ``--metrics-port`` instead.
  A changed template restarts the process; a deleted Deployment or Job stops it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import aiohttp
from .net import free_port

JOBS = "/apis/batch/v1/jobs"
DEPLOYMENTS = "/apis/apps/v1/deployments"
MERGE = {"Content-Type": "application/merge-patch+json"}


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _fail_job_rule(policy: dict | None, container: str, code: int) -> int | None:
    """The index of the podFailurePolicy FailJob rule an exit code matches (onExitCodes rules only: the
    fake kubelet has no disruptions), or None."""
    for index, rule in enumerate((policy or {}).get("rules", [])):
        on = rule.get("onExitCodes")
        if rule.get("action") != "FailJob" or not on or on.get("containerName", container) != container:
            continue
        if (code in on["values"]) == (on["operator"] == "In"):
            return index
    return None


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


class ClusterControllers:
    def __init__(self, api_url: str, workdir: Path, pvc_root: Path, env: dict[str, str] | None = None,
                 interval: float = 0.1):
        self.api_url = str(api_url).rstrip("/")
        self.workdir = Path(workdir)
        self.pvc_root = Path(pvc_root)
        self.env = dict(env or {})  # applied last: e.g. a session-wide KOMPRESSOR_CACHE, KUBECONFIG
        self.interval = interval
        self.ports: dict[tuple[str, str], int] = {}
        self.job_runs: dict[tuple[str, str], int] = {}  # how many pods each Job has run
        self._jobs: dict[str, asyncio.Task] = {}  # by uid
        self._deployments: dict[tuple[str, str], tuple[str, asyncio.Task]] = {}
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task | None = None

    async def __aenter__(self) -> "ClusterControllers":
        self._session = aiohttp.ClientSession()
        self._task = asyncio.create_task(self._loop())
        return self

    async def __aexit__(self, *exc) -> None:
        self._task.cancel()
        tasks = [*self._jobs.values(), *(t for _, t in self._deployments.values())]
        for task in tasks:
            task.cancel()
        await asyncio.gather(self._task, *tasks, return_exceptions=True)
        await self._session.close()

    # --- the control loop ------------------------------------------------------------------------

    async def _loop(self) -> None:
        while True:
            try:
                await self._sync_jobs()
                await self._sync_deployments()
            except aiohttp.ClientError:
                pass  # the API restarts in some tests; try again
            await asyncio.sleep(self.interval)

    async def _list(self, path: str) -> list[dict]:
        async with self._session.get(self.api_url + path) as resp:
            return (await resp.json())["items"] if resp.status == 200 else []

    async def _patch_status(self, path: str, status: dict) -> None:
        async with self._session.patch(f"{self.api_url}{path}/status", json={"status": status}, headers=MERGE):
            pass

    async def _sync_jobs(self) -> None:
        jobs = await self._list(JOBS)
        live = set()
        for job in jobs:
            uid = job["metadata"]["uid"]
            live.add(uid)
            if uid not in self._jobs and not job.get("status", {}).get("conditions"):
                self._jobs[uid] = asyncio.create_task(self._run_job(job))
        for uid in list(self._jobs):
            if uid not in live:  # deleted: kill its pod
                self._jobs.pop(uid).cancel()

    async def _sync_deployments(self) -> None:
        deployments = await self._list(DEPLOYMENTS)
        live = set()
        for dep in deployments:
            key = (dep["metadata"]["namespace"], dep["metadata"]["name"])
            live.add(key)
            wanted = _digest([dep["spec"].get("template"), dep["spec"].get("replicas", 1)])
            running = self._deployments.get(key)
            if running and (running[0] != wanted or running[1].done()):
                running[1].cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await running[1]
                running = None
            if running is None:
                self._deployments[key] = (wanted, asyncio.create_task(self._run_deployment(dep)))
        for key in list(self._deployments):
            if key not in live:
                self._deployments.pop(key)[1].cancel()
                self.ports.pop(key, None)

    # --- Jobs --------------------------------------------------------------------------------

    async def _run_job(self, job: dict) -> None:
        meta, spec = job["metadata"], job["spec"]
        path = f"/apis/batch/v1/namespaces/{meta['namespace']}/jobs/{meta['name']}"
        pod = spec["template"]["spec"]
        backoff_limit = int(spec.get("backoffLimit", 6))
        deadline = spec.get("activeDeadlineSeconds")
        started = _now()
        await self._patch_status(path, {"startTime": started, "active": 1})
        failed = 0
        loop = asyncio.get_running_loop()
        ends_at = loop.time() + deadline if deadline else None
        while True:
            self.job_runs[(meta["namespace"], meta["name"])] = failed + 1
            timeout = None if ends_at is None else max(0.0, ends_at - loop.time())
            try:
                code = await asyncio.wait_for(
                    self._run_container(meta, pod, f"{meta['name']}-{failed}"), timeout)
            except asyncio.TimeoutError:
                await self._fail(path, failed + 1, "DeadlineExceeded", "Job was active longer than specified deadline")
                return
            if code == 0:
                await self._patch_status(path, {
                    "active": None, "succeeded": 1, "completionTime": _now(),
                    "conditions": [{"type": "Complete", "status": "True", "lastTransitionTime": _now()}]})
                return
            failed += 1
            rule = _fail_job_rule(spec.get("podFailurePolicy"), pod["containers"][0]["name"], code)
            if rule is not None:  # as the Job controller words it (pkg/controller/job/pod_failure_policy.go)
                await self._fail(path, failed, "PodFailurePolicy",
                                 f"Container {pod['containers'][0]['name']} for pod {meta['namespace']}/"
                                 f"{meta['name']}-{failed - 1} failed with exit code {code} matching FailJob "
                                 f"rule at index {rule}")
                return
            if failed > backoff_limit:
                await self._fail(path, failed, "BackoffLimitExceeded",
                                 f"Job has reached the specified backoff limit (last exit code {code})")
                return
            await self._patch_status(path, {"failed": failed})

    async def _fail(self, path: str, failed: int, reason: str, message: str) -> None:
        await self._patch_status(path, {
            "active": None, "failed": failed,
            "conditions": [{"type": "Failed", "status": "True", "reason": reason, "message": message,
                            "lastTransitionTime": _now()}]})

    # --- Deployments -------------------------------------------------------------------------

    async def _run_deployment(self, dep: dict) -> None:
        meta, spec = dep["metadata"], dep["spec"]
        key = (meta["namespace"], meta["name"])
        path = f"/apis/apps/v1/namespaces/{meta['namespace']}/deployments/{meta['name']}"
        replicas = int(spec.get("replicas", 1))
        generation = meta.get("generation", 1)
        if replicas == 0:
            await self._patch_status(path, {"observedGeneration": generation, "replicas": 0,
                                            "updatedReplicas": 0, "readyReplicas": 0})
            return
        pod = spec["template"]["spec"]
        container = pod["containers"][0]
        probe = (container.get("readinessProbe") or {}).get("httpGet")
        port = None
        if container.get("ports"):
            port = free_port()
            self.ports[key] = port
        await self._patch_status(path, {"observedGeneration": generation, "replicas": replicas,
                                        "updatedReplicas": replicas, "readyReplicas": 0})
        run = asyncio.create_task(self._run_container(meta, pod, meta["name"], port=port))
        try:
            if probe and port:
                await self._await_ready(run, f"http://127.0.0.1:{port}{probe['path']}")
            await self._patch_status(path, {"readyReplicas": replicas, "availableReplicas": replicas})
            await run
        finally:
            run.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await run
            with contextlib.suppress(Exception):
                await self._patch_status(path, {"readyReplicas": 0, "availableReplicas": 0})

    async def _await_ready(self, run: asyncio.Task, url: str) -> None:
        while not run.done():
            with contextlib.suppress(aiohttp.ClientError):
                async with self._session.get(url) as resp:
                    if resp.status == 200:
                        return
            await asyncio.sleep(0.1)
        await run  # it exited before becoming ready

    # --- pods ----------------------------------------------------------------------------------

    async def _run_container(self, meta: dict, pod: dict, pod_name: str, port: int | None = None) -> int:
        container = pod["containers"][0]
        mounts = await self._mount(meta["namespace"], pod, container)
        argv = [_map(arg, mounts) for arg in container["command"] + container.get("args", [])]
        if argv[0] == "kompressor":
            argv = [sys.executable, "-m", "kompressor.cli", *argv[1:]]
        if port is not None:  # every pod has its own network; here they share loopback: a free port each
            if (container.get("ports") or [{}])[0].get("name") == "metrics":  # the drift watcher
                argv = _set_flag(argv, "--metrics-port", str(port))
            else:
                argv = _set_flag(_set_flag(argv, "--port", str(port)), "--host", "127.0.0.1")
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        for item in container.get("env", []):
            env[item["name"]] = _map(item.get("value", ""), mounts)
        if "KOMPRESSOR_PVC_ROOT" in env:
            env["KOMPRESSOR_PVC_ROOT"] = str(self.pvc_root)
        env.update(self.env)
        logs = self.workdir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        with open(logs / f"{meta['namespace']}_{pod_name}.log", "ab") as log:
            proc = await asyncio.create_subprocess_exec(*argv, env=env, stdout=log, stderr=log,
                                                        cwd=str(self.workdir), start_new_session=True,
                                                        preexec_fn=_die_with_parent)
            try:
                return await proc.wait()
            finally:
                if proc.returncode is None:
                    proc.terminate()
                    try:
                        await asyncio.wait_for(proc.wait(), 5)
                    except asyncio.TimeoutError:
                        proc.kill()
                        await proc.wait()

    async def _mount(self, namespace: str, pod: dict, container: dict) -> list[tuple[str, str]]:
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        out = []
        for mount in container.get("volumeMounts", []):
            volume = volumes[mount["name"]]
            if "configMap" in volume:
                name = volume["configMap"]["name"]
                local = self.workdir / "configmaps" / namespace / name
                async with self._session.get(f"{self.api_url}/api/v1/namespaces/{namespace}/configmaps/{name}") as r:
                    data = (await r.json()).get("data", {}) if r.status == 200 else {}
                local.mkdir(parents=True, exist_ok=True)
                for file, text in data.items():
                    (local / file).write_text(text)
            elif "persistentVolumeClaim" in volume:
                local = self.pvc_root / volume["persistentVolumeClaim"]["claimName"]
            elif "hostPath" in volume:
                local = Path(volume["hostPath"]["path"])
            else:  # emptyDir: scratch space (the pods' /tmp) that no command line names; a local
                continue  # /tmp mapped elsewhere would move the test's own temporary paths
            local.mkdir(parents=True, exist_ok=True)
            out.append((mount["mountPath"].rstrip("/"), str(local)))
        return sorted(out, key=lambda m: -len(m[0]))


def _die_with_parent() -> None:
    if sys.platform == "linux":
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _map(value: str, mounts: list[tuple[str, str]]) -> str:
    for mount_path, local in mounts:
        if value == mount_path or value.startswith(mount_path + "/"):
            return local + value[len(mount_path):]
    return value


def _set_flag(argv: list[str], flag: str, value: str) -> list[str]:
    argv = list(argv)
    if flag in argv:
        argv[argv.index(flag) + 1] = value
    else:
        argv += [flag, value]
    return argv
