"""Serving load benchmark: `kompressor serve` against KServe's and MLServer's Python servers under concurrent load.

    python bench/serving_load.py                  # tables on stdout (about 15 min on 2 cores)
    python bench/serving_load.py --write-docs     # also write its section of docs/benchmarks/serving.md
    python bench/serving_load.py --seconds 2 --models small   # a quick look

One run, the same ONNX models served by every server, each cell a closed-loop load at 1, 8 and 64 connections:
- models: ``small`` (an MLP shaped like the builtin digits-mlp, 64 → 1024 → 1024 → 10), ``heavy``
  (784 → 1024 → 1024 → 10, about 1.9 M parameters; batch 1 and batch 32) and ``transformer`` (the real pretrained
  all-MiniLM-L6-v2 with a topic head, tests/support/text_models.py, 32 tokens; batch 1);
- servers: `kompressor serve` (REST JSON, REST binary tensors, gRPC; 1 worker and ``--workers 2``; and, when
  ``kompressor serve --help`` offers ``--max-batch-size``, 1 worker with dynamic batching); KServe's Python model
  server and MLServer, each with a minimal ONNX Runtime model (bench/peers_serving/) at 1 and 2 workers; a bare
  aiohttp + ``session.run`` server (the HTTP floor); and an in-process ``session.run`` loop (the floor of all);
- load: ``wrk`` (REST; a Lua script sets the POST body and headers) and ``h2load`` (gRPC: the framed protobuf
  message as the body of an HTTP/2 POST), both written in C, one generator thread. Their own ceiling is measured
  first against trivial servers and printed beside the results;
- cells are interleaved (for each connection count, every server in turn), so load from other processes on the
  machine falls on all alike; the load average is printed at the start, per model and at the end.

KServe and MLServer are benchmark-only dependencies: each is installed in its own venv under /tmp/bench-venvs
(created on first use, with a message; ``--venvs DIR`` to put them elsewhere). ``wrk`` and ``h2load`` come from
Debian's packages ``wrk`` and ``nghttp2-client`` (``nghttpd`` from ``nghttp2-server``, for h2load's ceiling).
ONNX Runtime threads: a server of one process runs ORT at its default (one intra-op thread per core); with 2
workers each gets one thread (`kompressor serve`'s own rule, given to the peers through $BENCH_ORT_THREADS); one
extra row runs `kompressor serve` with 1 worker on 1 thread. A cell at many connections runs longer than
``--seconds`` when one round of all connections takes long (4 rounds, up to ``--max-cell-seconds``), and after each
cell the script waits for the server to go idle (its process group's CPU time stops growing), so that requests left
in flight by the generator do not load the next cell.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
PEERS = Path(__file__).resolve().parent / "peers_serving"
DOC = ROOT / "docs" / "benchmarks" / "serving.md"
BEGIN, END = "<!-- serving_load: begin (bench/serving_load.py --write-docs) -->", "<!-- serving_load: end -->"
DEFAULT_VENVS = Path("/tmp/bench-venvs")
PEER_PACKAGES = {  # benchmark-only, pinned: what this benchmark was last run with
    "kserve": ["kserve==0.21.0", "onnxruntime==1.32.0", "numpy==2.4.6"],
    # uvloop 0.22+ breaks MLServer 1.7's inference workers ("There is no current event loop"): pinned below it
    "mlserver": ["mlserver==1.7.1", "onnxruntime==1.32.0", "numpy==2.4.6", "uvloop==0.21.0"],
}
SMALL_LAYERS = (64, 1024, 1024, 10)
HEAVY_LAYERS = (784, 1024, 1024, 10)
CONNECTIONS = (1, 8, 64)
MAX_BATCH = 32  # --max-batch-size for the dynamic-batching cells
TARGETS = {"workers": 1.8, "peers": 2.0, "binary": 2.0, "batching_p99": 2.0}
SERVER_ENV_DROP = ("KOMPRESSOR_ORT_THREADS", "OMP_NUM_THREADS")  # every server at its default threads
K1, K2 = "kompressor serve, 1 worker", "kompressor serve, 2 workers"
ONE_THREAD = "kompressor serve, 1 worker, 1 ORT thread"
KB = f"kompressor serve, 1 worker, dynamic batching ≤{MAX_BATCH}"


# ---- models and request bodies ----------------------------------------------------------------------------------

@dataclass
class Model:
    key: str
    title: str
    artifact: Path  # folder with model.onnx and manifest.json
    batches: tuple[int, ...]
    make_feeds: object  # batch -> {input name: array}

    @property
    def onnx(self) -> Path:
        return self.artifact / "model.onnx"


def mlp(folder: Path, layers: tuple[int, ...]) -> Path:
    import torch

    from kompressor.store import write_manifest

    torch.manual_seed(0)
    modules = []
    for a, b in zip(layers, layers[1:]):
        modules += [torch.nn.Linear(a, b), torch.nn.ReLU()]
    net = torch.nn.Sequential(*modules[:-1]).eval()
    folder.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(net, torch.zeros(2, layers[0]), folder / "model.onnx", dynamo=False, input_names=["input"],
                      output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    write_manifest(folder, {"revision": 1})
    return folder


def transformer(folder: Path) -> tuple[Path, dict[str, np.ndarray]]:
    """The MiniLM topic classifier (built once and cached by tests/support/text_models.py) and real token rows."""
    sys.path.insert(0, str(ROOT))
    from kompressor.store import write_manifest
    from tests.support.text_models import text_models

    cache = Path(os.environ.get("KOMPRESSOR_CACHE") or Path.home() / ".cache" / "kompressor") / "text-models"
    models = text_models(cache)
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(models.onnx, folder / "model.onnx")
    write_manifest(folder, {"revision": 1})
    data = np.load(models.eval)
    return folder, {"input_ids": data["input_ids"], "attention_mask": data["attention_mask"]}


def build_models(tmp: Path, keys: list[str]) -> list[Model]:
    rng = np.random.default_rng(0)
    out = []
    if "small" in keys:
        out.append(Model("small", f"small MLP {' → '.join(map(str, SMALL_LAYERS))} (~1.1 M parameters)",
                         mlp(tmp / "small", SMALL_LAYERS), (1,),
                         lambda b: {"input": rng.normal(size=(b, SMALL_LAYERS[0])).astype(np.float32)}))
    if "heavy" in keys:
        out.append(Model("heavy", f"heavy MLP {' → '.join(map(str, HEAVY_LAYERS))} (~1.9 M parameters)",
                         mlp(tmp / "heavy", HEAVY_LAYERS), (1, 32),
                         lambda b: {"input": rng.normal(size=(b, HEAVY_LAYERS[0])).astype(np.float32)}))
    if "transformer" in keys:
        folder, rows = transformer(tmp / "transformer")
        out.append(Model("transformer", "transformer: all-MiniLM-L6-v2 + topic head (~22.7 M parameters, 32 tokens)",
                         folder, (1,), lambda b: {k: np.ascontiguousarray(v[:b]) for k, v in rows.items()}))
    return out


OIP_TYPES = {np.dtype(np.float32): "FP32", np.dtype(np.int64): "INT64"}


@dataclass
class Payload:
    """One request, encoded once for every protocol. Files, because the C load generators read them."""
    batch: int
    json_file: Path
    binary_file: Path
    binary_header_length: int
    grpc_file: Path  # gRPC length-prefixed message (the HTTP/2 body h2load sends)
    grpc_message: bytes


def make_payload(folder: Path, feeds: dict[str, np.ndarray]) -> Payload:
    from kompressor_jobs.serve import oip_proto

    folder.mkdir(parents=True, exist_ok=True)
    batch = next(iter(feeds.values())).shape[0]
    tensors = [{"name": k, "datatype": OIP_TYPES[v.dtype], "shape": list(v.shape)} for k, v in feeds.items()]
    body = json.dumps({"inputs": [{**t, "data": v.reshape(-1).tolist()} for t, v in zip(tensors, feeds.values())]})
    (folder / "body.json").write_text(body)
    head = json.dumps({"inputs": [{**t, "parameters": {"binary_data_size": v.nbytes}}
                                  for t, v in zip(tensors, feeds.values())],
                       "parameters": {"binary_data_output": True}}).encode()
    (folder / "body.bin").write_bytes(head + b"".join(v.tobytes() for v in feeds.values()))
    request = oip_proto.message("ModelInferRequest")(model_name="m")
    for t, v in zip(tensors, feeds.values()):
        request.inputs.add(name=t["name"], datatype=t["datatype"], shape=t["shape"])
        request.raw_input_contents.append(v.tobytes())
    message = request.SerializeToString()
    (folder / "body.grpc").write_bytes(b"\0" + len(message).to_bytes(4, "big") + message)
    return Payload(batch, folder / "body.json", folder / "body.bin", len(head), folder / "body.grpc", message)


# ---- servers ------------------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in SERVER_ENV_DROP}
    env.update(extra)
    return env


@dataclass
class Server:
    label: str  # e.g. "kompressor serve, 1 worker"
    group: str  # "kompressor", "kserve", "mlserver", "bare"
    workers: int
    argv: list[str]
    protocols: tuple[str, ...]  # of "REST JSON", "REST binary", "gRPC"
    env: dict = field(default_factory=server_env)
    cwd: Path | None = None
    batching: bool = False
    port: int = field(default_factory=free_port)
    grpc_port: int = 0
    process: subprocess.Popen | None = None
    log: Path | None = None

    def start(self, logs: Path) -> None:
        self.log = logs / (re.sub(r"[^a-z0-9]+", "-", self.label.lower()) + ".log")
        argv = [a.replace("{port}", str(self.port)).replace("{grpc_port}", str(self.grpc_port)) for a in self.argv]
        self.process = subprocess.Popen(argv, stdout=self.log.open("wb"), stderr=subprocess.STDOUT, env=self.env,
                                        cwd=self.cwd, start_new_session=True)

    def wait_ready(self, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.label} exited ({self.process.returncode}); see {self.log}:\n"
                                   + self.log.read_text()[-3000:])
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/v2/models/m/ready", timeout=5) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"{self.label} did not become ready in {timeout:.0f} s; see {self.log}")

    def cpu_seconds(self) -> float:
        """CPU time used so far by the server's processes (its process group)."""
        ticks = 0
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rpartition(")")[2].split()
            except OSError:
                continue
            if int(fields[2]) == self.process.pid:
                ticks += int(fields[11]) + int(fields[12])
        return ticks / os.sysconf("SC_CLK_TCK")

    def drain(self, timeout: float = 60) -> None:
        """Wait until the server is idle: a load generator that stops leaves requests in flight, which the server
        still works through (none of these servers cancels a request whose client left), and that work must not
        fall on the next cell."""
        deadline = time.monotonic() + timeout
        before = self.cpu_seconds()
        while time.monotonic() < deadline:
            time.sleep(0.25)
            now = self.cpu_seconds()
            if now - before < 0.25 * 0.15:  # under 15 % of a core
                return
            before = now

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGTERM)  # the group this script started: the server and its workers
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        except ProcessLookupError:
            pass


def kompressor_servers(model: Model, batching: bool) -> list[Server]:
    base = [sys.executable, "-m", "kompressor.cli", "--json-logs", "serve", "--artifact", str(model.artifact),
            "--name", "m", "--host", "127.0.0.1", "--port", "{port}", "--grpc-port", "{grpc_port}",
            "--max-body-bytes", str(64 << 20)]
    protocols = ("REST JSON", "REST binary", "gRPC")
    servers = [Server("kompressor serve, 1 worker", "kompressor", 1, base, protocols, grpc_port=free_port()),
               Server(ONE_THREAD, "kompressor", 1, base, ("REST JSON",), grpc_port=free_port(),
                      env=server_env(KOMPRESSOR_ORT_THREADS="1")),
               Server("kompressor serve, 2 workers", "kompressor", 2, base + ["--workers", "2"], protocols,
                      grpc_port=free_port())]
    if batching:
        servers.append(Server(KB, "kompressor", 1,
                              base + ["--max-batch-size", str(MAX_BATCH)], ("REST JSON",), grpc_port=free_port(),
                              batching=True))
    return servers


def peer_threads(workers: int) -> int:
    """The peers' ONNX Runtime threads per process, by the rule `kompressor serve --workers` follows: one server
    process gets ORT's default (0: one per core), N processes share the cores out (at least one thread each)."""
    return 0 if workers == 1 else max(1, (os.cpu_count() or 1) // workers)


def peer_servers(model: Model, venvs: Path, tmp: Path) -> list[Server]:
    servers = []
    for workers in (1, 2):
        servers.append(Server(f"KServe, {workers} worker{'s' * (workers > 1)}", "kserve", workers, [
            str(venvs / "kserve" / "bin" / "python"), str(PEERS / "kserve_server.py"), str(model.onnx), "m",
            "--http_port", "{port}", "--grpc_port", str(free_port()), "--workers", str(workers)], ("REST JSON",),
            env=server_env(BENCH_ORT_THREADS=str(peer_threads(workers)))))
    for workers in (1, 2):
        folder = tmp / f"mlserver-{model.key}-{workers}"
        (folder / "m").mkdir(parents=True, exist_ok=True)
        server = Server(f"MLServer, {workers} parallel worker{'s' * (workers > 1)}", "mlserver", workers,
                        [str(venvs / "mlserver" / "bin" / "mlserver"), "start", str(folder)], ("REST JSON",),
                        env=server_env(PYTHONPATH=str(PEERS), BENCH_ORT_THREADS=str(peer_threads(workers))),
                        cwd=folder)
        (folder / "settings.json").write_text(json.dumps({
            "debug": False, "host": "127.0.0.1", "http_port": server.port, "grpc_port": free_port(),
            "metrics_port": free_port(), "parallel_workers": workers}))
        (folder / "m" / "model-settings.json").write_text(json.dumps({
            "name": "m", "implementation": "mlserver_runtime.OnnxRuntime", "parameters": {"uri": str(model.onnx)}}))
        servers.append(server)
    return servers


def bare_server(model: Model) -> Server:
    return Server("bare aiohttp + session.run", "bare", 1,
                  [sys.executable, str(PEERS / "bare_server.py"), str(model.onnx), "{port}"], ("REST JSON",))


def check_answer(server: Server, protocol: str, payload: Payload) -> None:
    """One request of the kind the load generator will send, and its answer checked: a server that answers
    errors fast must not win a cell."""
    if protocol == "gRPC":
        import grpc

        from kompressor_jobs.serve import oip_proto

        with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}", options=[
                ("grpc.max_receive_message_length", 64 << 20)]) as channel:
            answer = oip_proto.message("ModelInferResponse").FromString(
                channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")(payload.grpc_message, timeout=60))
        shape = list(answer.outputs[0].shape)
    else:
        binary = protocol == "REST binary"
        body = (payload.binary_file if binary else payload.json_file).read_bytes()
        headers = ({"Content-Type": "application/octet-stream",
                    "Inference-Header-Content-Length": str(payload.binary_header_length)} if binary
                   else {"Content-Type": "application/json"})
        request = urllib.request.Request(f"http://127.0.0.1:{server.port}/v2/models/m/infer", body, headers)
        with urllib.request.urlopen(request, timeout=60) as r:
            raw = r.read()
            split = int(r.headers.get("Inference-Header-Content-Length") or len(raw))
        shape = json.loads(raw[:split])["outputs"][0]["shape"]
    if shape[0] != payload.batch:
        raise RuntimeError(f"{server.label} {protocol}: answer of shape {shape} for batch {payload.batch}")


# ---- load generators ----------------------------------------------------------------------------------------------

LUA = """
local f = assert(io.open("{body}", "rb"))
wrk.method = "POST"
wrk.body = f:read("*a")
f:close()
{headers}
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("WRK %d %d %.1f %.1f %d\\n", summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(99), e.connect + e.read + e.write + e.status + e.timeout))
end
"""


@dataclass
class Cell:
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    requests: int
    errors: int


def wrk(url: str, body: Path, headers: dict[str, str], connections: int, seconds: float, scripts: Path) -> Cell:
    script = scripts / f"{abs(hash((str(body), tuple(headers.items()))))}.lua"
    if not script.exists():
        lines = "\n".join(f'wrk.headers["{k}"] = "{v}"' for k, v in headers.items())
        script.write_text(LUA.replace("{body}", str(body)).replace("{headers}", lines))
    out = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--timeout", "60s",
                          "-s", str(script), url], capture_output=True, text=True, timeout=seconds + 120)
    match = re.search(r"^WRK (\d+) (\d+) ([\d.]+) ([\d.]+) (\d+)$", out.stdout, re.M)
    if not match:
        raise RuntimeError(f"wrk failed: {out.stdout[-2000:]} {out.stderr[-2000:]}")
    requests, duration_us, p50, p99, errors = match.groups()
    return Cell(int(requests) / (int(duration_us) / 1e6), float(p50) / 1000, float(p99) / 1000, int(requests),
                int(errors))


def h2load(url: str, body: Path, connections: int, seconds: float, warmup: float, scripts: Path) -> Cell:
    log = scripts / "h2load.log"
    log.unlink(missing_ok=True)
    out = subprocess.run(["h2load", f"-c{connections}", "-m1", "-t1", "-D", str(max(1, round(seconds))),
                          f"--warm-up-time={max(0, round(warmup))}", "-d", str(body), "-H",
                          "content-type: application/grpc", "-H", "te: trailers", "--log-file", str(log), url],
                         capture_output=True, text=True, timeout=seconds + warmup + 120)
    rate = re.search(r"finished in [\d.]+s, ([\d.]+) req/s", out.stdout)
    counts = re.search(r"requests: (\d+) total, \d+ started, (\d+) done, (\d+) succeeded", out.stdout)
    if not rate or not counts or not log.exists():
        raise RuntimeError(f"h2load failed: {out.stdout[-2000:]} {out.stderr[-2000:]}")
    rows = [line.split("\t") for line in log.read_text().splitlines() if line]
    times = np.asarray([int(r[2]) for r in rows if r[1] == "200"], dtype=float) / 1000
    done, succeeded = int(counts.group(2)), int(counts.group(3))
    return Cell(float(rate.group(1)) * succeeded / max(1, done), float(np.percentile(times, 50)),
                float(np.percentile(times, 99)), succeeded, done - succeeded)


def load_cell(server: Server, protocol: str, payload: Payload, connections: int, seconds: float, warmup: float,
              scripts: Path) -> Cell:
    cell = _load_cell(server, protocol, payload, connections, seconds, warmup, scripts)
    server.drain()
    if cell.requests == 0:
        cell.errors += 1  # not one answer in the whole cell: shown, never taken for a rate
    return cell


def _load_cell(server: Server, protocol: str, payload: Payload, connections: int, seconds: float, warmup: float,
               scripts: Path) -> Cell:
    if protocol == "gRPC":
        return h2load(f"http://127.0.0.1:{server.grpc_port}/inference.GRPCInferenceService/ModelInfer",
                      payload.grpc_file, connections, seconds, warmup, scripts)
    url = f"http://127.0.0.1:{server.port}/v2/models/m/infer"
    if protocol == "REST binary":
        body, headers = payload.binary_file, {"Content-Type": "application/octet-stream",
                                              "Inference-Header-Content-Length": str(payload.binary_header_length)}
    else:
        body, headers = payload.json_file, {"Content-Type": "application/json"}
    if warmup > 0:
        wrk(url, body, headers, connections, warmup, scripts)
        server.drain()
    return wrk(url, body, headers, connections, seconds, scripts)


def in_process(model: Model, feeds: dict[str, np.ndarray], seconds: float) -> Cell:
    import onnxruntime as ort

    session = ort.InferenceSession(str(model.onnx), providers=["CPUExecutionProvider"])
    for _ in range(5):
        session.run(None, feeds)
    times = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        started = time.perf_counter()
        session.run(None, feeds)
        times.append(time.perf_counter() - started)
    a = np.asarray(times) * 1000
    return Cell(len(a) / (a.sum() / 1000), float(np.percentile(a, 50)), float(np.percentile(a, 99)), len(a), 0)


def generator_ceilings(tmp: Path, payload: Payload, seconds: float) -> dict[str, float]:
    """wrk against a trivial asyncio HTTP server and h2load against nghttpd, with the small model's body, at 64
    connections: the rates the generators reach (at least) when the server costs next to nothing."""
    ceilings = {}
    trivial = Server("trivial server", "trivial", 1, [sys.executable, str(PEERS / "trivial_server.py"), "{port}"], ())
    trivial.start(tmp)
    try:
        deadline = time.monotonic() + 30
        while socket.socket().connect_ex(("127.0.0.1", trivial.port)) != 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        ceilings["wrk vs a trivial asyncio server"] = wrk(
            f"http://127.0.0.1:{trivial.port}/", payload.json_file, {"Content-Type": "application/json"}, 64,
            seconds, tmp).requests_per_s
    finally:
        trivial.stop()
    if shutil.which("nghttpd"):
        docroot = tmp / "docroot"
        docroot.mkdir(exist_ok=True)
        (docroot / "x").write_text("{}")
        nghttpd = Server("nghttpd", "trivial", 1, ["nghttpd", "--no-tls", "-d", str(docroot), "{port}"], ())
        nghttpd.start(tmp)
        try:
            time.sleep(1)
            ceilings["h2load vs nghttpd"] = h2load(f"http://127.0.0.1:{nghttpd.port}/x", payload.grpc_file, 64,
                                                   seconds, 0, tmp).requests_per_s
        finally:
            nghttpd.stop()
    return ceilings


# ---- setup --------------------------------------------------------------------------------------------------------

def ensure_tools() -> None:
    missing = [f"{tool} (Debian package {pkg})" for tool, pkg in (("wrk", "wrk"), ("h2load", "nghttp2-client"))
               if not shutil.which(tool)]
    if missing:
        sys.exit("serving_load: missing load generators: " + ", ".join(missing) +
                 "; install them with `apt-get install -y wrk nghttp2-client nghttp2-server`")


def ensure_venv(venvs: Path, name: str) -> None:
    """The benchmark-only venv for one peer, created (or its pins installed) when missing."""
    folder = venvs / name
    marker = folder / ".serving-load-packages"
    wanted = " ".join(PEER_PACKAGES[name])
    if marker.exists() and marker.read_text() == wanted:
        return
    print(f"serving_load: setting up the benchmark-only venv {folder} ({wanted}); this takes a few minutes, once",
          flush=True)
    if not (folder / "bin" / "python").exists():
        base = getattr(sys, "_base_executable", sys.executable)
        subprocess.run([base, "-m", "venv", str(folder)], check=True)
    subprocess.run([str(folder / "bin" / "python"), "-m", "pip", "install", "-q", *PEER_PACKAGES[name]], check=True)
    marker.write_text(wanted)


# ---- the run ------------------------------------------------------------------------------------------------------

def loadavg() -> str:
    return " / ".join(f"{x:.2f}" for x in os.getloadavg())


def run(args: argparse.Namespace) -> dict:
    started = time.monotonic()
    ensure_tools()
    if not args.no_peers:
        for name in PEER_PACKAGES:
            ensure_venv(args.venvs, name)
    help_text = subprocess.run([sys.executable, "-m", "kompressor.cli", "serve", "--help"], capture_output=True,
                               text=True).stdout
    batching = "--max-batch-size" in help_text
    report = {"loadavg": [("start", loadavg())], "batching": batching, "models": [], "cells": {}, "floor": {},
              "servers": {}, "seconds_per_cell": {}}
    with tempfile.TemporaryDirectory(prefix="serving-load-") as tmp_name:
        tmp = Path(tmp_name)
        models = build_models(tmp, args.models)
        first = models[0]
        report["ceilings"] = generator_ceilings(tmp, make_payload(tmp / "ceiling", first.make_feeds(1)),
                                                min(3.0, args.seconds))
        print("generator ceilings:", {k: f"{v:,.0f} req/s" for k, v in report["ceilings"].items()}, flush=True)
        for model in models:
            report["models"].append((model.key, model.title, model.batches))
            servers = kompressor_servers(model, batching) + ([] if args.no_peers else peer_servers(
                model, args.venvs, tmp)) + [bare_server(model)]
            payloads = {b: make_payload(tmp / f"{model.key}-{b}", model.make_feeds(b)) for b in model.batches}
            try:
                for server in servers:  # one at a time: startups do not slow each other
                    server.start(tmp)
                    server.wait_ready()
                for server in servers:
                    report["servers"][(model.key, server.label)] = server
                    for protocol in server.protocols:
                        for payload in payloads.values():
                            check_answer(server, protocol, payload)
                report["loadavg"].append((model.key, loadavg()))
                for batch, payload in payloads.items():
                    report["floor"][(model.key, batch)] = in_process(model, model.make_feeds(batch), args.seconds)
                    alone: dict[tuple[str, str], float] = {}  # p50 seconds at the fewest connections
                    for connections in args.connections:
                        for server in servers:
                            if server.batching and batch > 1:
                                continue
                            for protocol in server.protocols:
                                # Long enough for every connection to get answers several times over (a closed
                                # loop at 64 connections on a 40 ms request goes round in seconds), within the cap.
                                per_round = connections * alone.get((server.label, protocol), 0) / server.workers
                                seconds = min(max(args.seconds, 4 * per_round), args.max_cell_seconds)
                                first = connections == args.connections[0]
                                cell = load_cell(server, protocol, payload, connections, seconds,
                                                 args.warmup if first else 0, tmp)
                                if first:
                                    alone[(server.label, protocol)] = cell.p50_ms / 1000
                                report["seconds_per_cell"][(model.key, batch, server.label, protocol,
                                                            connections)] = seconds
                                report["cells"][(model.key, batch, server.label, protocol, connections)] = cell
                                print(f"{model.key} b{batch} c{connections:<3} {server.label:<44} {protocol:<11} "
                                      f"{cell.requests_per_s:9,.1f} req/s  p50 {cell.p50_ms:8.2f} ms  "
                                      f"p99 {cell.p99_ms:8.2f} ms  errors {cell.errors}", flush=True)
            finally:
                for server in servers:
                    server.stop()
    report["loadavg"].append(("end", loadavg()))
    report["seconds"] = time.monotonic() - started
    return report


# ---- the tables ---------------------------------------------------------------------------------------------------

def fmt_rate(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:,.1f}"


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}×" if a and b else "–"


def render(report: dict, args: argparse.Namespace) -> str:
    import onnxruntime

    cells, conns = report["cells"], args.connections
    durations = [round(x) for x in report["seconds_per_cell"].values()] or [0]
    lines = [
        f"Measured by `python bench/serving_load.py{' --write-docs' if args.write_docs else ''}` in one run "
        f"({report['seconds'] / 60:.1f} min) on {platform.machine()}, {os.cpu_count()} CPUs shared with other jobs "
        f"(load average 1/5/15 min: " + "; ".join(f"{k} {v}" for k, v in report["loadavg"]) + f"), onnxruntime "
        f"{onnxruntime.__version__}. ONNX Runtime threads: a single server process at ORT's default (one per core), "
        f"2 workers one each (`kompressor serve`'s rule, applied to the peers too); one extra row runs one worker "
        f"on one thread. Each cell is closed-loop load (every connection sends its next request when its answer "
        f"arrives) by `wrk` (REST) or `h2load` (gRPC), one generator thread, for {args.seconds:g} s, or longer "
        f"where one round of all connections takes long (4 rounds, up to {args.max_cell_seconds:g} s; cells ran "
        f"{min(durations):g}–{max(durations):g} s); {args.warmup:g} s of warm-up before a server's first cell; "
        f"between cells the server is left to go idle. requests/s and p50 / p99 latency are as the generator saw "
        f"them. Cells interleaved: for each connection count, every server in turn.",
        "",
        "Generator ceilings (64 connections, the small model's request, a server that does nothing): " + "; ".join(
            f"{k}: {v:,.0f} requests/s" for k, v in report["ceilings"].items()) + ". Every cell below is far under "
        "them, so the generator is not what limits a cell.",
        "",
    ]
    for key, title, batches in report["models"]:
        for batch in batches:
            lines += [f"### {title}, batch {batch}", "",
                      "| server | protocol | " + " | ".join(f"{c} conn: req/s · p50 · p99 ms" for c in conns) + " |",
                      "| --- | --- | " + " | ".join("---" for _ in conns) + " |"]
            labels = list(dict.fromkeys((s, p) for (k, b, s, p, c) in cells if k == key and b == batch))
            for server, protocol in labels:
                row = []
                for c in conns:
                    cell = cells.get((key, batch, server, protocol, c))
                    row.append(f"{fmt_rate(cell.requests_per_s)} · {cell.p50_ms:.1f} · {cell.p99_ms:.1f}"
                               + (f" ({cell.errors} errors)" if cell.errors else "") if cell else "–")
                lines.append(f"| {server} | {protocol} | " + " | ".join(row) + " |")
            floor = report["floor"].get((key, batch))
            if floor:
                lines.append(f"| in-process `session.run` loop (no HTTP; the floor) | – | "
                             f"{fmt_rate(floor.requests_per_s)} · {floor.p50_ms:.2f} · {floor.p99_ms:.2f} | "
                             + " | ".join("–" for _ in conns[1:]) + " |")
            lines.append("")
    lines += ratios(report, args), ""
    return "\n".join(lines)


def rate(cells: dict, key: str, batch: int, server: str, protocol: str, c: int) -> float | None:
    cell = cells.get((key, batch, server, protocol, c))
    return cell.requests_per_s if cell else None


def ratios(report: dict, args: argparse.Namespace) -> str:
    cells, top = report["cells"], max(args.connections)
    k1, k2, kb = K1, K2, KB
    lines = [f"### Ratios at {top} connections (requests/s of `kompressor serve` over the other)", "",
             "| model, batch | 2 workers / 1 (JSON · binary · gRPC) | 2 workers / 1 worker at 1 ORT thread (JSON) "
             "| 1 worker JSON / KServe 1 · MLServer 1 "
             "| 2 workers JSON / KServe 2 · MLServer 2 | best protocol, 2 workers / best peer | 1 worker JSON / bare "
             "aiohttp | binary · gRPC / JSON (1 worker) | dynamic batching: p99 / unbatched · req/s / unbatched |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    verdict = {"workers": [], "peers": [], "binary": [], "batching": []}
    for key, title, batches in report["models"]:
        for batch in batches:
            r = lambda s, p="REST JSON": rate(cells, key, batch, s, p, top)  # noqa: E731
            w = [ratio(r(k2, p), r(k1, p)) for p in ("REST JSON", "REST binary", "gRPC")]
            peers1 = [r("KServe, 1 worker"), r("MLServer, 1 parallel worker")]
            peers2 = [r("KServe, 2 workers"), r("MLServer, 2 parallel workers")]
            best_k = max(filter(None, [r(k2, p) for p in ("REST JSON", "REST binary", "gRPC")]), default=None)
            best_peer = max(filter(None, peers1 + peers2), default=None)
            proto = [ratio(r(k1, p), r(k1)) for p in ("REST binary", "gRPC")]
            batch_cell = report["cells"].get((key, batch, kb, "REST JSON", top))
            plain = report["cells"].get((key, batch, k1, "REST JSON", top))
            if batch_cell and plain:
                batching = (f"{batch_cell.p99_ms / plain.p99_ms:.2f}× · "
                            f"{ratio(batch_cell.requests_per_s, plain.requests_per_s)}")
                verdict["batching"].append((f"{key} b{batch}", batch_cell.p99_ms / plain.p99_ms))
            else:
                batching = "not measured" if not report["batching"] else "–"
            lines.append(f"| {key}, {batch} | {' · '.join(w)} | {ratio(r(k2), r(ONE_THREAD))} | "
                         f"{' · '.join(ratio(r(k1), p) for p in peers1)} | "
                         f"{' · '.join(ratio(r(k2), p) for p in peers2)} | {ratio(best_k, best_peer)} | "
                         f"{ratio(r(k1), r('bare aiohttp + session.run'))} | {' · '.join(proto)} | {batching} |")
            single = max(filter(None, [r(k1), r(ONE_THREAD)]), default=None)
            if single and r(k2):  # against the better single worker: its default threads or one thread
                verdict["workers"].append((f"{key} b{batch}", r(k2) / single))
            like = [r(k1) / p for p in peers1 if p and r(k1)] + [r(k2) / p for p in peers2 if p and r(k2)]
            if like:
                verdict["peers"].append((f"{key} b{batch}", min(like)))
            if batch > 1 and r(k1):
                verdict["binary"].append((f"{key} b{batch}", max(r(k1, p) / r(k1) for p in ("REST binary", "gRPC")
                                                                   if r(k1, p))))
    lines += ["", "### Targets (issue 13)", "", "| target | goal | measured | verdict |", "| --- | --- | --- | --- |"]

    def row(name: str, goal: str, values: list, good) -> None:
        if not values:
            lines.append(f"| {name} | {goal} | not measured | – |")
            return
        met = [v for _, v in values if good(v)]
        text = ", ".join(f"{k} {v:.2f}×" for k, v in values)
        verdict = ("met" if len(met) == len(values) else "missed" if not met
                   else f"met in {len(met)} of {len(values)}")
        lines.append(f"| {name} | {goal} | {text} | {verdict} |")

    row(f"throughput at {top} connections, REST JSON, 2 workers vs the better single worker (default threads "
        f"or 1)", f"≥ {TARGETS['workers']}×",
        verdict["workers"], lambda v: v >= TARGETS["workers"])
    row(f"vs KServe and MLServer, REST JSON at {top} connections, same worker count (the lower ratio)",
        f"≥ {TARGETS['peers']}×", verdict["peers"], lambda v: v >= TARGETS["peers"])
    row(f"REST binary or gRPC vs REST JSON at batch 32, {top} connections, 1 worker", f"≥ {TARGETS['binary']}×",
        verdict["binary"], lambda v: v >= TARGETS["binary"])
    row(f"dynamic batching p99 over unbatched p99, {top} connections, 1 worker", f"≤ {TARGETS['batching_p99']}×",
        verdict["batching"], lambda v: v <= TARGETS["batching_p99"])
    return "\n".join(lines)


def write_docs(text: str) -> None:
    section = f"{BEGIN}\n## Under load: against KServe and MLServer\n\n{text.rstrip()}\n\n{NOTES.strip()}\n{END}\n"
    doc = DOC.read_text() if DOC.exists() else "# Serving benchmark\n"
    if BEGIN in doc and END in doc:
        doc = doc[:doc.index(BEGIN)] + section + doc[doc.index(END) + len(END):].lstrip("\n")
    else:
        doc = doc.rstrip("\n") + "\n\n" + section
    DOC.write_text(doc)


NOTES = """
Notes on the load benchmark:

- Closed loop: with N connections there are at most N requests in flight, and the generator measures each
  request's time from send to answer. p99 at 64 connections is mostly queueing (64 requests waiting for one or two
  cores), so it grows with the time per request.
- The peers run a minimal ONNX Runtime model class written for this benchmark (bench/peers_serving/): KServe's
  `kserve.Model` with `predict` on `InferRequest` (its per-request access and latency logs off), MLServer's
  `MLModel` with `NumpyCodec` (`debug: false`, so no access log). Both are compared on REST JSON, the protocol
  all three share; `kompressor serve`'s binary and gRPC rows show what its other protocols add.
- MLServer's "parallel workers" are inference processes behind one HTTP process, so its 1-worker row already uses
  two processes; KServe's workers and `kompressor serve --workers` are whole servers sharing the port.
- How the targets are judged: workers, `--workers 2` against the better of the two single-worker rows (ORT's
  default threads, or one thread), on REST JSON; peers, REST JSON against REST JSON at the same worker count, the
  lower of the KServe and MLServer ratios; the "best protocol" column is what a client free to choose gRPC or
  binary tensors gets against the best peer row.
- MLServer parses JSON with orjson; the bare aiohttp server uses Python's `json` (as `kompressor serve` did until it moved to orjson), whose
  decoding is the largest single part of a batch-32 JSON request (25,088 numbers): likely where MLServer's REST
  JSON rows gain at batch 32. The binary and gRPC rows skip JSON for the tensors altogether.
- ORT's default in one process is one intra-op thread per core; on a machine whose load average is above its core
  count, a run likely waits for whichever of its threads was descheduled: the single-process rows at default
  threads fall behind the one-thread row under load, and most of what `--workers 2` gains over the default here
  is that, not a second core (with other jobs holding the cores, a second worker cannot count on one).
- The machine had 2 cores shared with other jobs (the load average is above): the absolute figures move between
  runs (the same cell can differ by 2× or more from one run to the next); the ratios, measured in one run with the cells
  interleaved, are what to read, and even they are noisy at this load.
"""


def main() -> int:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that the servers are stopped (finally) on SIGTERM
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3, help="measured seconds per cell")
    parser.add_argument("--warmup", type=float, default=1,
                        help="warm-up seconds per server and protocol (before its first cell)")
    parser.add_argument("--max-cell-seconds", type=float, default=20,
                        help="cap on a cell's duration (slow cells at many connections run longer than --seconds)")
    parser.add_argument("--connections", type=lambda s: [int(x) for x in s.split(",")], default=list(CONNECTIONS))
    parser.add_argument("--models", type=lambda s: s.split(","), default=["small", "heavy", "transformer"])
    parser.add_argument("--venvs", type=Path, default=DEFAULT_VENVS, help="where the peers' venvs live")
    parser.add_argument("--no-peers", action="store_true", help="only kompressor serve and the bare servers")
    parser.add_argument("--write-docs", action="store_true", help="write the section in docs/benchmarks/serving.md")
    args = parser.parse_args()
    text = render(run(args), args)
    print(text)
    if args.write_docs:
        write_docs(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
