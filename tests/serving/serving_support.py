"""What the serving and drift tests share: tiny real artifacts, a real `kompressor serve` process, an
OIP v2 client built on the standard library, and a direct ONNX Runtime run to compare with."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
import warnings
from pathlib import Path

import numpy as np

from kompressor.store import write_manifest
from support.net import free_port

N_FEATURES = 8
N_CLASSES = 3


def make_artifact(folder: Path, seed: int, revision: int, n_features: int = N_FEATURES) -> Path:
    """A small MLP exported with torch.onnx (dynamic batch) plus its manifest."""
    import torch

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(n_features, 16), torch.nn.ReLU(),
                                torch.nn.Linear(16, N_CLASSES)).eval()
    folder.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():  # the legacy exporter announces its own deprecation
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model, torch.zeros(2, n_features), folder / "model.onnx", dynamo=False,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    write_manifest(folder, {"revision": revision})
    return folder


def ort_run(artifact: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(artifact / "model.onnx"), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.astype(np.float32)})[0]


def http(method: str, url: str, body=None, raw: bytes | None = None, timeout: float = 30) -> tuple[int, object]:
    """(status, parsed JSON body, or text for non-JSON answers)."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, payload = response.status, response.read()
    except urllib.error.HTTPError as err:
        status, payload = err.code, err.read()
    try:
        return status, json.loads(payload)
    except ValueError:
        return status, payload.decode(errors="replace")


def infer_body(x: np.ndarray, datatype: str = "FP32", nested: bool = False, request_id: str | None = None) -> dict:
    body = {"inputs": [{"name": "input", "datatype": datatype, "shape": list(x.shape),
                        "data": x.tolist() if nested else x.reshape(-1).tolist()}]}
    if request_id is not None:
        body["id"] = request_id
    return body


def metric_value(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of one metric whose labels include ``labels``."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        metric, _, label_text = head.partition("{")
        if metric != name:
            continue
        found = dict(part.split("=", 1) for part in label_text.rstrip("}").split(",") if "=" in part)
        if all(found.get(k) == f'"{v}"' for k, v in labels.items()):
            total += float(value)
    return total


class Server:
    """`kompressor serve` as a subprocess on a free loopback port."""

    def __init__(self, artifact: Path, name: str, capture: Path | None = None, log: Path | None = None,
                 extra: list[str] | None = None, grpc: bool = False):
        self.port = free_port()
        self.name = name
        self.url = f"http://127.0.0.1:{self.port}"
        argv = [sys.executable, "-m", "kompressor.cli", "--json-logs", "serve", "--artifact", str(artifact),
                "--name", name, "--port", str(self.port), "--host", "127.0.0.1"]
        self.grpc_port = None
        while grpc and self.grpc_port in (None, self.port):  # gRPC listens before REST answers ready
            self.grpc_port = free_port()
        self.grpc_target = f"127.0.0.1:{self.grpc_port}" if grpc else None
        if grpc:
            argv += ["--grpc-port", str(self.grpc_port)]
        if capture is not None:
            argv += ["--capture", str(capture)]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "KOMPRESSOR_ORT_THREADS": "1"}
        self.log = log
        self._log_fh = open(log, "wb") if log else subprocess.DEVNULL
        self.process = subprocess.Popen(argv + (extra or []), stdout=self._log_fh, stderr=self._log_fh, env=env)
        self.wait_ready()

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}: "
                                   f"{self.log.read_text() if self.log else ''}")
            try:
                if http("GET", f"{self.url}/v2/health/ready", timeout=2)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.05)  # polling interval, not a fixed wait
        raise TimeoutError(f"server on {self.url} not ready after {timeout}s")

    def infer_url(self, version: str | None = None) -> str:
        return f"{self.url}/v2/models/{self.name}" + (f"/versions/{version}" if version else "") + "/infer"

    def metrics(self) -> str:
        status, text = http("GET", f"{self.url}/metrics")
        assert status == 200
        return text

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._log_fh is not subprocess.DEVNULL:
            self._log_fh.close()


def load_body(artifact: Path, sha256: str | None = "manifest") -> dict:
    """A repository load request for ``artifact``: with the sha256 its manifest gives (or the one given, or
    none when ``sha256`` is None)."""
    parameters = {"artifact": str(artifact)}
    if sha256 == "manifest":
        sha256 = json.loads((artifact / "manifest.json").read_text())["files"]["model.onnx"]
    if sha256 is not None:
        parameters["sha256"] = sha256
    return {"parameters": parameters}


def swaps_under_load(server: "Server", loads: list[dict], x: np.ndarray, clients: int = 6, per_step: int = 20,
                     fresh_connections: bool = False, timeout: float = 60.0):
    """Clients post ``x`` to the server back to back while the ``loads`` (load request bodies) are sent one
    by one, each once ``per_step`` more answers came from the revision being served, and once more at the
    end. ``fresh_connections``: one connection per request, so the kernel spreads them over workers.
    Returns the answers [(status, headers, body)], the loads' answers [(status, body)] and the clients'
    outcomes (None, or the exception a client ended with)."""
    import asyncio

    import aiohttp

    load_url = f"{server.url}/v2/repository/models/{server.name}/load"

    async def scenario():
        results, stop = [], asyncio.Event()

        async def client_loop():
            connector = aiohttp.TCPConnector(force_close=True) if fresh_connections else None
            async with aiohttp.ClientSession(connector=connector) as client:
                while not stop.is_set():
                    async with client.post(server.infer_url(), json=infer_body(x)) as response:
                        results.append((response.status, response.headers, await response.json()))

        async def served_by(version: str) -> None:
            start, deadline = len(results), time.monotonic() + timeout
            while sum(1 for _, _, body in results[start:] if body.get("model_version") == version) < per_step:
                if time.monotonic() > deadline or any(t.done() for t in tasks):
                    raise AssertionError(f"no traffic answered by version {version}")
                await asyncio.sleep(0.01)

        tasks = [asyncio.create_task(client_loop()) for _ in range(clients)]
        swaps, current = [], "1"
        async with aiohttp.ClientSession() as admin:
            for body in loads:
                await served_by(current)  # traffic flows on the current revision before each swap
                async with admin.post(load_url, json=body) as response:
                    swaps.append((response.status, await response.json()))
                if response.status == 200:
                    current = swaps[-1][1]["version"]
            await served_by(current)
        stop.set()
        return results, swaps, await asyncio.gather(*tasks, return_exceptions=True)

    return asyncio.run(scenario())
