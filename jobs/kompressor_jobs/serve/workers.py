"""`kompressor serve --workers N`: N server processes sharing the REST (and gRPC) port, so that every core serves.

- The **supervisor** (the process started as ``kompressor serve``) verifies the artifact, starts N workers, restarts
  one that exits, and on SIGTERM stops them all. It owns the capture folder: one writer (``CaptureWriter``), so the
  capture keeps one row sequence and the drift watcher reads it unchanged.
- Each **worker** is a full server (``InferenceServer``: REST, gRPC, validation, metrics) binding the ports with
  SO_REUSEPORT, so the kernel spreads connections over the workers. Its captured rows go to the supervisor over a
  Unix socket, off the request path (a bounded queue; rows that do not fit are dropped and counted, as before).
- **Metrics**: every process writes to ``$PROMETHEUS_MULTIPROC_DIR``; ``/metrics`` on any worker shows the sum over
  all of them (prometheus_client's multiprocess mode).
- **Hot swap**: ``POST /v2/repository/models/{name}/load`` lands on one worker, which coordinates all of them under a
  file lock, in two phases: every worker loads and warms the new artifact (prepare); only when all succeeded does
  the coordinator record it (a worker restarted later starts on it), mark the capture's serving stint through the
  supervisor, and tell every worker to switch (commit). If any worker fails to prepare, all drop the new model and
  the answer is 400: no worker serves another revision than the others. Requests in flight finish on the model
  they started on, in every worker.
- **Threads**: each worker runs ONNX Runtime on ``threads // N`` threads (at least one), where ``threads`` is what
  one server would use ($KOMPRESSOR_ORT_THREADS, else the Pod's CPU limit, else the cores): workers and threads do
  not oversubscribe the CPUs.

The supervisor and workers talk over Unix sockets in a private control folder (mode 0700), removed at exit.
"""

from __future__ import annotations

import asyncio
import fcntl
import io
import json
import os
import queue as queues
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np

from kompressor.console import log
from kompressor.errors import UserError

CAPTURE_SOCKET = "capture.sock"
SUPERVISOR_SOCKET = "supervisor.sock"
CURRENT_FILE = "current.json"  # the artifact every worker serves (written by a swap, read by a restarted worker)
LOCK_FILE = "swap.lock"
METRICS_FOLDER = "metrics"
WORKER_HEADER = "Kompressor-Worker"  # REST answers name the worker that served them
RESTART_BACKOFF_SECONDS = (0.5, 1, 2, 5, 10)
SWAP_TIMEOUT_SECONDS = 600
QUEUE_REQUESTS = 4096


def worker_socket(control: Path, index: int) -> Path:
    return control / f"worker-{index}.sock"


def worker_threads(workers: int) -> int:
    """ONNX Runtime threads per worker: the threads one server would use (the rule of
    kompressor_jobs.runtime.ort_threads; without any limit, one per core) shared out, at least one each."""
    from kompressor_jobs.runtime import ort_threads

    return max(1, (ort_threads() or os.cpu_count() or 1) // workers)


def auto_workers() -> int:
    """``--workers 0``: one worker per CPU of the container's limit (rounded down); one without a limit (then ONNX
    Runtime uses every core in one process, as before)."""
    from kompressor_jobs.runtime import cgroup_cpu_limit

    limit = cgroup_cpu_limit()
    return max(1, int(limit)) if limit else 1


# ---- capture rows, worker -> supervisor -----------------------------------------------------------------

def encode_rows(inputs: dict[str, np.ndarray], revision: int, outputs: dict[str, np.ndarray] | None) -> bytes:
    """One request's captured arrays as a frame: header length (4 bytes), JSON header, .npy blobs (no pickles)."""
    blobs, header = [], {"revision": revision, "inputs": [], "outputs": None if outputs is None else []}
    for side, arrays in (("inputs", inputs), ("outputs", outputs or {})):
        for name, array in arrays.items():
            buf = io.BytesIO()
            np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
            header[side].append([name, buf.tell()])
            blobs.append(buf.getvalue())
    head = json.dumps(header).encode()
    return b"".join([len(head).to_bytes(4, "big"), head, *blobs])


async def read_rows(reader: asyncio.StreamReader) -> tuple[dict, int, dict | None]:
    header = json.loads(await reader.readexactly(int.from_bytes(await reader.readexactly(4), "big")))
    arrays: dict[str, dict] = {"inputs": {}, "outputs": {}}
    for side in ("inputs", "outputs"):
        for name, size in header[side] or []:
            arrays[side][name] = np.load(io.BytesIO(await reader.readexactly(size)), allow_pickle=False)
    return arrays["inputs"], header["revision"], (arrays["outputs"] if header["outputs"] is not None else None)


class CaptureForwarder:
    """A worker's capture: ``submit`` never blocks; a thread sends the rows to the supervisor, which writes them.
    Serving stints are marked by the swap coordinator through the supervisor (in order with every worker's rows),
    so ``start_serving`` does nothing here."""

    def __init__(self, path: Path, on_drop=None, queue_size: int = QUEUE_REQUESTS):
        self.path = path
        self.on_drop = on_drop or (lambda rows, reason: None)
        self._queue: queues.Queue = queues.Queue(maxsize=queue_size)
        self._sock: socket.socket | None = None
        self._thread = threading.Thread(target=self._run, name="capture-forwarder", daemon=True)
        self._thread.start()

    def submit(self, rows: dict, revision: int, outputs: dict | None = None) -> bool:
        try:
            self._queue.put_nowait((rows, revision, outputs))
            return True
        except queues.Full:
            self.on_drop(len(next(iter(rows.values()))), "queue_full")
            return False

    def start_serving(self, revision: int) -> None:
        pass

    def close(self) -> None:
        done = threading.Event()
        try:
            self._queue.put((None, done, None), timeout=10)
            done.wait(10)
        except queues.Full:
            pass
        if self._sock is not None:
            self._sock.close()

    def _run(self) -> None:
        while True:
            rows, revision, outputs = self._queue.get()
            if rows is None:
                revision.set()
                return
            try:
                if self._sock is None:
                    self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    self._sock.connect(str(self.path))
                self._sock.sendall(encode_rows(rows, revision, outputs))
            except OSError as err:
                if self._sock is not None:
                    self._sock.close()
                self._sock = None
                self.on_drop(len(next(iter(rows.values()))), "write_error")
                log("capture forwarding failed", level="warning", error=str(err))


# ---- the swap across workers ------------------------------------------------------------------------------

class Peers:
    """A worker's view of its siblings: coordinates a hot swap over all of them, and answers theirs."""

    def __init__(self, control: Path, workers: int, index: int):
        self.control, self.workers, self.index = control, workers, index
        self.pending: dict[str, object] = {}  # prepared models by swap token

    async def swap(self, folder: Path, sha256: str | None) -> dict:
        """Swap every worker to the artifact in ``folder``, or none (UserError with the first worker's reason)."""
        loop = asyncio.get_running_loop()
        lock = open(self.control / LOCK_FILE, "a+")
        try:
            await loop.run_in_executor(None, fcntl.flock, lock, fcntl.LOCK_EX)  # one swap at a time, all workers
            token = uuid.uuid4().hex
            body = {"token": token, "artifact": str(folder), "sha256": sha256}
            prepared = await asyncio.gather(*(self._call(i, "prepare", body) for i in range(self.workers)))
            failed = [(i, out) for i, (status, out) in enumerate(prepared) if status != 200]
            if failed:
                await asyncio.gather(*(self._call(i, "abort", {"token": token}) for i in range(self.workers)))
                i, out = failed[0]
                raise UserError(out.get("error") or f"worker {i} failed to load the artifact")
            new = prepared[0][1]
            current = self.control / CURRENT_FILE
            tmp = current.with_suffix(".tmp")
            tmp.write_text(json.dumps({"artifact": str(folder), "sha256": new["sha256"]}))
            tmp.replace(current)
            await self._call_supervisor("stint", {"revision": new["revision"]})
            committed = await asyncio.gather(*(self._call(i, "commit", {"token": token, "sha256": new["sha256"]})
                                               for i in range(self.workers)))
            for i, (status, out) in enumerate(committed):
                if status != 200:  # it died meanwhile: restarted, it starts on current.json
                    log("hot swap: a worker did not confirm", level="warning", worker=i, error=out.get("error"))
            return new
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
            lock.close()

    async def _call(self, index: int, action: str, body: dict) -> tuple[int, dict]:
        return await _post(worker_socket(self.control, index), action, body)

    async def _call_supervisor(self, action: str, body: dict) -> None:
        status, out = await _post(self.control / SUPERVISOR_SOCKET, action, body)
        if status != 200:
            raise UserError(f"the serving supervisor refused {action}: {out.get('error')}")

    def control_app(self, server):
        """The worker's control endpoints (on its Unix socket only): prepare, commit, abort."""
        from aiohttp import web

        from kompressor_jobs.serve.app import load_model

        async def prepare(request):
            body = await request.json()
            try:
                model = await load_model(Path(body["artifact"]), body.get("sha256"))
            except UserError as err:
                return web.json_response({"error": str(err)}, status=400)
            self.pending = {body["token"]: model}  # swaps are one at a time: an older one's coordinator died
            return web.json_response({"version": model.version, "revision": model.revision, "sha256": model.sha256})

        async def commit(request):
            body = await request.json()
            model = self.pending.pop(body["token"], None)
            if model is not None:
                server.switch(model)
            elif server.model.sha256 != body.get("sha256"):
                return web.json_response({"error": "nothing prepared for this swap"}, status=409)
            return web.json_response({"version": server.model.version})

        async def abort(request):
            self.pending.pop((await request.json())["token"], None)
            return web.json_response({})

        app = web.Application()
        app.router.add_post("/prepare", prepare)
        app.router.add_post("/commit", commit)
        app.router.add_post("/abort", abort)
        return app


async def _post(path: Path, action: str, body: dict) -> tuple[int, dict]:
    import aiohttp

    try:
        async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(path)),
                                         timeout=aiohttp.ClientTimeout(total=SWAP_TIMEOUT_SECONDS)) as http:
            async with http.post(f"http://localhost/{action}", json=body) as response:
                return response.status, await response.json()
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError) as err:
        return 503, {"error": f"{path.name} unreachable: {err}"}


# ---- a worker ---------------------------------------------------------------------------------------------

def current_artifact(control: Path, default: str) -> tuple[str, str | None]:
    """(artifact folder, expected sha256) a worker starts on: the last swap's, else the command line's."""
    try:
        state = json.loads((control / CURRENT_FILE).read_text())
        return state["artifact"], state["sha256"]
    except (OSError, ValueError, KeyError):
        return default, None


def watch_parent(stop: asyncio.Event) -> None:
    """Stop this worker when its supervisor is gone (a worker never outlives it)."""
    parent = os.getppid()

    async def poll():
        while not stop.is_set():
            if os.getppid() != parent:
                log("serving supervisor gone; worker stops", level="warning")
                stop.set()
            await asyncio.sleep(1)

    asyncio.get_running_loop().create_task(poll())


# ---- the supervisor ---------------------------------------------------------------------------------------

def supervise(args) -> int:
    """Run ``args.workers`` workers until SIGTERM/SIGINT; the capture writer lives here."""
    from kompressor.store import verify_artifact

    manifest = verify_artifact(Path(args.artifact))  # fail fast (exit 2), before any worker starts
    control = Path(tempfile.mkdtemp(prefix="kompressor-serve-"))
    (control / METRICS_FOLDER).mkdir()
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(control / METRICS_FOLDER)  # before prometheus_client is imported
    os.environ["KOMPRESSOR_ORT_THREADS"] = str(worker_threads(args.workers))  # what the workers inherit
    try:
        return asyncio.run(_supervise(args, control, manifest.get("revision", 0)))
    finally:
        shutil.rmtree(control, ignore_errors=True)


async def _supervise(args, control: Path, revision: int) -> int:
    from aiohttp import web

    from kompressor_jobs.capture import CaptureWriter
    from kompressor_jobs.serve.metrics import ServerMetrics

    metrics = ServerMetrics()
    writer = None
    if args.capture:
        try:
            writer = CaptureWriter(
                args.capture, args.capture_max_bytes,
                on_drop=lambda rows, reason: metrics.capture_dropped.labels(args.name, reason).inc(rows),
                on_write=lambda rows: metrics.captured.labels(args.name).inc(rows))
        except OSError as err:
            raise UserError(f"--capture {args.capture}: cannot write there: {err}") from None
        writer.start_serving(revision)

    async def rows_from_a_worker(reader, writer_stream):
        try:
            while True:
                inputs, row_revision, outputs = await read_rows(reader)
                if writer is not None:
                    writer.submit(inputs, row_revision, outputs=outputs)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer_stream.close()

    async def stint(request):
        if writer is not None:  # queued before any row of the new revision: every worker commits after this
            writer.start_serving(int((await request.json())["revision"]))
        return web.json_response({})

    rows_server = await asyncio.start_unix_server(rows_from_a_worker, path=str(control / CAPTURE_SOCKET))
    control_app = web.Application()
    control_app.router.add_post("/stint", stint)
    runner = web.AppRunner(control_app, access_log=None, handle_signals=False)
    await runner.setup()
    await web.UnixSite(runner, str(control / SUPERVISOR_SOCKET)).start()

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log("serving supervisor", model=args.name, workers=args.workers, port=args.port,
        grpc_port=getattr(args, "grpc_port", 0) or None, ort_threads_per_worker=os.environ["KOMPRESSOR_ORT_THREADS"])
    procs: dict[int, asyncio.subprocess.Process] = {}
    code = 0
    try:
        for i in range(args.workers):
            procs[i] = await _start_worker(args, control, i)
        code = await _started(procs, control, stop)
        if code == 0:
            log("serving workers ready", model=args.name, workers=args.workers,
                pids=[p.pid for p in procs.values()])
            await _keep_running(args, control, procs, stop)
    finally:
        await _stop_workers(procs)
        rows_server.close()
        await rows_server.wait_closed()
        await runner.cleanup()
        if writer is not None:
            await loop.run_in_executor(None, writer.close)
    return code


async def _start_worker(args, control: Path, index: int) -> asyncio.subprocess.Process:
    argv = [sys.executable, "-m", "kompressor.cli", *(["--json-logs"] if getattr(args, "json_logs", False) else []),
            "serve", "--artifact", str(args.artifact), "--name", args.name, "--host", args.host,
            "--port", str(args.port), "--max-body-bytes", str(args.max_body_bytes),
            "--workers", str(args.workers), "--worker-control", str(control), "--worker-index", str(index)]
    if getattr(args, "grpc_port", 0):
        argv += ["--grpc-port", str(args.grpc_port)]
    for flag in ("max_batch_size", "max_batch_delay_ms", "body_timeout_seconds", "header_timeout_seconds"):
        if getattr(args, flag, None) is not None:
            argv += ["--" + flag.replace("_", "-"), str(getattr(args, flag))]
    if args.capture:
        argv += ["--capture", str(args.capture)]
    worker_socket(control, index).unlink(missing_ok=True)
    return await asyncio.create_subprocess_exec(*argv)


async def _started(procs: dict, control: Path, stop: asyncio.Event) -> int:
    """0 once every worker listens on its control socket; a worker's exit code if one exits first."""
    while not all(worker_socket(control, i).exists() for i in procs):
        for proc in procs.values():
            if proc.returncode is not None:
                log("a serving worker failed to start", level="error", exit_code=proc.returncode)
                return proc.returncode or 1
        if stop.is_set():
            return 0
        await asyncio.sleep(0.05)
    return 0


async def _keep_running(args, control: Path, procs: dict, stop: asyncio.Event) -> None:
    from prometheus_client import multiprocess

    restarts = {i: 0 for i in procs}
    while not stop.is_set():
        waits = {asyncio.ensure_future(p.wait()): i for i, p in procs.items()}
        stopping = asyncio.ensure_future(stop.wait())
        done, _ = await asyncio.wait([*waits, stopping], return_when=asyncio.FIRST_COMPLETED)
        for task in waits:
            task.cancel()
        if stop.is_set():
            stopping.cancel()
            return
        stopping.cancel()
        for task in done:
            if task not in waits:
                continue
            i = waits[task]
            old = procs[i]
            multiprocess.mark_process_dead(old.pid)
            delay = RESTART_BACKOFF_SECONDS[min(restarts[i], len(RESTART_BACKOFF_SECONDS) - 1)]
            log("serving worker exited; restarting", level="warning", worker=i, pid=old.pid,
                exit_code=old.returncode, in_seconds=delay)
            restarts[i] += 1
            await asyncio.sleep(delay)
            procs[i] = await _start_worker(args, control, i)


async def _stop_workers(procs: dict) -> None:
    for proc in procs.values():
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 20
    for proc in procs.values():
        try:
            await asyncio.wait_for(proc.wait(), max(0.1, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()
