"""Where the end-to-end scenario runs. Each target offers the same few verbs a user has:

    apply(doc)            create or update a CompressedModel
    delete(name)          delete it
    status(name)          its .status (or {} while it has none)
    inference_url(name, refresh)  base URL of its OIP v2 server (http://host:port); refresh=True
                          after a connection error (a rolled Deployment may answer elsewhere)
    hot_swap              True when revisions change in place (no request may fail meanwhile)
    gone(name)            True once it and everything it owned are gone

Targets:
- ``embedded``: `kompressor run` as a subprocess; apply = write the manifest file, delete =
  remove the model from the file, status = status.json.
- ``emulator``: the operator (`kompressor operator` subprocess) against the loopback
  Kubernetes API emulator, with tests/support's fixture playing the Job/Deployment controllers.
- ``cluster``: a real Kubernetes control plane. Without $KUBECONFIG, the local one of e2e/cluster
  (kube-apiserver, controller-manager, scheduler from the Kubernetes Go modules, Pods run by the process
  kubelet): the chart is installed with the real `helm`, and inference goes to a ready endpoint of the
  serving Service's EndpointSlice (each Pod has its own loopback address). With $KUBECONFIG, that
  cluster with the chart installed (see e2e/kind.sh); inference through `kubectl port-forward`.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import yaml
from support.net import free_port, port_open

REPO = Path(__file__).resolve().parents[1]
LOCAL_NAMESPACE = "kompressor"  # the chart's release namespace on the local control plane (its PVC lives there)


def local_cluster_wanted() -> bool:
    """The local control plane of e2e/cluster, unless $KUBECONFIG names another cluster."""
    return not os.environ.get("KUBECONFIG")


def _local():
    sys.path.insert(0, str(REPO / "e2e" / "cluster"))
    import local  # e2e/cluster/local.py

    return local


class EmbeddedTarget:
    name = "embedded"
    hot_swap = True  # the runner hot-swaps the one local server

    def __init__(self, workdir: Path, env: dict[str, str]):
        self.workdir = workdir
        self.manifest = workdir / "models.yaml"
        self.env = env
        self.port = free_port()
        self.docs: dict[str, dict] = {}
        self.proc: subprocess.Popen | None = None
        self.log_path = workdir / "runner.log"
        self._log = None

    async def __aenter__(self) -> "EmbeddedTarget":
        return self

    async def __aexit__(self, *exc) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log:
            self._log.close()

    def _write(self) -> None:
        tmp = self.manifest.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump_all(list(self.docs.values()), sort_keys=False))
        os.replace(tmp, self.manifest)

    async def apply(self, doc: dict) -> None:
        self.docs[doc["metadata"]["name"]] = doc
        self._write()
        if self.proc is None:
            self._log = open(self.log_path, "w")
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "kompressor.cli", "--json-logs", "run", str(self.manifest),
                 "--workdir", str(self.workdir / "work"), "--port", str(self.port)],
                stdout=self._log, stderr=subprocess.STDOUT, env=self.env)

    async def delete(self, name: str) -> None:
        del self.docs[name]
        self._write()

    def _model_dir(self, name: str) -> Path:
        return self.workdir / "work" / "default" / name

    async def status(self, name: str) -> dict:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"kompressor run exited with {self.proc.returncode}:\n{self.diagnostics()}")
        try:
            return json.loads((self._model_dir(name) / "status.json").read_text())
        except FileNotFoundError:
            return {}

    async def inference_url(self, name: str, refresh: bool = False) -> str:
        return f"http://127.0.0.1:{self.port}"  # the first (only) model gets --port

    async def gone(self, name: str) -> bool:
        # The only model is gone: its folder, its port, and every process the runner started for it.
        return not self._model_dir(name).exists() and not port_open(self.port) and not _children(self.proc.pid)

    def diagnostics(self) -> str:
        return self.log_path.read_text()[-4000:] if self.log_path.exists() else ""


class EmulatorTarget:
    name = "emulator"
    hot_swap = False  # the controllers fixture restarts a changed Deployment's process on a new port

    def __init__(self, workdir: Path, env: dict[str, str]):
        from support.cluster import Cluster  # tests/support: the emulator harness and controllers fixture

        self.cluster = Cluster(workdir, cache=Path(env["KOMPRESSOR_CACHE"]))
        self.namespace = "default"

    async def __aenter__(self) -> "EmulatorTarget":
        await self.cluster.__aenter__()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.cluster.__aexit__(*exc)

    async def apply(self, doc: dict) -> None:
        name = doc["metadata"]["name"]
        if self.cluster.get(name, self.namespace):
            await self.cluster.patch(name, {"spec": doc["spec"]}, self.namespace)
        else:
            await self.cluster.create(doc)

    async def delete(self, name: str) -> None:
        await self.cluster.delete(name, self.namespace)

    async def status(self, name: str) -> dict:
        operator = self.cluster.operator
        if operator is not None and operator.poll() is not None:
            raise AssertionError(f"the operator exited with {operator.returncode}:\n{self.diagnostics()}")
        return self.cluster.status(name, self.namespace)

    async def inference_url(self, name: str, refresh: bool = False) -> str:
        from kompressor.core.names import serving_name

        key = (self.namespace, serving_name(name))
        for _ in range(300):  # a Deployment being restarted gets its port back in a moment
            if key in self.cluster.controllers.ports:
                return f"http://127.0.0.1:{self.cluster.controllers.ports[key]}"
            await asyncio.sleep(0.1)
        raise AssertionError(f"no serving Deployment runs for {name}")

    async def gone(self, name: str) -> bool:
        # The emulator has no garbage collector: the children's removal is the cluster target's to check.
        return self.cluster.get(name, self.namespace) is None

    def diagnostics(self) -> str:
        logs = sorted(self.cluster.workdir.glob("operator-*.log"))
        return logs[-1].read_text()[-4000:] if logs else ""


class ClusterTarget:
    """A real cluster: the kubernetes client for the API, `kubectl port-forward` for inference."""

    name = "cluster"
    hot_swap = False  # a Deployment rollout; port-forward follows one pod at a time
    _crd = ("kompressor.io", "v1alpha1")

    def __init__(self, workdir: Path, env: dict[str, str]):
        from kubernetes import client, config

        self.local = _local().LocalCluster.shared() if local_cluster_wanted() else None
        if self.local is not None:
            api_client = config.new_client_from_config(config_file=str(self.local.kubeconfig))
            self.namespace = LOCAL_NAMESPACE
        else:
            config.load_kube_config()
            api_client = None
            self.namespace = os.environ.get("KOMPRESSOR_E2E_NAMESPACE", "default")
        self.api = client.CustomObjectsApi(api_client)
        self.apps = client.AppsV1Api(api_client)
        self.batch = client.BatchV1Api(api_client)
        self.discovery = client.DiscoveryV1Api(api_client)
        self.workdir = workdir
        self.forward: subprocess.Popen | None = None
        self.local_port = free_port()
        self.applied: set[str] = set()

    async def __aenter__(self) -> "ClusterTarget":
        if self.local is not None:  # the chart, installed by the real helm; --wait: the operator Pod is Ready
            await asyncio.to_thread(self.local.helm, "upgrade", "--install", "kompressor", str(REPO / "charts" / "kompressor"),
                                    "--namespace", self.namespace, "--create-namespace", "--wait", "--timeout", "5m")
        return self

    async def __aexit__(self, *exc) -> None:
        self._stop_forward()
        from kubernetes.client.exceptions import ApiException

        for name in sorted(self.applied):  # leave the cluster as it was, even after a failure
            try:
                await asyncio.to_thread(self.api.delete_namespaced_custom_object, *self._crd, self.namespace,
                                        "compressedmodels", name)
            except ApiException:
                pass
        if self.local is not None:
            await asyncio.to_thread(self.local.helm, "uninstall", "kompressor", "--namespace", self.namespace,
                                    "--wait", "--timeout", "3m", check=False)

    async def apply(self, doc: dict) -> None:
        from kubernetes.client.exceptions import ApiException

        name = doc["metadata"]["name"]
        doc = {**doc, "metadata": {**doc["metadata"], "namespace": self.namespace}}
        self.applied.add(name)
        try:
            await asyncio.to_thread(self.api.create_namespaced_custom_object, *self._crd, self.namespace,
                                    "compressedmodels", doc)
        except ApiException as err:
            if err.status != 409:
                raise
            await asyncio.to_thread(self.api.patch_namespaced_custom_object, *self._crd, self.namespace,
                                    "compressedmodels", name, {"spec": doc["spec"]})

    async def delete(self, name: str) -> None:
        self._stop_forward()
        self.applied.discard(name)
        await asyncio.to_thread(self.api.delete_namespaced_custom_object, *self._crd, self.namespace,
                                "compressedmodels", name)

    async def status(self, name: str) -> dict:
        from kubernetes.client.exceptions import ApiException

        try:
            obj = await asyncio.to_thread(self.api.get_namespaced_custom_object, *self._crd, self.namespace,
                                          "compressedmodels", name)
        except ApiException as err:
            if err.status == 404:
                return {}
            raise
        return obj.get("status") or {}

    async def inference_url(self, name: str, refresh: bool = False) -> str:
        from kompressor.core.names import serving_name

        if self.local is not None:
            return await self._endpoint_url(name)
        if refresh:
            self._stop_forward()
        if self.forward is None or self.forward.poll() is not None:
            obj = await asyncio.to_thread(self.api.get_namespaced_custom_object, *self._crd, self.namespace,
                                          "compressedmodels", name)
            port = obj["spec"].get("serving", {}).get("port", 8080)
            self.forward = subprocess.Popen(
                [_kubectl(), "port-forward", "-n", self.namespace, f"svc/{serving_name(name)}",
                 f"{self.local_port}:{port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for _ in range(100):
                if port_open(self.local_port):
                    break
                await asyncio.sleep(0.1)
        return f"http://127.0.0.1:{self.local_port}"

    async def _endpoint_url(self, name: str) -> str:
        """A ready endpoint of the serving Service, from its EndpointSlices (kept by the real controller)."""
        from kompressor.core.names import serving_name

        service = serving_name(name)
        for _ in range(300):
            slices = await asyncio.to_thread(self.discovery.list_namespaced_endpoint_slice, self.namespace,
                                             label_selector=f"kubernetes.io/service-name={service}")
            for item in slices.items:
                port = next((p.port for p in item.ports or [] if p.name == "http"), None)
                for endpoint in item.endpoints or []:
                    if port and endpoint.conditions and endpoint.conditions.ready and endpoint.addresses:
                        return f"http://{endpoint.addresses[0]}:{port}"
            await asyncio.sleep(0.2)
        raise AssertionError(f"no ready endpoint of Service {service}")

    def _stop_forward(self) -> None:
        if self.forward and self.forward.poll() is None:
            self.forward.terminate()
            self.forward.wait(10)
        self.forward = None

    async def gone(self, name: str) -> bool:
        if await self.status(name) or await self._exists(name):
            return False
        selector = f"app.kubernetes.io/instance={name}"
        deployments = await asyncio.to_thread(self.apps.list_namespaced_deployment, self.namespace,
                                              label_selector=selector)
        jobs = await asyncio.to_thread(self.batch.list_namespaced_job, self.namespace, label_selector=selector)
        return not deployments.items and not jobs.items

    async def _exists(self, name: str) -> bool:
        from kubernetes.client.exceptions import ApiException

        try:
            await asyncio.to_thread(self.api.get_namespaced_custom_object, *self._crd, self.namespace,
                                    "compressedmodels", name)
            return True
        except ApiException as err:
            if err.status == 404:
                return False
            raise

    def diagnostics(self) -> str:
        if self.local is not None:
            # the drift watcher's own log apart: the serving Pods' access lines would push it out of the tail
            return (self.local.pod_logs(self.namespace, "kompressor")[-4000:] + "\n"
                    + self.local.pod_logs(self.namespace, f"{NAME_PREFIX}-drift")[-3000:] + "\n"
                    + self.local.pod_logs(self.namespace, NAME_PREFIX)[-3000:] + "\n" + self.local.diagnostics())
        return "see `kubectl -n kompressor-system logs deploy/kompressor-operator` and the model's Events"


def _children(pid: int) -> list[int]:
    """Live (non-zombie) child processes of ``pid``."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                out.append(int(entry.name))
    return out


def _kubectl() -> str:
    return shutil.which("kubectl") or "kubectl"


NAME_PREFIX = "digits"


def cluster_unavailable_reason() -> str | None:
    """None when the local control plane is built (without $KUBECONFIG), or when $KUBECONFIG reaches a
    cluster with the CRD installed."""
    if local_cluster_wanted():
        return _local().unavailable_reason()
    kubeconfig = os.environ.get("KUBECONFIG") or str(Path.home() / ".kube" / "config")
    if not Path(kubeconfig.split(os.pathsep)[0]).is_file():
        return (f"no kubeconfig ({kubeconfig} does not exist): set KUBECONFIG to a reachable cluster, "
                f"or run e2e/kind.sh")
    try:
        from kubernetes import client, config

        config.load_kube_config()
        api = client.ApiextensionsV1Api()
        api.read_custom_resource_definition("compressedmodels.kompressor.io", _request_timeout=5)
    except Exception as err:  # noqa: BLE001 - any failure means: no usable cluster; say which
        text = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
        return f"the cluster from {kubeconfig} is not usable (unreachable, or the chart is not installed): {text}"
    if shutil.which("kubectl") is None:
        return "kubectl is not on PATH (needed for port-forward to the serving Service)"
    return None
