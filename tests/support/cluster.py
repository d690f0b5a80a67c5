"""A whole loopback "cluster" for tests: the API emulator, the controllers fixture and the real
operator (`kompressor operator` as a subprocess, so it can be killed and restarted like a pod),
with helpers to create, edit and await CompressedModels by polling the API with a deadline."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import aiohttp

from kompressor.api import defaults as d

from .controllers import ClusterControllers, free_port
from .dicts import merge
from .emulator import ClusterEmulator, Emulator, write_kubeconfig

MODELS = f"/apis/{d.GROUP}/{d.VERSION}"
MERGE = {"Content-Type": "application/merge-patch+json"}


def die_with_parent() -> None:
    """In the child: get SIGTERM when the test process dies, so no operator outlives its test."""
    if sys.platform == "linux":
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def digits_model(name: str, namespace: str = "default", **spec_overrides: Any) -> dict:
    """A small, fast CompressedModel: the builtin digits MLP, no fine-tuning."""
    spec = {
        "model": {"uri": "builtin://digits-mlp"},
        "data": {"train": "builtin://digits?split=train", "eval": "builtin://digits?split=eval"},
        "compression": {"pruning": {"method": "unstructured", "sparsity": 0.5, "fineTuneEpochs": 0}},
        "gates": {"maxAccuracyDrop": 0.05},
        "jobs": {"backoffLimit": 1, "activeDeadlineSeconds": 300},
        "drift": {"enabled": False},
    }
    return {"apiVersion": d.API_VERSION, "kind": d.KIND, "metadata": {"name": name, "namespace": namespace},
            "spec": merge(spec, spec_overrides)}


class Cluster:
    def __init__(self, workdir: Path, cache: Path | None = None, run_controllers: bool = True):
        self.workdir = Path(workdir)
        self.pvc_root = self.workdir / "pvc"
        self.store_uri = "pvc://kompressor-artifacts/store"
        self.cache = cache
        self.run_controllers = run_controllers
        self.api: ClusterEmulator | None = None
        self.url = ""
        self.controllers: ClusterControllers | None = None
        self.operator: subprocess.Popen | None = None
        self.operator_starts = 0
        self._emulator = Emulator()
        self._session: aiohttp.ClientSession | None = None
        self.env: dict[str, str] = {}
        self.metrics_port = 0

    async def __aenter__(self) -> "Cluster":
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.api = await self._emulator.__aenter__()
        self.url = str(self.api.url).rstrip("/")
        kubeconfig = write_kubeconfig(self.workdir / "kubeconfig", self.url)
        self.env = {"KUBECONFIG": str(kubeconfig), "KOMPRESSOR_PVC_ROOT": str(self.pvc_root)}
        if self.cache:
            self.env["KOMPRESSOR_CACHE"] = str(self.cache)
        self._session = aiohttp.ClientSession()
        if self.run_controllers:
            self.controllers = await ClusterControllers(self.url, self.workdir, self.pvc_root, env=self.env).__aenter__()
        await self.start_operator()
        return self

    async def __aexit__(self, *exc) -> None:
        self.kill_operator(signal.SIGTERM)
        if self.controllers:
            await self.controllers.__aexit__(*exc)
        await self._session.close()
        await self._emulator.__aexit__(*exc)

    # --- the operator ---------------------------------------------------------------------

    async def start_operator(self) -> None:
        self.operator_starts += 1
        liveness = free_port()
        self.metrics_port = free_port()
        log = open(self.workdir / f"operator-{self.operator_starts}.log", "wb")
        self.operator = subprocess.Popen(
            [sys.executable, "-m", "kompressor.cli", "--json-logs", "operator", "-A", "--standalone",
             "--artifact-store", self.store_uri, "--metrics-port", str(self.metrics_port),
             "--liveness", f"http://127.0.0.1:{liveness}/healthz"],
            env={**os.environ, **self.env}, stdout=log, stderr=log, preexec_fn=die_with_parent)
        await self.wait(lambda: self._alive(liveness), timeout=60, what="operator liveness")

    async def _alive(self, port: int) -> bool:
        if self.operator.poll() is not None:
            raise RuntimeError(f"the operator exited with {self.operator.returncode}; see {self.workdir}")
        try:
            async with self._session.get(f"http://127.0.0.1:{port}/healthz") as resp:
                return resp.status == 200
        except aiohttp.ClientError:
            return False

    def kill_operator(self, sig: int = signal.SIGKILL) -> None:
        if self.operator and self.operator.poll() is None:
            self.operator.send_signal(sig)
            try:
                self.operator.wait(20)
            except subprocess.TimeoutExpired:
                self.operator.kill()
                self.operator.wait()

    async def metrics(self) -> str:
        """The operator's Prometheus exposition text."""
        async with self._session.get(f"http://127.0.0.1:{self.metrics_port}/metrics") as resp:
            return await resp.text()

    # --- API helpers ----------------------------------------------------------------------

    def model_path(self, namespace: str, name: str = "") -> str:
        return f"{self.url}{MODELS}/namespaces/{namespace}/{d.PLURAL}" + (f"/{name}" if name else "")

    async def create(self, body: dict) -> dict:
        meta = body["metadata"]
        async with self._session.post(self.model_path(meta["namespace"]), json=body) as resp:
            assert resp.status < 300, await resp.text()
            return await resp.json()

    async def patch(self, name: str, patch: dict, namespace: str = "default") -> dict:
        async with self._session.patch(self.model_path(namespace, name), json=patch, headers=MERGE) as resp:
            assert resp.status < 300, await resp.text()
            return await resp.json()

    async def delete(self, name: str, namespace: str = "default") -> None:
        async with self._session.delete(self.model_path(namespace, name)) as resp:
            assert resp.status < 300, await resp.text()

    def get(self, name: str, namespace: str = "default") -> dict | None:
        return self.api.get(f"{d.GROUP}/{d.VERSION}/{d.PLURAL}", namespace, name)

    def status(self, name: str, namespace: str = "default") -> dict:
        return (self.get(name, namespace) or {}).get("status") or {}

    def children(self, resource: str, name: str, namespace: str = "default") -> list[dict]:
        return [obj for obj in self.api.list(resource, namespace)
                if obj.get("metadata", {}).get("labels", {}).get("app.kubernetes.io/instance") == name]

    def jobs(self, name: str, namespace: str = "default") -> list[dict]:
        return self.children("batch/v1/jobs", name, namespace)

    def job_creations(self, name: str) -> list[str]:
        """Names of every Job ever POSTed for the model (duplicates included)."""
        return [body["metadata"]["name"] for plural, _, body in self.api.creations
                if plural == "jobs" and body["metadata"].get("labels", {}).get("app.kubernetes.io/instance") == name]

    def events(self, name: str, namespace: str = "default") -> list[dict]:
        return [e for e in self.api.list("v1/events", namespace) if e.get("involvedObject", {}).get("name") == name]

    async def wait(self, predicate: Callable[[], Any], timeout: float = 120, what: str = "condition") -> Any:
        """Poll ``predicate`` (sync or async) until truthy; fail after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if asyncio.iscoroutine(value):
                value = await value
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for {what}")
            await asyncio.sleep(0.1)

    async def wait_phase(self, name: str, *phases: str, timeout: float = 180, namespace: str = "default") -> dict:
        await self.wait(lambda: self.status(name, namespace).get("phase") in phases, timeout,
                        f"{namespace}/{name} to reach {phases} (now {self.status(name, namespace).get('phase')}: "
                        f"{self.status(name, namespace).get('message')})")
        return self.status(name, namespace)
