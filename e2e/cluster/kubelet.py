#!/usr/bin/env python3
"""A process kubelet for the local control plane (e2e/cluster): Nodes whose Pods are local processes.

It registers its Nodes (a CPU node and a GPU node by default: labels, taints, capacity and
allocatable, the Ready condition, a Lease in kube-node-lease renewed every 10 s), watches the Pods
the real scheduler binds to them, and runs each container as a local process. The real Job,
Deployment/ReplicaSet and garbage-collector controllers then do the rest.

How a container becomes a process (what differs from a container runtime, all here):

- Images are not pulled. The command is the container's ``command`` + ``args``; without a
  ``command``, the image's ENTRYPOINT/CMD from IMAGES (the Dockerfiles of this repository:
  ``kompressor-operator`` -> ``kompressor operator``, ``kompressor-jobs`` -> ``kompressor``), and the
  image's ENV. ``PATH`` starts with this Python's bin folder (the repository's venv), so
  ``kompressor`` and ``python`` are the venv's. The process does not inherit the kubelet's
  environment: it gets the Pod's env (value, fieldRef, resourceFieldRef, configMapKeyRef,
  secretKeyRef, envFrom, ``$(VAR)`` expansion), KUBERNETES_SERVICE_HOST/PORT (the apiserver's real
  address), HOSTNAME, and the kubelet's ``--pod-env`` defaults.
- Volumes are local folders under ``--state-dir``: emptyDir (per Pod), configMap, secret,
  downwardAPI and projected (ServiceAccount token from the TokenRequest API, refreshed; ca.crt;
  namespace) written as files; persistentVolumeClaim = the bound PV's hostPath (``--state-dir``/pvc/
  NAMESPACE/CLAIM for the claims this kubelet provisions); hostPath = the host path itself.
  Where the kubelet may (root: ``unshare --mount``), each container gets its own mount namespace with
  every volume bind-mounted at its real mountPath: paths are as in a container, nothing is rewritten
  (PROCESS_KUBELET_MOUNTS=rewrite forces the fallback). Otherwise (the fallback):
  each Pod has a root folder in which every mountPath is a symlink to its volume. A process cannot
  see that root as ``/``, so every argument, env value and workingDir that is an absolute path under
  a mountPath (or a parent folder of one, e.g. ``KOMPRESSOR_PVC_ROOT=/var/lib/kompressor/pvc``) is
  rewritten into the Pod's root. The ServiceAccount folder is found by the kubernetes client
  through podshim/sitecustomize.py (on the Pod's PYTHONPATH).
- Networking: each Pod gets its own local address as ``podIP``; podshim makes a wildcard bind
  (0.0.0.0) of a Python process land on it ($PROCESS_KUBELET_POD_IP). Probes (httpGet, tcpSocket,
  exec; startup, readiness, liveness) run against that address. The addresses are 10.244.B.N on the
  loopback device when the kubelet may add ``10.244.0.1/16`` to ``lo`` (root; ``--pod-cidr``), else
  127.0.B.N: the API server accepts a loopback podIP, but EndpointSlices refuse loopback addresses
  ("may not be in the loopback range"), so only the former gives Services real endpoints. B is this
  kubelet's own /24 block (PodAddresses): every kubelet on the machine shares the /16 on ``lo``, and
  each holds a lock on the block it took, so two clusters on one machine (a test session and
  ``up.sh``) never give two Pods one address. Service names resolve as a headless Service's do (there
  is neither cluster DNS nor kube-proxy): the kubelet keeps ``--state-dir``/dns/services.json, each
  ``svc.ns.svc`` -> its ready endpoint addresses from the EndpointSlices, and podshim answers
  getaddrinfo from it (``svc``, ``svc.ns``, ``svc.ns.svc[.cluster.local]``), so a Service is reached
  by name where its ``port`` is its ``targetPort`` (nothing remaps ports).
- Resource requests/limits, securityContext and readOnly are not enforced; a container's stdout
  and stderr go to ``--state-dir``/pods/NAMESPACE_NAME_UID/CONTAINER.log.
- The termination message: each run of a container gets a fresh, empty file for its
  ``terminationMessagePath``; when it exits, ``state.terminated.message`` is read from it as the real
  kubelet reads it (the last 4 KiB; with ``FallbackToLogsOnError`` and a non-zero exit, an empty file
  gives the last 80 lines, at most 2 KiB, of the run's log). A process cannot be given its own
  ``/dev`` here (creating the file in the host's would touch every process), so the path reaches it
  where it reaches it in argv or env: a value that is the terminationMessagePath (``--flag=PATH``
  too) names the run's file instead, in both modes.
- Lifecycle as the kubelet's: restartPolicy Always/OnFailure restarts with a back-off (1 s doubling,
  at most 10 s), Never reports ``terminated`` with the exit code (128+signal when killed) and the
  phase Succeeded or Failed. On deletion each container gets SIGTERM, then SIGKILL after the grace
  period; the kubelet then reports the terminal phase and deletes the Pod with grace 0 (a Job only
  completes once its Pods have finished terminating).
- Persistent volumes: the kubelet also provisions PVCs that nothing binds (the cluster has no
  storage provisioner): a hostPath PV per claim, pre-bound to it (``--no-provision`` turns it off).

Run: ``python e2e/cluster/kubelet.py --kubeconfig ADMIN --state-dir DIR [--node-kubeconfig NODE=PATH]
[--ready-file FILE]``. With a node kubeconfig (system:node:NODE, as the control plane writes them),
that Node's calls pass the real Node authorizer and NodeRestriction admission.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import datetime
import fcntl
import json
import logging
import math
import os
import re
import signal
import ssl
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Iterable
from urllib.parse import quote, urlparse

import aiohttp
import yaml

log = logging.getLogger("process-kubelet")

SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
SHIM_DIR = Path(__file__).resolve().parent / "podshim"
GPU_RESOURCE = "nvidia.com/gpu"
GPU_TAINT = {"key": GPU_RESOURCE, "value": "present", "effect": "NoSchedule"}
SMP = {"Content-Type": "application/strategic-merge-patch+json"}
MERGE = {"Content-Type": "application/merge-patch+json"}
BACKOFF_MAX = 10.0
# The termination message, as the kubelet reads it (kubelet/container: MaxContainerTerminationMessage*):
# at most 4 KiB of the file; with FallbackToLogsOnError, a failed container's empty file is replaced by
# the last 80 lines (at most 2 KiB) of its log.
TERMINATION_PATH = "/dev/termination-log"  # the API server's default terminationMessagePath
TERMINATION_MESSAGE_BYTES = 4096
TERMINATION_LOG_LINES, TERMINATION_LOG_BYTES = 80, 2048
STAGE = "/run/process-kubelet-stage"  # mount namespaces: where each volume is bound before its mountPath
SERVICE_NAME_LABEL = "kubernetes.io/service-name"  # an EndpointSlice's Service
_SCRATCH = ["PYTHONDONTWRITEBYTECODE", "PYTHONUNBUFFERED"]

# Image repository (last path segment, no tag/digest) -> ENTRYPOINT, CMD, ENV of its Dockerfile.
_KOMPRESSOR_ENV = {"PYTHONDONTWRITEBYTECODE": "1", "PYTHONUNBUFFERED": "1", "HOME": "/tmp",
                   "KOMPRESSOR_JSON_LOGS": "1"}
IMAGES: dict[str, dict] = {
    "kompressor-operator": {"entrypoint": ["kompressor", "operator"], "cmd": [], "env": _KOMPRESSOR_ENV,
                            "workdir": "/"},
    "kompressor-jobs": {"entrypoint": ["kompressor"], "cmd": ["--help"],
                        "env": {**_KOMPRESSOR_ENV, "KOMPRESSOR_CACHE": "/tmp/kompressor-cache"}, "workdir": "/tmp"},
}


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def micro_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


_SUFFIXES = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
             "n": 1e-9, "u": 1e-6, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18}


def _mount_namespaces() -> bool:
    """Whether this kubelet may give each container a mount namespace (root, or a capable sandbox)."""
    if os.environ.get("PROCESS_KUBELET_MOUNTS", "auto") == "rewrite":
        return False
    try:
        probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "--", "/bin/sh", "-c",
                                "mount --bind / /mnt 2>/dev/null || mount -t tmpfs none /mnt"],
                               capture_output=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return probe.returncode == 0


MOUNT_NAMESPACES = False  # decided in main(): see _mount_namespaces


def parse_quantity(value: Any) -> float:
    """A Kubernetes quantity ("250m", "2Gi", "1e3", 4) as a number."""
    text = str(value).strip()
    for suffix in sorted(_SUFFIXES, key=len, reverse=True):
        if text.endswith(suffix) and text[:-len(suffix)]:
            return float(text[:-len(suffix)]) * _SUFFIXES[suffix]
    return float(text)


def image_repository(image: str) -> str:
    """``ghcr.io/kompressor/kompressor-jobs:0.3.0@sha256:..`` -> ``kompressor-jobs``."""
    name = image.split("@", 1)[0].rsplit("/", 1)[-1]
    return name.split(":", 1)[0]


def image_config(image: str) -> dict:
    return IMAGES.get(image_repository(image), {"entrypoint": [], "cmd": [], "env": {}, "workdir": "/"})


def container_argv(container: dict) -> list[str]:
    """The process's argv, as a container runtime computes it from the image and the container."""
    img = image_config(container.get("image", ""))
    command, args = container.get("command"), container.get("args")
    if command:
        return list(command) + list(args or [])
    return list(img["entrypoint"]) + list(args if args is not None else img["cmd"])


_VAR = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)|\$\$")


def expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion: known variables are replaced, $$ escapes, unknown stay as is."""
    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))
    return _VAR.sub(sub, value)


# --- the Pod's file system view ----------------------------------------------------------------


# What stands for the image: this interpreter's environment and the repository (the venv's editable
# install points into it). A volume mounted over a folder that holds them (an emptyDir at /tmp, with the
# checkout under /tmp) would hide the container's own program, so they are bound back over it.
IMAGE_PATHS = tuple(dict.fromkeys(Path(p).resolve() for p in (sys.prefix, sys.base_prefix, Path(__file__).parents[2])))


def _image_binds(mounts: list[tuple[str, Path]]) -> list[tuple[str, Path]]:
    """(path, path) binds, after the volume mounts, for each image path a mountPath would hide."""
    targets = [Path(target) for target, _ in mounts]
    hidden = [path for path in IMAGE_PATHS if any(path == t or t in path.parents for t in targets)]
    return [(str(path), path) for path in sorted(hidden, key=lambda p: len(p.parts))]  # parents first




class PodRoot:
    """A folder standing for the container's ``/``: every mountPath in it is a symlink to its volume;
    absolute paths under (or above) a mountPath are rewritten into it."""

    def __init__(self, root: Path, mounts: dict[str, Path]):
        self.root = root
        self.mounts = {p.rstrip("/") or "/": Path(v) for p, v in mounts.items()}
        for mount_path, local in sorted(self.mounts.items()):
            link = root / mount_path.lstrip("/")
            link.parent.mkdir(parents=True, exist_ok=True)
            if link.is_symlink() or link.exists():
                if link.is_symlink() and Path(os.readlink(link)) == local:
                    continue
                if link.is_symlink():
                    link.unlink()
                else:
                    continue  # a parent of another mount made it a folder; keep the first
            link.symlink_to(local, target_is_directory=local.is_dir())

    def covers(self, path: str) -> bool:
        path = path.rstrip("/") or "/"
        if path == "/":
            return False
        for mount_path in self.mounts:
            if path == mount_path or path.startswith(mount_path + "/") or mount_path.startswith(path + "/"):
                return True
        return False

    def map_path(self, path: str) -> str:
        return str(self.root) + path if path.startswith("/") and self.covers(path) else path

    def map_value(self, value: str) -> str:
        """An argument or env value: a path, or ``--flag=path``."""
        if value.startswith("/"):
            return self.map_path(value)
        if "=" in value:
            head, tail = value.split("=", 1)
            if tail.startswith("/") and self.covers(tail):
                return f"{head}={self.map_path(tail)}"
        return value


# --- the API -------------------------------------------------------------------------------------


class ApiError(Exception):
    def __init__(self, status: int, text: str):
        self.status = status
        super().__init__(f"HTTP {status}: {text[:400]}")


class Api:
    """A small aiohttp client for one kubeconfig (client certificate or token)."""

    def __init__(self, kubeconfig: str | Path, scratch: Path):
        doc = yaml.safe_load(Path(kubeconfig).read_text())
        ctx_name = doc.get("current-context") or doc["contexts"][0]["name"]
        ctx = next(c["context"] for c in doc["contexts"] if c["name"] == ctx_name)
        cluster = next(c["cluster"] for c in doc["clusters"] if c["name"] == ctx["cluster"])
        user = next((u["user"] for u in doc.get("users", []) if u["name"] == ctx.get("user")), {})
        base = Path(kubeconfig).resolve().parent
        scratch.mkdir(parents=True, exist_ok=True)

        def file_of(data_key: str, file_key: str, holder: dict) -> str | None:
            if holder.get(data_key):
                fd, name = tempfile.mkstemp(dir=scratch, suffix=".pem")
                with os.fdopen(fd, "wb") as fh:
                    fh.write(base64.b64decode(holder[data_key]))
                return name
            if holder.get(file_key):
                return str((base / holder[file_key]).resolve())
            return None

        self.server = cluster["server"].rstrip("/")
        self.ca_file = file_of("certificate-authority-data", "certificate-authority", cluster)
        cert = file_of("client-certificate-data", "client-certificate", user)
        key = file_of("client-key-data", "client-key", user)
        self.headers = {"Accept": "application/json"}
        if user.get("token"):
            self.headers["Authorization"] = f"Bearer {user['token']}"
        self._ssl: Any = None
        if self.server.startswith("https"):
            if cluster.get("insecure-skip-tls-verify"):
                self._ssl = False
            else:
                self._ssl = ssl.create_default_context(cafile=self.ca_file)
            if cert and key:
                if self._ssl is False:
                    self._ssl = ssl.create_default_context()
                    self._ssl.check_hostname = False
                    self._ssl.verify_mode = ssl.CERT_NONE
                self._ssl.load_cert_chain(cert, key)
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=self._ssl, limit=64),
                                                  timeout=aiohttp.ClientTimeout(total=30))
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def request(self, method: str, path: str, body: Any = None, headers: dict | None = None,
                      params: dict | None = None) -> Any:
        async with self.session.request(method, self.server + path, json=body, params=params,
                                        headers={**self.headers, **(headers or {})}) as resp:
            text = await resp.text()
            if resp.status >= 400:
                raise ApiError(resp.status, text)
            return json.loads(text) if text else None

    async def get(self, path: str, **params) -> Any:
        return await self.request("GET", path, params=params or None)

    async def get_or_none(self, path: str) -> Any:
        try:
            return await self.get(path)
        except ApiError as err:
            if err.status == 404:
                return None
            raise

    async def watch(self, path: str, params: dict) -> AsyncIterator[dict]:
        params = {**params, "watch": "true", "allowWatchBookmarks": "true", "timeoutSeconds": "240"}
        timeout = aiohttp.ClientTimeout(total=None, sock_read=300)
        async with self.session.get(self.server + path, params=params, headers=self.headers,
                                    timeout=timeout) as resp:
            if resp.status >= 400:
                raise ApiError(resp.status, await resp.text())
            async for line in resp.content:
                if line.strip():
                    yield json.loads(line)


class Expired(Exception):
    """The watch's resourceVersion is too old (410): list again."""


# --- Pods ---------------------------------------------------------------------------------------


@dataclass
class ContainerState:
    name: str
    spec: dict
    restarts: int = 0
    state: dict = field(default_factory=lambda: {"waiting": {"reason": "ContainerCreating"}})
    last_state: dict = field(default_factory=dict)
    ready: bool = False
    started: bool = False
    proc: asyncio.subprocess.Process | None = None
    done: bool = False  # no restart will follow
    termination: Path | None = None  # this run's termination message file
    log_offset: int = 0  # where this run's output starts in the container's log


class PodWorker:
    """Runs one Pod: volumes, containers (restarts, probes), status, deletion."""

    def __init__(self, kubelet: "Kubelet", node: "Node", pod: dict):
        self.kubelet, self.node, self.pod = kubelet, node, pod
        meta = pod["metadata"]
        self.uid, self.namespace, self.name = meta["uid"], meta["namespace"], meta["name"]
        self.path = f"/api/v1/namespaces/{self.namespace}/pods/{self.name}"
        self.dir = kubelet.state_dir / "pods" / f"{self.namespace}_{self.name}_{self.uid[:8]}"
        self.ip = ""
        self.ran = False  # this worker started (or tried to start) the containers: it owns the status
        self.halting = False  # the kubelet stops: no restarts, and the Pod is left as it is
        spec = pod["spec"]
        self.restart_policy = spec.get("restartPolicy", "Always")
        self.containers = [ContainerState(c["name"], c) for c in spec.get("containers", [])]
        self.init_done = not spec.get("initContainers")
        self.started_at = now()
        self.deleting = asyncio.Event()
        self.gone = False  # the Pod object no longer exists
        self.root: PodRoot | None = None
        self.env_base: dict[str, str] = {}
        self.message = ""
        self.reason = ""
        self._dirty = asyncio.Event()
        self._tasks: list[asyncio.Task] = []  # token refreshes
        self._runs: list[asyncio.Task] = []  # one per container
        self.task = asyncio.create_task(self.run())

    # -- entry points from the watch --

    def update(self, pod: dict) -> None:
        self.pod = pod
        if pod["metadata"].get("deletionTimestamp"):
            self.deleting.set()

    def vanished(self) -> None:
        self.gone = True
        self.deleting.set()

    # -- the life of the Pod --

    async def run(self) -> None:
        status_task = asyncio.create_task(self._status_loop())
        try:
            if not self.deleting.is_set() and self.pod.get("status", {}).get("phase") not in ("Succeeded", "Failed"):
                self.ran = True
                self.ip = self.kubelet.allocate_ip(self.uid)
                self.mark()
                prepared = False
                while not prepared and not self.deleting.is_set():
                    try:
                        await self._prepare()
                        prepared = True
                    except Exception as err:  # noqa: BLE001 - reported on the Pod and retried, as a kubelet does
                        log.warning("pod %s/%s: cannot start: %s", self.namespace, self.name, err)
                        for c in self.containers:
                            c.state = {"waiting": {"reason": "CreateContainerConfigError", "message": str(err)[:500]}}
                        self.mark()
                        with contextlib.suppress(asyncio.TimeoutError):
                            await asyncio.wait_for(self.deleting.wait(), 2)
                if prepared:
                    runs = [asyncio.create_task(self._run_container(c)) for c in self.containers]
                    self._runs = runs
                    deleting = asyncio.create_task(self.deleting.wait())
                    await asyncio.wait([deleting, asyncio.gather(*runs)], return_when=asyncio.FIRST_COMPLETED)
                    if self.deleting.is_set():
                        await self._stop_all(self._grace())
                    deleting.cancel()
                    await asyncio.gather(*runs, return_exceptions=True)
                self.kubelet.release_ip(self.uid)  # the sandbox is gone; status keeps the address
                self.mark()
            await self.deleting.wait()
            await self._stop_all(self._grace())
            status_task.cancel()
            await asyncio.gather(status_task, return_exceptions=True)
            if self.ran:
                await self._send_status(None)
            if not self.gone:
                with contextlib.suppress(ApiError):
                    await self.node.api.request("DELETE", self.path, body={
                        "apiVersion": "v1", "kind": "DeleteOptions", "gracePeriodSeconds": 0,
                        "preconditions": {"uid": self.uid}})
        finally:
            for task in [*self._tasks, *self._runs]:
                task.cancel()
            status_task.cancel()
            await asyncio.gather(status_task, *self._tasks, *self._runs, return_exceptions=True)
            await self._kill_all()
            self.kubelet.release_ip(self.uid)

    def _grace(self) -> float:
        grace = self.pod["metadata"].get("deletionGracePeriodSeconds")
        if grace is None:
            grace = self.pod["spec"].get("terminationGracePeriodSeconds", 30)
        return float(grace)

    async def _prepare(self) -> None:
        spec, meta = self.pod["spec"], self.pod["metadata"]
        volumes = {}
        for volume in spec.get("volumes", []):
            volumes[volume["name"]] = await self._volume(volume)
        self.volumes = volumes
        self.dir.mkdir(parents=True, exist_ok=True)
        api = self.kubelet.api_server
        self.env_base = {
            "PATH": f"{Path(sys.executable).parent}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOSTNAME": meta["name"],
            "KUBERNETES_SERVICE_HOST": api.hostname, "KUBERNETES_SERVICE_PORT": str(api.port),
            "KUBERNETES_SERVICE_PORT_HTTPS": str(api.port),
            "KUBERNETES_PORT": f"tcp://{api.hostname}:{api.port}",
        }
        if not spec.get("initContainers"):
            return
        for init in spec["initContainers"]:
            state = ContainerState(init["name"], init)
            while True:
                code = await self._exec_container(state)
                if code == 0:
                    break
                if self.restart_policy == "Never" or self.deleting.is_set():
                    raise RuntimeError(f"init container {init['name']} exited with {code}")
                await asyncio.sleep(1)
        self.init_done = True

    async def _volume(self, volume: dict) -> Path:
        name = volume["name"]
        local = self.dir / "volumes" / name
        api = self.node.api
        ns = self.namespace
        if "emptyDir" in volume:
            local.mkdir(parents=True, exist_ok=True)
        elif "hostPath" in volume:
            local = Path(volume["hostPath"]["path"])
            if volume["hostPath"].get("type") in ("DirectoryOrCreate", None, ""):
                local.mkdir(parents=True, exist_ok=True)
        elif "persistentVolumeClaim" in volume:
            claim = volume["persistentVolumeClaim"]["claimName"]
            local = await self.kubelet.claim_path(ns, claim)
        elif "configMap" in volume or "secret" in volume or "downwardAPI" in volume or "projected" in volume:
            local.mkdir(parents=True, exist_ok=True)
            sources = volume["projected"]["sources"] if "projected" in volume else [volume]
            for source in sources:
                await self._write_source(source, local, api)
        else:
            raise RuntimeError(f"volume {name}: this kubelet does not support {sorted(set(volume) - {'name'})}")
        return local

    async def _write_source(self, source: dict, folder: Path, api: Api) -> None:
        ns = self.namespace
        if "configMap" in source or "secret" in source:
            kind = "configMap" if "configMap" in source else "secret"
            ref = source[kind]
            obj_name = ref.get("name") or ref.get("secretName")
            plural = "configmaps" if kind == "configMap" else "secrets"
            obj = await api.get_or_none(f"/api/v1/namespaces/{ns}/{plural}/{obj_name}")
            if obj is None and obj_name == "kube-root-ca.crt" and self.kubelet.api_server.ca_file:
                obj = {"data": {"ca.crt": Path(self.kubelet.api_server.ca_file).read_text()}}
            if obj is None:
                if ref.get("optional"):
                    return
                raise RuntimeError(f"{kind} {ns}/{obj_name} not found")
            data: dict[str, bytes] = {}
            for key, value in (obj.get("data") or {}).items():
                data[key] = base64.b64decode(value) if kind == "secret" else value.encode()
            for key, value in (obj.get("binaryData") or {}).items():
                data[key] = base64.b64decode(value)
            items = ref.get("items") or [{"key": k, "path": k} for k in data]
            for item in items:
                if item["key"] not in data:
                    if ref.get("optional"):
                        continue
                    raise RuntimeError(f"{kind} {ns}/{obj_name} has no key {item['key']}")
                _write(folder / item["path"], data[item["key"]])
        elif "downwardAPI" in source:
            for item in source["downwardAPI"].get("items", []):
                if "fieldRef" in item:
                    value = self._field(item["fieldRef"]["fieldPath"])
                else:
                    value = self._resource_field(item["resourceFieldRef"])
                _write(folder / item["path"], value.encode())
        elif "serviceAccountToken" in source:
            token_source = source["serviceAccountToken"]
            path = folder / token_source.get("path", "token")
            await self._write_token(token_source, path)
            self._tasks.append(asyncio.create_task(self._refresh_token(token_source, path)))

    async def _write_token(self, source: dict, path: Path) -> float:
        account = self.pod["spec"].get("serviceAccountName") or "default"
        body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                "spec": {"audiences": [source["audience"]] if source.get("audience") else [],
                         "expirationSeconds": int(source.get("expirationSeconds", 3607)),
                         "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": self.name, "uid": self.uid}}}
        out = await self.node.api.request(
            "POST", f"/api/v1/namespaces/{self.namespace}/serviceaccounts/{account}/token", body=body)
        _write(path, out["status"]["token"].encode())
        return float(source.get("expirationSeconds", 3607))

    async def _refresh_token(self, source: dict, path: Path) -> None:
        lifetime = float(source.get("expirationSeconds", 3607))
        while True:  # as the kubelet: at 80 % of the token's lifetime
            await asyncio.sleep(lifetime * 0.8)
            with contextlib.suppress(ApiError, aiohttp.ClientError, asyncio.TimeoutError, OSError):
                await self._write_token(source, path)

    def _field(self, path: str) -> str:
        meta, spec = self.pod["metadata"], self.pod["spec"]
        m = re.fullmatch(r"metadata\.(labels|annotations)\['([^']+)'\]", path)
        if m:
            return (meta.get(m.group(1)) or {}).get(m.group(2), "")
        if path in ("metadata.labels", "metadata.annotations"):
            items = meta.get(path.split(".")[1]) or {}
            return "\n".join(f'{k}="{v}"' for k, v in sorted(items.items()))
        values = {
            "metadata.name": meta["name"], "metadata.namespace": meta["namespace"], "metadata.uid": meta["uid"],
            "spec.nodeName": spec.get("nodeName", ""), "spec.serviceAccountName": spec.get("serviceAccountName", ""),
            "status.podIP": self.ip, "status.podIPs": self.ip, "status.hostIP": "127.0.0.1",
            "status.hostIPs": "127.0.0.1",
        }
        if path not in values:
            raise RuntimeError(f"fieldRef {path} is not supported")
        return values[path]

    def _resource_field(self, ref: dict, container: dict | None = None) -> str:
        if container is None:
            name = ref.get("containerName")
            container = next((c for c in self.pod["spec"]["containers"] if c["name"] == name),
                             self.pod["spec"]["containers"][0])
        kind, _, resource = ref["resource"].partition(".")
        value = ((container.get("resources") or {}).get(kind) or {}).get(resource)
        if value is None:  # unset limits: the node's allocatable
            value = self.node.allocatable.get(resource, "0")
        divisor = parse_quantity(ref.get("divisor") or "1") or 1.0  # the API server defaults it to "0": 1
        return str(math.ceil(parse_quantity(value) / divisor))  # as the kubelet: rounded up, in divisor units

    async def _env(self, container: dict) -> dict[str, str]:
        api, ns = self.node.api, self.namespace
        img = image_config(container.get("image", ""))
        env = {**self.kubelet.pod_env, **img["env"], **self.env_base}
        for source in container.get("envFrom", []):
            prefix = source.get("prefix", "")
            for kind, plural in (("configMapRef", "configmaps"), ("secretRef", "secrets")):
                if kind in source:
                    obj = await api.get_or_none(f"/api/v1/namespaces/{ns}/{plural}/{source[kind]['name']}")
                    if obj is None:
                        if source[kind].get("optional"):
                            continue
                        raise RuntimeError(f"{kind} {source[kind]['name']} not found")
                    for key, value in (obj.get("data") or {}).items():
                        env[prefix + key] = base64.b64decode(value).decode() if plural == "secrets" else value
        for item in container.get("env", []):
            if "valueFrom" not in item:
                env[item["name"]] = expand(item.get("value", ""), env)
                continue
            source = item["valueFrom"]
            if "fieldRef" in source:
                env[item["name"]] = self._field(source["fieldRef"]["fieldPath"])
            elif "resourceFieldRef" in source:
                env[item["name"]] = self._resource_field(source["resourceFieldRef"], container)
            else:
                kind, plural = (("configMapKeyRef", "configmaps") if "configMapKeyRef" in source
                                else ("secretKeyRef", "secrets"))
                ref = source[kind]
                obj = await api.get_or_none(f"/api/v1/namespaces/{ns}/{plural}/{ref['name']}")
                data = (obj or {}).get("data") or {}
                if ref["key"] not in data:
                    if ref.get("optional"):
                        continue
                    raise RuntimeError(f"{kind} {ref['name']}/{ref['key']} not found")
                value = data[ref["key"]]
                env[item["name"]] = base64.b64decode(value).decode() if plural == "secrets" else value
        return env

    def _mounts(self, container: dict) -> list[tuple[str, Path]]:
        out = []
        for mount in container.get("volumeMounts", []):
            local = self.volumes[mount["name"]]
            if mount.get("subPath"):
                local = local / mount["subPath"]
                local.mkdir(parents=True, exist_ok=True)
            out.append((mount["mountPath"].rstrip("/") or "/", local))
        return sorted(out, key=lambda m: len(m[0]))  # parents first

    def _root(self, container: dict) -> PodRoot:
        mounts: dict[str, Path] = {}
        for mount in container.get("volumeMounts", []):
            local = self.volumes[mount["name"]]
            if mount.get("subPath"):
                local = local / mount["subPath"]
                local.mkdir(parents=True, exist_ok=True)
            mounts[mount["mountPath"]] = local
        root = self.dir / "root" / container["name"]
        root.mkdir(parents=True, exist_ok=True)
        return PodRoot(root, mounts)

    async def _spawn(self, c: ContainerState, argv: list[str] | None = None) -> asyncio.subprocess.Process:
        spec = c.spec
        env = await self._env(spec)
        argv = argv if argv is not None else container_argv(spec)
        argv = [expand(a, env) for a in argv]
        if not argv:
            raise RuntimeError(f"container {c.name}: no command and image {spec.get('image')!r} is unknown")
        workdir = spec.get("workingDir") or image_config(spec.get("image", ""))["workdir"]
        env["PYTHONPATH"] = os.pathsep.join([str(SHIM_DIR), *filter(None, [env.get("PYTHONPATH")])])
        env["PROCESS_KUBELET_POD_IP"] = self.ip
        env["PROCESS_KUBELET_POD_NAMESPACE"] = self.namespace
        dns_file = self.kubelet.dns_file
        if MOUNT_NAMESPACES:
            # Real mounts at the real paths, in a mount namespace of the process's own: no rewriting.
            mounts = self._mounts(spec) + _image_binds(self._mounts(spec))
            # Every source is first bound under a staging folder, so that mounting a target (e.g. /tmp)
            # cannot hide a source that lives below it (the kubelet's state dir may be under /tmp).
            if c.termination is not None:  # its folder at a path no volume can hide (a volume at /tmp, say)
                mounts.append((f"{STAGE}/termination", c.termination.parent))
            mounts.append((f"{STAGE}/dns", dns_file.parent))  # the same (a folder: os.replace shows through)
            dns = f"{STAGE}/dns/{dns_file.name}"
            n, stage = len(mounts), STAGE
            # ${N}, not $N: sh reads "$10" as "$1" followed by "0"
            script = "".join(f'mkdir -p {stage}/{i} && mount --bind "${{{i + 1 + n}}}" {stage}/{i} && ' for i in range(n))
            script += "".join(f'mkdir -p "${{{i + 1}}}" && mount --bind {stage}/{i} "${{{i + 1}}}" && ' for i in range(n))
            script += f'cd "${{{2 * len(mounts) + 1}}}" && shift {2 * len(mounts) + 1} && exec "$@"'
            argv = ["unshare", "--mount", "--propagation", "private", "--", "/bin/sh", "-c", script, "sh",
                    *[m for m, _ in mounts], *[str(local) for _, local in mounts], workdir, *argv]
            cwd = str(self.dir)
            termination = f"{STAGE}/termination/{c.termination.name}" if c.termination else None
        else:
            root = self._root(spec)
            argv = [root.map_value(a) for a in argv]
            env = {k: root.map_value(v) for k, v in env.items()}
            env["PROCESS_KUBELET_POD_ROOT"] = str(root.root)
            if "TMPDIR" not in env and root.covers("/tmp"):
                env["TMPDIR"] = root.map_path("/tmp")  # what the container's tempfile module would use
            cwd = root.map_path(workdir) if workdir != "/" else str(root.root)
            Path(cwd).mkdir(parents=True, exist_ok=True)
            termination = str(c.termination) if c.termination else None
            dns = str(dns_file)  # set after the rewriting: it is a host path
        env["PROCESS_KUBELET_DNS_FILE"] = dns
        if termination:
            path = spec.get("terminationMessagePath") or TERMINATION_PATH
            argv = [_name_file(a, path, termination) for a in argv]
            env = {k: _name_file(v, path, termination) for k, v in env.items()}
        log_path = self.dir / f"{c.name}.log"
        with open(log_path, "ab") as log_file:
            return await asyncio.create_subprocess_exec(
                *argv, env=env, cwd=cwd, stdout=log_file, stderr=asyncio.subprocess.STDOUT, stdin=asyncio.subprocess.DEVNULL,
                start_new_session=True, preexec_fn=_die_with_parent)

    def _new_run(self, c: ContainerState) -> None:
        """A fresh termination message file for the container's next run; its log's end."""
        folder = self.dir / "termination" / c.name
        folder.mkdir(parents=True, exist_ok=True)
        c.termination = folder / f"run-{c.restarts}"
        c.termination.write_bytes(b"")
        os.chmod(c.termination, 0o666)  # the container's user may be another (securityContext)
        log_path = self.dir / f"{c.name}.log"
        c.log_offset = log_path.stat().st_size if log_path.exists() else 0

    def _termination_message(self, c: ContainerState, code: int) -> str:
        """What the kubelet puts into state.terminated.message (kuberuntime's getTerminationMessage)."""
        if c.termination is None:
            return ""
        with contextlib.suppress(OSError):
            data = c.termination.read_bytes()[-TERMINATION_MESSAGE_BYTES:]
            if data:
                return data.decode(errors="replace")
        if c.spec.get("terminationMessagePolicy") != "FallbackToLogsOnError" or code == 0:
            return ""
        try:
            with open(self.dir / f"{c.name}.log", "rb") as fh:
                fh.seek(c.log_offset)
                output = fh.read()
        except OSError:
            return ""
        lines = output.splitlines(keepends=True)[-TERMINATION_LOG_LINES:]
        return b"".join(lines)[-TERMINATION_LOG_BYTES:].decode(errors="replace")

    async def _exec_container(self, c: ContainerState) -> int:
        self._new_run(c)
        try:
            proc = await self._spawn(c)
        except (OSError, RuntimeError) as err:
            log.warning("pod %s/%s container %s: %s", self.namespace, self.name, c.name, err)
            c.state = {"terminated": {"exitCode": 128, "reason": "StartError", "message": str(err)[:500],
                                      "startedAt": now(), "finishedAt": now()}}
            return 128
        c.proc = proc
        return _exit_code(await proc.wait())

    async def _run_container(self, c: ContainerState) -> None:
        backoff = 1.0
        while not self.deleting.is_set():
            c.ready, c.started = False, False
            started = now()
            self._new_run(c)
            try:
                c.proc = await self._spawn(c)
            except Exception as err:  # noqa: BLE001 - a container that cannot start is reported, never fatal
                log.warning("pod %s/%s container %s: %s", self.namespace, self.name, c.name, err)
                c.proc = None
                c.state = {"terminated": {"exitCode": 128, "reason": "StartError", "message": str(err)[:500],
                                          "startedAt": started, "finishedAt": now()}}
                code = 128
            else:
                c.state = {"running": {"startedAt": started}}
                c.started = not c.spec.get("startupProbe")
                c.ready = c.started and not c.spec.get("readinessProbe")
                self.mark()
                probes = asyncio.create_task(self._probe(c))
                code = _exit_code(await c.proc.wait())
                probes.cancel()
                await asyncio.gather(probes, return_exceptions=True)
                c.state = {"terminated": {"exitCode": code, "reason": "Completed" if code == 0 else "Error",
                                          "startedAt": started, "finishedAt": now()}}
                message = self._termination_message(c, code)
                if message:
                    c.state["terminated"]["message"] = message
            c.ready, c.started = False, False
            restart = not self.deleting.is_set() and not self.halting and (
                self.restart_policy == "Always" or (self.restart_policy == "OnFailure" and code != 0))
            if not restart:
                c.done = True
                self.mark()
                return
            c.last_state, c.restarts = {"terminated": c.state["terminated"]}, c.restarts + 1
            c.state = {"waiting": {"reason": "CrashLoopBackOff",
                                   "message": f"back-off {backoff:g}s restarting failed container={c.name}"}}
            self.mark()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.deleting.wait(), backoff)
            backoff = min(backoff * 2, BACKOFF_MAX)
        c.done = True
        self.mark()

    # -- probes --

    async def _probe(self, c: ContainerState) -> None:
        spec = c.spec
        if spec.get("startupProbe"):
            if not await self._probe_loop(c, spec["startupProbe"], "startup"):
                return
            c.started = True
            c.ready = not spec.get("readinessProbe")
            self.mark()
        tasks = []
        if spec.get("readinessProbe"):
            tasks.append(asyncio.create_task(self._probe_loop(c, spec["readinessProbe"], "readiness")))
        if spec.get("livenessProbe"):
            tasks.append(asyncio.create_task(self._probe_loop(c, spec["livenessProbe"], "liveness")))
        try:
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()

    async def _probe_loop(self, c: ContainerState, probe: dict, kind: str) -> bool:
        """startup: returns True once it succeeds; readiness: sets c.ready forever; liveness: kills on failure."""
        period = float(probe.get("periodSeconds", 10))
        failures_allowed = int(probe.get("failureThreshold", 3))
        successes_needed = int(probe.get("successThreshold", 1))
        await asyncio.sleep(float(probe.get("initialDelaySeconds", 0)))
        failures = successes = 0
        while True:
            ok = await self._probe_once(c, probe)
            if ok:
                failures, successes = 0, successes + 1
            else:
                failures, successes = failures + 1, 0
            if kind == "startup":
                if ok:
                    return True
                if failures >= failures_allowed:
                    log.info("pod %s/%s container %s: startup probe failed, killing", self.namespace, self.name, c.name)
                    await self._stop(c, float(self.pod["spec"].get("terminationGracePeriodSeconds", 30)))
                    return False
            elif kind == "readiness":
                ready = c.ready
                if ok and successes >= successes_needed:
                    ready = True
                elif not ok and failures >= failures_allowed:
                    ready = False
                if ready != c.ready:
                    c.ready = ready
                    self.mark()
            elif not ok and failures >= failures_allowed:  # liveness
                log.info("pod %s/%s container %s: liveness probe failed, killing", self.namespace, self.name, c.name)
                await self._stop(c, float(self.pod["spec"].get("terminationGracePeriodSeconds", 30)))
                return False
            await asyncio.sleep(period)

    async def _probe_once(self, c: ContainerState, probe: dict) -> bool:
        timeout = float(probe.get("timeoutSeconds", 1))
        try:
            if "httpGet" in probe:
                get = probe["httpGet"]
                port = _port(get["port"], c.spec)
                host = get.get("host") or self.ip
                url = f"{get.get('scheme', 'HTTP').lower()}://{host}:{port}{get.get('path', '/')}"
                headers = {h["name"]: h["value"] for h in get.get("httpHeaders", [])}
                async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session:
                    async with session.get(url, headers=headers, ssl=False, allow_redirects=False) as resp:
                        return 200 <= resp.status < 400
            if "tcpSocket" in probe:
                port = _port(probe["tcpSocket"]["port"], c.spec)
                _, writer = await asyncio.wait_for(
                    asyncio.open_connection(probe["tcpSocket"].get("host") or self.ip, port), timeout)
                writer.close()
                return True
            if "exec" in probe:
                proc = await self._spawn(c, list(probe["exec"]["command"]))
                try:
                    return await asyncio.wait_for(proc.wait(), timeout) == 0
                finally:
                    if proc.returncode is None:
                        _signal_group(proc, signal.SIGKILL)
                        await proc.wait()
        except (OSError, aiohttp.ClientError, asyncio.TimeoutError, RuntimeError):
            return False
        return False  # grpc probes are not supported

    # -- stopping --

    async def _stop(self, c: ContainerState, grace: float) -> None:
        proc = c.proc
        if proc is None or proc.returncode is not None:
            return
        _signal_group(proc, signal.SIGTERM)
        try:
            await asyncio.wait_for(asyncio.shield(proc.wait()), max(grace, 0.0))
        except asyncio.TimeoutError:
            _signal_group(proc, signal.SIGKILL)
            await proc.wait()

    async def _stop_all(self, grace: float) -> None:
        await asyncio.gather(*(self._stop(c, grace) for c in self.containers), return_exceptions=True)
        await asyncio.gather(*self._runs, return_exceptions=True)

    async def _kill_all(self) -> None:
        for c in self.containers:
            if c.proc is not None and c.proc.returncode is None:
                _signal_group(c.proc, signal.SIGKILL)
                with contextlib.suppress(Exception):
                    await c.proc.wait()

    # -- status --

    def mark(self) -> None:
        self._dirty.set()

    def phase(self) -> str:
        if not all(c.done for c in self.containers) or not self.containers:
            started = any("waiting" not in c.state or c.restarts for c in self.containers)
            return "Running" if started else "Pending"
        codes = [c.state.get("terminated", {}).get("exitCode", 1) for c in self.containers]
        return "Succeeded" if all(code == 0 for code in codes) else "Failed"

    def status(self) -> dict:
        phase = self.phase()
        ready = phase == "Running" and all(c.ready for c in self.containers)
        t = now()

        def cond(kind: str, value: bool, reason: str | None = None) -> dict:
            out = {"type": kind, "status": "True" if value else "False", "lastProbeTime": None,
                   "lastTransitionTime": t}
            if reason and not value:
                out["reason"] = reason
            return out

        statuses = []
        for c in self.containers:
            image = c.spec.get("image", "")
            statuses.append({
                "name": c.name, "image": image, "imageID": f"process://{image}", "ready": c.ready,
                "started": bool("running" in c.state and c.started), "restartCount": c.restarts,
                "state": c.state, "lastState": c.last_state,
                "containerID": f"process://{c.proc.pid}" if c.proc else None,
            })
        status = {
            "phase": phase, "hostIP": "127.0.0.1", "hostIPs": [{"ip": "127.0.0.1"}], "startTime": self.started_at,
            "conditions": [
                cond("PodReadyToStartContainers", True), cond("Initialized", self.init_done),
                cond("ContainersReady", ready, "ContainersNotReady"), cond("Ready", ready, "ContainersNotReady"),
                cond("PodScheduled", True),
            ],
            "containerStatuses": statuses,
        }
        if phase != "Pending" or any(c.proc for c in self.containers):
            status["podIP"] = self.ip
            status["podIPs"] = [{"ip": self.ip}]
        return status

    async def _status_loop(self) -> None:
        last: Any = None
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            last = await self._send_status(last)

    async def _send_status(self, last: Any) -> Any:
        status = self.status()
        key = json.dumps({k: v for k, v in status.items() if k != "conditions"}, sort_keys=True) + \
            json.dumps([(c["type"], c["status"]) for c in status["conditions"]])
        if key == last or self.gone:
            return last
        for attempt in range(20):
            try:
                await self.node.api.request("PATCH", self.path + "/status", body={"status": _changed_conditions(
                    status, self.pod.get("status") or {})}, headers=SMP)
                return key
            except ApiError as err:
                if err.status == 404:
                    self.gone = True
                    return key
                log.warning("pod %s/%s: status: %s", self.namespace, self.name, err)
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
                pass  # the apiserver restarts in some tests
            await asyncio.sleep(min(0.2 * 2 ** attempt, 3))
        return last


def _changed_conditions(status: dict, old: dict) -> dict:
    """Keep a condition's lastTransitionTime when its status did not change."""
    previous = {c["type"]: c for c in old.get("conditions") or []}
    for c in status["conditions"]:
        before = previous.get(c["type"])
        if before and before.get("status") == c["status"] and before.get("lastTransitionTime"):
            c["lastTransitionTime"] = before["lastTransitionTime"]
    return status


def service_addresses(slices: Iterable[dict]) -> dict[str, list[str]]:
    """What cluster DNS answers for a headless Service: ``"svc.ns.svc"`` -> the sorted addresses of the
    endpoints of its EndpointSlices whose ``conditions.ready`` is not false. A Service whose slices have
    no ready endpoint maps to [] (its name exists but does not resolve)."""
    out: dict[str, set[str]] = {}
    for item in slices:
        meta = item.get("metadata") or {}
        service = (meta.get("labels") or {}).get(SERVICE_NAME_LABEL)
        if not service or item.get("addressType", "IPv4") != "IPv4":  # podshim answers AF_INET only
            continue
        addresses = out.setdefault(f"{service}.{meta['namespace']}.svc", set())
        for endpoint in item.get("endpoints") or []:
            if (endpoint.get("conditions") or {}).get("ready") is not False:
                addresses.update(endpoint.get("addresses") or [])
    return {key: sorted(addresses) for key, addresses in sorted(out.items())}


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _name_file(value: str, path: str, local: str) -> str:
    """``value`` with ``path`` (alone, or after ``--flag=``) replaced by ``local``."""
    if value == path:
        return local
    head, sep, tail = value.partition("=")
    return f"{head}={local}" if sep and tail == path else value


def _port(port: Any, container: dict) -> int:
    if isinstance(port, int) or str(port).isdigit():
        return int(port)
    for item in container.get("ports", []):
        if item.get("name") == port:
            return int(item["containerPort"])
    raise RuntimeError(f"no container port named {port!r}")


def _exit_code(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


def _signal_group(proc: asyncio.subprocess.Process, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def _die_with_parent() -> None:
    if sys.platform == "linux":
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


# --- Nodes --------------------------------------------------------------------------------------


@dataclass
class Node:
    name: str
    gpu: int
    api: Api
    cpu: str = "16"
    memory: str = "64Gi"
    uid: str = ""

    @property
    def allocatable(self) -> dict[str, str]:
        out = {"cpu": self.cpu, "memory": self.memory, "pods": "110", "ephemeral-storage": "100Gi"}
        if self.gpu:
            out[GPU_RESOURCE] = str(self.gpu)
        return out

    def labels(self) -> dict[str, str]:
        out = {"kubernetes.io/hostname": self.name, "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64",
               "node.kubernetes.io/instance-type": "process", "kompressor.io/process-kubelet": "true"}
        if self.gpu:
            out["nvidia.com/gpu.present"] = "true"
        return out

    def body(self) -> dict:
        return {"apiVersion": "v1", "kind": "Node",
                "metadata": {"name": self.name, "labels": self.labels()},
                "spec": {"taints": [dict(GPU_TAINT)]} if self.gpu else {},
                "status": self.status()}

    def status(self) -> dict:
        t = now()
        conditions = [
            {"type": kind, "status": "False", "reason": f"KubeletHas{reason}", "message": message,
             "lastHeartbeatTime": t, "lastTransitionTime": t}
            for kind, reason, message in (
                ("MemoryPressure", "SufficientMemory", "kubelet has sufficient memory available"),
                ("DiskPressure", "NoDiskPressure", "kubelet has no disk pressure"),
                ("PIDPressure", "SufficientPID", "kubelet has sufficient PID available"))
        ] + [{"type": "Ready", "status": "True", "reason": "KubeletReady", "message": "process kubelet is posting ready status",
              "lastHeartbeatTime": t, "lastTransitionTime": t}]
        return {
            "capacity": self.allocatable, "allocatable": self.allocatable, "conditions": conditions,
            "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}, {"type": "Hostname", "address": self.name}],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 0}},
            "nodeInfo": {"machineID": self.name, "systemUUID": self.name, "bootID": self.name,
                         "kernelVersion": os.uname().release, "osImage": "process kubelet", "containerRuntimeVersion":
                         "process://1", "kubeletVersion": "v1.37.0-process", "kubeProxyVersion": "",
                         "operatingSystem": "linux", "architecture": "amd64"},
        }

    async def register(self) -> None:
        try:
            obj = await self.api.request("POST", "/api/v1/nodes", body=self.body())
        except ApiError as err:
            if err.status != 409:
                raise
            obj = await self.api.request("PATCH", f"/api/v1/nodes/{self.name}", headers=MERGE,
                                         body={"metadata": {"labels": self.labels()}})
        self.uid = obj["metadata"]["uid"]
        await self.heartbeat_status()

    async def heartbeat_status(self) -> None:
        await self.api.request("PATCH", f"/api/v1/nodes/{self.name}/status", headers=SMP,
                               body={"status": self.status()})

    async def renew_lease(self) -> None:
        path = f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{self.name}"
        spec = {"holderIdentity": self.name, "leaseDurationSeconds": 40, "renewTime": micro_now()}
        try:
            await self.api.request("PATCH", path, headers=MERGE, body={"spec": spec})
        except ApiError as err:
            if err.status != 404:
                raise
            await self.api.request("POST", "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases", body={
                "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": self.name, "namespace": "kube-node-lease", "ownerReferences": [
                    {"apiVersion": "v1", "kind": "Node", "name": self.name, "uid": self.uid}]},
                "spec": spec})


# --- the kubelet ----------------------------------------------------------------------------------


class Kubelet:
    def __init__(self, admin: Api, nodes: list[Node], state_dir: Path, pod_env: dict[str, str],
                 provision: bool = True, addresses: "PodAddresses | None" = None):
        self.admin, self.nodes, self.state_dir = admin, nodes, state_dir
        self.addresses = addresses or PodAddresses("127.0")
        self.pod_env = pod_env
        self.provision = provision
        self.workers: dict[str, PodWorker] = {}
        self.finished: set[str] = set()
        self.dns_file = state_dir / "dns" / "services.json"  # podshim's Service names (service_addresses)
        self._slices: dict[str, dict] = {}  # EndpointSlice uid -> the slice
        self._dns: dict[str, list[str]] | None = None  # what dns_file holds
        url = urlparse(admin.server)
        self.api_server = _ApiServerAddress(url.hostname or "127.0.0.1", url.port or 443, admin.ca_file)

    def allocate_ip(self, uid: str) -> str:
        return self.addresses.allocate(uid)

    def _finished(self, uid: str) -> None:
        self.workers.pop(uid, None)
        self.finished.add(uid)

    def release_ip(self, uid: str) -> None:
        self.addresses.release(uid)

    async def claim_path(self, namespace: str, claim: str) -> Path:
        """The folder of a bound claim's PersistentVolume (waits a while for the binding)."""
        for _ in range(600):
            pvc = await self.admin.get_or_none(f"/api/v1/namespaces/{namespace}/persistentvolumeclaims/{claim}")
            volume = ((pvc or {}).get("spec") or {}).get("volumeName")
            if volume:
                pv = await self.admin.get_or_none(f"/api/v1/persistentvolumes/{volume}")
                spec = (pv or {}).get("spec") or {}
                path = (spec.get("hostPath") or spec.get("local") or {}).get("path")
                if path:
                    Path(path).mkdir(parents=True, exist_ok=True)
                    return Path(path)
            await asyncio.sleep(0.5)
        raise RuntimeError(f"persistentVolumeClaim {namespace}/{claim} is not bound")

    async def run(self, ready_file: Path | None) -> None:
        for node in self.nodes:
            await _retry(node.register)
            await _retry(node.renew_lease)
        tasks = [asyncio.create_task(self._heartbeats(node)) for node in self.nodes]
        listed = [asyncio.Event() for _ in self.nodes]
        tasks += [asyncio.create_task(self._watch_pods(node, ev)) for node, ev in zip(self.nodes, listed)]
        self._write_dns()  # exists (empty) before any Pod runs; filled once the slices are listed
        listed.append(asyncio.Event())
        tasks.append(asyncio.create_task(self._watch_endpoint_slices(listed[-1])))
        if self.provision:
            tasks.append(asyncio.create_task(self._provision_loop()))
        for ev in listed:
            await ev.wait()
        if ready_file:
            _write(ready_file, json.dumps({"pid": os.getpid(), "nodes": [n.name for n in self.nodes],
                                           "stateDir": str(self.state_dir),
                                           "podAddresses": self.addresses.cidr}).encode())
        log.info("process kubelet ready: nodes %s", ", ".join(n.name for n in self.nodes))
        try:
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()

    async def shutdown(self) -> None:
        workers = list(self.workers.values())
        for worker in workers:
            worker.halting = True
        await asyncio.gather(*(w._stop_all(5) for w in workers), return_exceptions=True)
        for worker in workers:
            worker.task.cancel()
        await asyncio.gather(*(w.task for w in workers), return_exceptions=True)

    async def _heartbeats(self, node: Node) -> None:
        beats = 0
        while True:
            await asyncio.sleep(10)
            beats += 1
            try:
                await node.renew_lease()
                if beats % 4 == 0:
                    await node.heartbeat_status()
            except ApiError as err:
                if err.status == 404:  # the Node was deleted: register again, as a kubelet does
                    with contextlib.suppress(Exception):
                        await node.register()
                else:
                    log.warning("node %s heartbeat: %s", node.name, err)
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as err:
                log.info("node %s heartbeat: %s", node.name, err)

    async def _watch_pods(self, node: Node, listed: asyncio.Event) -> None:
        selector = {"fieldSelector": f"spec.nodeName={node.name}"}
        while True:
            try:
                pods = await node.api.get("/api/v1/pods", **selector)
                seen = set()
                for pod in pods["items"]:
                    seen.add(pod["metadata"]["uid"])
                    self._pod_event(node, "MODIFIED", pod)
                for uid, worker in list(self.workers.items()):
                    if worker.node is node and uid not in seen:
                        self._pod_event(node, "DELETED", worker.pod)
                listed.set()
                rv = pods["metadata"]["resourceVersion"]
                while True:
                    async for event in node.api.watch("/api/v1/pods", {**selector, "resourceVersion": rv}):
                        obj = event.get("object") or {}
                        if event["type"] == "ERROR":
                            raise Expired(obj.get("message", ""))
                        rv = obj.get("metadata", {}).get("resourceVersion", rv)
                        if event["type"] != "BOOKMARK":
                            self._pod_event(node, event["type"], obj)
            except Expired:
                continue
            except (ApiError, aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError) as err:
                log.info("node %s: pod watch: %s; again in 1 s", node.name, err)
                await asyncio.sleep(1)

    async def _watch_endpoint_slices(self, listed: asyncio.Event) -> None:
        """Keeps dns_file: the ready endpoint addresses of every Service, from its EndpointSlices."""
        path, selector = "/apis/discovery.k8s.io/v1/endpointslices", {"labelSelector": SERVICE_NAME_LABEL}
        while True:
            try:
                slices = await self.admin.get(path, **selector)
                self._slices = {item["metadata"]["uid"]: item for item in slices["items"]}
                self._write_dns()
                listed.set()
                rv = slices["metadata"]["resourceVersion"]
                while True:
                    async for event in self.admin.watch(path, {**selector, "resourceVersion": rv}):
                        obj = event.get("object") or {}
                        if event["type"] == "ERROR":
                            raise Expired(obj.get("message", ""))
                        rv = obj.get("metadata", {}).get("resourceVersion", rv)
                        if event["type"] == "DELETED":
                            self._slices.pop(obj["metadata"]["uid"], None)
                        elif event["type"] in ("ADDED", "MODIFIED"):
                            self._slices[obj["metadata"]["uid"]] = obj
                        self._write_dns()
            except Expired:
                continue
            except (ApiError, aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError) as err:
                log.info("endpointslice watch: %s; again in 1 s", err)
                await asyncio.sleep(1)

    def _write_dns(self) -> None:
        records = service_addresses(self._slices.values())
        if records != self._dns:
            _write(self.dns_file, json.dumps(records, indent=1, sort_keys=True).encode())
            self._dns = records

    def _pod_event(self, node: Node, kind: str, pod: dict) -> None:
        if (pod.get("spec") or {}).get("nodeName") != node.name:
            return  # (the field selector already says so; a server that ignores it must not make us run it)
        uid = pod["metadata"]["uid"]
        worker = self.workers.get(uid)
        if kind == "DELETED":
            if worker:
                worker.vanished()
            return
        if worker is None:
            if uid in self.finished:
                return  # deleted with grace 0 already; a finalizer (e.g. the Job controller's) holds it
            worker = PodWorker(self, node, pod)
            worker.update(pod)
            self.workers[uid] = worker
            worker.task.add_done_callback(lambda _t, uid=uid: self._finished(uid))
        else:
            worker.update(pod)

    async def _provision_loop(self) -> None:
        """Bind every unbound claim to a hostPath PV of its own (no storage provisioner here)."""
        while True:
            try:
                claims = await self.admin.get("/api/v1/persistentvolumeclaims")
                for pvc in claims["items"]:
                    if not pvc["spec"].get("volumeName") and not pvc["metadata"].get("deletionTimestamp"):
                        await self._provision(pvc)
            except (ApiError, aiohttp.ClientError, asyncio.TimeoutError, OSError) as err:
                log.info("provisioner: %s", err)
            await asyncio.sleep(1)

    async def _provision(self, pvc: dict) -> None:
        meta, spec = pvc["metadata"], pvc["spec"]
        name = f"pvc-{meta['uid']}"
        folder = self.state_dir / "pvc" / meta["namespace"] / meta["name"]
        folder.mkdir(parents=True, exist_ok=True)
        storage = ((spec.get("resources") or {}).get("requests") or {}).get("storage", "1Gi")
        pv = {"apiVersion": "v1", "kind": "PersistentVolume",
              "metadata": {"name": name, "labels": {"kompressor.io/process-kubelet": "true"}},
              "spec": {"capacity": {"storage": storage}, "accessModes": spec.get("accessModes") or ["ReadWriteOnce"],
                       "hostPath": {"path": str(folder), "type": "DirectoryOrCreate"},
                       "persistentVolumeReclaimPolicy": "Retain",
                       "storageClassName": spec.get("storageClassName") or "",
                       "volumeMode": spec.get("volumeMode") or "Filesystem",
                       "claimRef": {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "namespace": meta["namespace"],
                                    "name": meta["name"], "uid": meta["uid"]}}}
        try:
            await self.admin.request("POST", "/api/v1/persistentvolumes", body=pv)
            log.info("provisioned %s for %s/%s at %s", name, meta["namespace"], meta["name"], folder)
        except ApiError as err:
            if err.status != 409:
                raise
        # The persistent-volume controller binds a pre-bound PV's claim; if it has not yet, do it as it would.
        await asyncio.sleep(0.5)
        current = await self.admin.get_or_none(
            f"/api/v1/namespaces/{meta['namespace']}/persistentvolumeclaims/{meta['name']}")
        if current is None or current["spec"].get("volumeName"):
            return
        with contextlib.suppress(ApiError):
            await self.admin.request(
                "PATCH", f"/api/v1/namespaces/{meta['namespace']}/persistentvolumeclaims/{meta['name']}", headers=MERGE,
                body={"metadata": {"annotations": {"pv.kubernetes.io/bind-completed": "yes",
                                                   "pv.kubernetes.io/bound-by-controller": "yes"}},
                      "spec": {"volumeName": name}})
            await self.admin.request(
                "PATCH", f"/api/v1/namespaces/{meta['namespace']}/persistentvolumeclaims/{meta['name']}/status",
                headers=MERGE, body={"status": {"phase": "Bound", "accessModes": pv["spec"]["accessModes"],
                                                "capacity": {"storage": storage}}})
            await self.admin.request("PATCH", f"/api/v1/persistentvolumes/{name}/status", headers=MERGE,
                                     body={"status": {"phase": "Bound"}})


POD_BLOCK_LOCKS = Path(os.environ.get("PROCESS_KUBELET_LOCK_DIR") or "/tmp/process-kubelet-pod-blocks")


class PodAddresses:
    """One kubelet's Pod addresses: PREFIX.B.2 to PREFIX.B.254, B being a /24 block of its own.

    Every process kubelet of the machine puts its Pods on the same /16 of ``lo`` (or 127.0/16). Each
    takes the first block B (0-255) whose lock file ``LOCKS/PREFIX.B.lock`` it can flock, and holds
    the lock while it runs; the kernel drops it when the process ends, however it ends, so a block is
    free again once its kubelet is gone, and a stale file never holds one."""

    def __init__(self, prefix: str, locks: Path = POD_BLOCK_LOCKS):
        self.prefix = prefix
        self.block, self._lock = _claim_block(prefix, Path(locks))
        self._ips: dict[str, str] = {}

    @property
    def cidr(self) -> str:
        return f"{self.prefix}.{self.block}.0/24"

    def allocate(self, uid: str) -> str:
        used = set(self._ips.values())
        for n in range(2, 255):
            ip = f"{self.prefix}.{self.block}.{n}"
            if ip not in used:
                self._ips[uid] = ip
                return ip
        raise RuntimeError(f"no Pod address left in {self.cidr} (253 Pods run)")

    def release(self, uid: str) -> None:
        self._ips.pop(uid, None)

    def close(self) -> None:
        """Give the block back (also done by the kernel when the process ends)."""
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None


def _claim_block(prefix: str, locks: Path) -> tuple[int, int]:
    locks.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(OSError):
        locks.chmod(0o1777)  # kubelets of other users share it
    for block in range(256):
        try:
            fd = os.open(locks / f"{prefix}.{block}.lock", os.O_RDWR | os.O_CREAT, 0o666)
        except PermissionError:
            continue  # another user's lock file
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        return block, fd
    raise RuntimeError(f"every /24 of {prefix}.0.0/16 is held by another process kubelet ({locks})")


@dataclass(frozen=True)
class _ApiServerAddress:
    hostname: str
    port: int
    ca_file: str | None


def pod_network(cidr: str) -> str:
    """The first two octets of the Pod addresses: ``cidr`` (a /16) made local on ``lo`` when possible,
    else 127.0 (loopback: works everywhere, but EndpointSlices refuse it)."""
    if cidr in ("", "loopback", "127.0.0.0/16"):
        return "127.0"
    network, _, bits = cidr.partition("/")
    octets = network.split(".")
    if bits != "16" or len(octets) != 4:
        raise SystemExit(f"--pod-cidr {cidr}: give a /16 such as 10.244.0.0/16, or 'loopback'")
    address = f"{octets[0]}.{octets[1]}.0.1/16"
    shown = subprocess.run(["ip", "-o", "addr", "show", "dev", "lo"], capture_output=True, text=True, check=False)
    if f" {address} " in shown.stdout:
        return f"{octets[0]}.{octets[1]}"
    added = subprocess.run(["ip", "addr", "add", address, "dev", "lo"], capture_output=True, text=True, check=False)
    if added.returncode == 0:
        log.info("pod network: %s on lo", address)
        return f"{octets[0]}.{octets[1]}"
    log.warning("cannot add %s to lo (%s): Pods get 127.0.0.N addresses, which EndpointSlices refuse",
                address, (added.stderr or "").strip())
    return "127.0"


async def _retry(call, attempts: int = 60) -> Any:
    for attempt in range(attempts):
        try:
            return await call()
        except (ApiError, aiohttp.ClientError, asyncio.TimeoutError, OSError) as err:
            if attempt == attempts - 1:
                raise
            log.info("%s: %s; again", getattr(call, "__name__", call), err)
            await asyncio.sleep(1)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kubeconfig", required=True, help="an admin kubeconfig (provisioning; Nodes without their own)")
    p.add_argument("--state-dir", required=True, type=Path, help="Pod folders, logs, provisioned volumes")
    p.add_argument("--cpu-node", default="kompressor-cpu", help="name of the CPU Node ('' for none)")
    p.add_argument("--gpu-node", default="kompressor-gpu", help=f"name of the GPU Node ({GPU_RESOURCE}: 1, tainted; '' for none)")
    p.add_argument("--node-kubeconfig", action="append", default=[], metavar="NODE=PATH",
                   help="the system:node:NODE kubeconfig of a Node (Node authorizer and NodeRestriction apply)")
    p.add_argument("--pod-env", action="append", default=[], metavar="KEY=VALUE",
                   help="a default environment variable of every container (the Pod's own env wins)")
    p.add_argument("--no-provision", action="store_true", help="do not bind unbound PersistentVolumeClaims")
    p.add_argument("--pod-cidr", default="10.244.0.0/16",
                   help="a /16 made local on lo for Pod addresses (needs root), or 'loopback' for 127.0.0.N")
    p.add_argument("--ready-file", type=Path, help="written once the Nodes are registered and watched")
    p.add_argument("--verbose", action="store_true")
    return p.parse_args(argv)


async def amain(args: argparse.Namespace) -> None:
    global MOUNT_NAMESPACES
    MOUNT_NAMESPACES = _mount_namespaces()
    log.info("containers get %s", "mount namespaces (real mounts at the real paths)" if MOUNT_NAMESPACES
             else "their paths rewritten into a Pod root folder (no mount namespaces here)")
    state = args.state_dir.resolve()
    state.mkdir(parents=True, exist_ok=True)
    admin = Api(args.kubeconfig, state / "credentials")
    node_configs = dict(item.split("=", 1) for item in args.node_kubeconfig)
    nodes = []
    for name, gpu in ((args.cpu_node, 0), (args.gpu_node, 1)):
        if name:
            api = Api(node_configs[name], state / "credentials") if name in node_configs else admin
            nodes.append(Node(name, gpu, api))
    pod_env = dict(item.split("=", 1) for item in args.pod_env)
    addresses = PodAddresses(await asyncio.to_thread(pod_network, args.pod_cidr))
    log.info("pod addresses: %s", addresses.cidr)
    kubelet = Kubelet(admin, nodes, state, pod_env, provision=not args.no_provision, addresses=addresses)
    loop = asyncio.get_running_loop()
    main_task = asyncio.current_task()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, main_task.cancel)
    try:
        await kubelet.run(args.ready_file)
    except asyncio.CancelledError:
        log.info("stopping: every Pod's processes get SIGTERM")
    finally:
        await kubelet.shutdown()
        if args.ready_file:
            with contextlib.suppress(FileNotFoundError):
                args.ready_file.unlink()
        for api in {id(n.api): n.api for n in nodes}.values():
            await api.close()
        await admin.close()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    asyncio.run(amain(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
