"""`kompressor serve`: one artifact served with ONNX Runtime over the Open Inference Protocol v2, REST and
(with ``--grpc-port``) gRPC.

The artifact's sha256 digests are verified before anything is served. The model version in
the URLs is the artifact's revision (``manifest.json`` ``revision``).

Endpoints (JSON; every error is ``{"error": "..."}`` with HTTP 400, 404, 408 or 413):

- ``GET /v2`` server metadata; ``GET /v2/health/live``, ``GET /v2/health/ready``.
- ``GET /v2/models/{name}[/versions/{v}]`` model metadata (inputs and outputs as ONNX Runtime sees them);
  ``GET /v2/models/{name}[/versions/{v}]/ready``.
- ``POST /v2/models/{name}[/versions/{v}]/infer``: any batch; ``data`` flat (row-major) or nested, checked
  against ``shape``; ``id`` echoed; optional ``outputs`` selects outputs. Every numeric OIP datatype is
  accepted and converted to the model's input type when no value changes (integers to floats while exact,
  FP64 to FP32 while finite); BYTES, NaN/inf, wrong shapes and unknown inputs are refused with 400.
  The binary tensor extension (Triton's): with an ``Inference-Header-Content-Length: N`` header, the first
  N bytes of the body are the JSON and the rest the raw tensors of the inputs whose ``parameters`` give a
  ``binary_data_size`` (little-endian, row-major, in input order); outputs come back binary where the
  output's ``parameters.binary_data`` (default: the request's ``parameters.binary_data_output``) is true,
  the answer then being the JSON, its length in ``Inference-Header-Content-Length``, and the bytes.
- ``POST /v2/repository/index``: the served model and its version.
- ``POST /v2/repository/models/{name}/load`` with
  ``{"parameters": {"artifact": "/abs/artifact/dir" | "file:///...", "sha256": "<expected model.onnx digest>"}}``:
  hot swap. The new artifact is verified (against ``sha256`` too, when given), loaded into a new session
  and warmed up; then the server switches to it in one assignment. Requests already running finish on
  the old session; none is dropped. On any problem the answer is 400 and the old model keeps serving.
  The embedded runner uses this for promotion and rollback.
- ``GET /metrics``: Prometheus (requests, errors, latency and batch-size histograms, labelled by model
  and revision; serving revision; swaps; captured and dropped capture rows).

With ``--grpc-port PORT`` the same model is served over gRPC too (``inference.GRPCInferenceService``, see
``kompressor_jobs.serve.grpc_server``): one process, one event loop, one model, one capture, one set of
metrics (``protocol`` label ``rest`` or ``grpc``).

With ``--workers N`` (0: one per CPU of the container's limit) N server processes share the ports
(SO_REUSEPORT) under a supervisor that owns the capture; a hot swap reaches every worker or none, and
/metrics sums them all (see ``kompressor_jobs.serve.workers``).

With ``--max-batch-size N`` (N > 1) concurrent requests are merged into ONNX Runtime runs of up to N rows, each
waiting at most ``--max-batch-delay-ms`` for others (see ``kompressor_jobs.serve.batching``); answers, capture
and request metrics stay per request.

Slow or oversized REST requests: a body must arrive within ``--body-timeout-seconds`` of its head (else 408 and
the connection is closed); a connection with no complete request head for ``--header-timeout-seconds`` (slow
headers, or idle keep-alive) is closed; a body over ``--max-body-bytes`` gets 413, and one far over it (or a
Content-Length that says so) is refused without being read.

With ``--feedback`` (or ``--feedback-token-file PATH``, which then requires ``Authorization: Bearer <token>``)
``POST /v2/models/{name}/feedback`` takes true labels for recent requests by their ``id`` (assigned and returned
when the client sent none) and exports the online accuracy per revision (see ``kompressor_jobs.serve.feedback``);
``GET /v2/models/{name}/feedback/windows`` gives the labelled rows per revision in disjoint windows of
``--feedback-window`` (``{"instance", "size", "revisions": {"<revision>": {"completed", "filling", "windows":
[{"index", "right"}]}}}``), which the drift watcher judges one by one. It needs ``--workers 1``.

The online stage (the ``online_stage`` extension; see ``kompressor_jobs.serve.online``): a candidate revision
run beside the served one on live traffic and measured against it, in one of two modes. **shadow**: every
successful request is also run on the candidate, off the request path (a queue of ``--mirror-queue`` requests; a
copy that finds it full is dropped and counted); clients always get the served revision's answer. **canary** at
``weight`` percent: exactly that share of requests (a deterministic splitter, not a draw) is answered by the
candidate (its outputs and ``model_version``), and the served model runs on a copy of each of those, in the
background. Both compare the first outputs row by row (``--task``: top-1 for classification, cosine for
embeddings, relative closeness for regression), time both ONNX Runtime runs and, with ``--feedback``, count the
labels of either revision's predictions. It needs ``--workers 1`` (the candidate and its counts live in one
process). Set at start with ``--candidate DIR_OR_FILE_URI`` (``--candidate-sha256``, ``--candidate-mode``,
``--candidate-weight``; one that cannot be loaded is logged and reported as ``candidate_error`` in the
evidence while the served model is served alone) or live:

- ``POST /v2/repository/models/{name}/candidate`` with ``{"parameters": {"artifact": ..., "sha256": ..., "mode":
  "shadow" | "canary", "weight": <percent>}}`` (sha256 optional; mode shadow and weight 0 unless given) sets or
  replaces it (verified, loaded and warmed up as ``load`` does; another revision than the served one, with the
  same inputs and outputs); the same artifact in the same mode again changes only the weight and keeps the
  counts. 400 on any problem, the old state kept. Answers ``{"candidate": <evidence>}``.
- ``DELETE /v2/repository/models/{name}/candidate``: none any more (``{"candidate": null}``). A hot swap to the
  candidate's revision (a promotion) ends it too.
- ``GET /v2/models/{name}/online``: ``{"instance", "serving": {"revision"}, "candidate": null | {"revision",
  "sha256", "mode", "weight", "requests", "errors", "dropped", "compared", "agreement", "labels", "right",
  "serving_labels", "serving_right", "latency_buckets", "candidate_latency", "serving_latency", "since"}}``,
  counts since the candidate was set in this process; /metrics has them too (``kompressor_online_*``).

With ``--capture DIR`` the inputs of every successful request are appended to rolling files there (see
``kompressor_jobs.capture``) for ``kompressor watch-drift``; capture never blocks a request.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal


def main(args: argparse.Namespace) -> int:
    from kompressor.errors import UserError

    grpc_port = getattr(args, "grpc_port", None) or 0
    workers = getattr(args, "workers", 1)
    if args.max_body_bytes < 1 or args.capture_max_bytes < 1:
        raise UserError("--max-body-bytes and --capture-max-bytes must be positive")
    if not 0 <= grpc_port <= 65535 or (grpc_port and grpc_port == args.port):
        raise UserError(f"--grpc-port must be a port other than --port ({args.port}), got {grpc_port}")
    if workers < 0:
        raise UserError(f"--workers must be 0 (one per CPU of the limit) or more, got {workers}")
    if getattr(args, "max_batch_size", 0) < 0 or getattr(args, "max_batch_delay_ms", 0) < 0:
        raise UserError("--max-batch-size and --max-batch-delay-ms must be 0 or more")
    if getattr(args, "body_timeout_seconds", 1) <= 0 or getattr(args, "header_timeout_seconds", 1) <= 0:
        raise UserError("--body-timeout-seconds and --header-timeout-seconds must be positive")
    if workers == 0:
        from kompressor_jobs.serve.workers import auto_workers

        args.workers = workers = auto_workers()
    if _feedback_on(args) and workers > 1 and not getattr(args, "worker_control", None):
        raise UserError(f"--feedback needs one server process, got --workers {workers}: each worker remembers only "
                        f"the requests it answered, so a label landing on another worker would be refused; serve "
                        f"with --workers 1 (and scale with replicas)")
    if getattr(args, "candidate", None) and workers > 1 and not getattr(args, "worker_control", None):
        raise UserError(f"--candidate needs --workers 1, got --workers {workers}: the candidate and its counts live "
                        f"in one server process; serve with --workers 1 (and scale with replicas)")
    if getattr(args, "mirror_queue", 1) < 1:
        raise UserError(f"--mirror-queue must be positive, got {args.mirror_queue}")
    if getattr(args, "worker_control", None):
        return _worker(args, grpc_port)
    if workers > 1:
        from kompressor_jobs.serve.workers import supervise

        return supervise(args)
    return _single(args, grpc_port)


def _single(args: argparse.Namespace, grpc_port: int) -> int:
    from kompressor.console import log
    from kompressor.errors import UserError
    from kompressor_jobs.serve.app import InferenceServer
    from kompressor_jobs.serve.model import LoadedModel

    model = LoadedModel(args.artifact)
    model.warm_up()
    try:
        server = InferenceServer(args.name, model, capture=args.capture, capture_max_bytes=args.capture_max_bytes,
                                 **_server_options(args))
    except OSError as err:
        raise UserError(f"--capture {args.capture}: cannot write there: {err}") from None
    if getattr(args, "candidate", None):
        _set_candidate(server, args)
    log("serving", model=args.name, revision=model.revision, sha256=model.sha256, host=args.host, port=args.port,
        grpc_port=grpc_port or None, capture=args.capture, max_batch_size=getattr(args, "max_batch_size", 0) or None)
    asyncio.run(_serve(server, args.host, args.port, grpc_port, header_timeout=_header_timeout(args)))
    return 0


def _server_options(args: argparse.Namespace) -> dict:
    """InferenceServer's settings from the command line (one server, or each worker)."""
    from kompressor.api import defaults as d

    from kompressor_jobs.serve.feedback import read_token

    token_file = getattr(args, "feedback_token_file", None)
    return {"max_body_bytes": args.max_body_bytes, "max_batch_size": getattr(args, "max_batch_size", 0),
            "max_batch_delay_ms": getattr(args, "max_batch_delay_ms", d.SERVING_BATCH_MAX_DELAY_MS),
            "body_timeout_seconds": getattr(args, "body_timeout_seconds", d.SERVING_BODY_TIMEOUT_SECONDS),
            "feedback": _feedback_on(args), "feedback_token": read_token(token_file) if token_file else None,
            "feedback_window": getattr(args, "feedback_window", d.SERVING_FEEDBACK_WINDOW),
            "feedback_max_requests": getattr(args, "feedback_max_requests", d.SERVING_FEEDBACK_MAX_REQUESTS),
            "task": getattr(args, "task", d.MODEL_TASK), "mirror_queue": getattr(args, "mirror_queue",
                                                                              d.SERVING_MIRROR_QUEUE)}


def _set_candidate(server, args: argparse.Namespace) -> None:
    """--candidate: verified, loaded and warmed up, beside the served model. A bad mode or weight is a UserError
    naming the flag; a candidate that cannot be loaded is logged and reported in the evidence
    (``candidate_error``), and the served model is served alone: a bad candidate must not take serving down."""
    from pathlib import Path

    from kompressor.console import log
    from kompressor.errors import UserError
    from kompressor_jobs.serve import online
    from kompressor_jobs.serve.model import LoadedModel

    where = args.candidate
    try:
        if where.startswith(("file://", "pvc://")):
            from kompressor.store import resolve_local

            where = resolve_local(where)
        mode, weight = online.check_settings(args.candidate_mode, args.candidate_weight)
    except UserError as err:
        raise UserError(f"--candidate {args.candidate}: {err}") from None
    try:
        model = LoadedModel(Path(where), args.candidate_sha256)
        model.warm_up()
        online.check_compatible(model, server.model)
    except UserError as err:
        log("candidate refused", level="error", candidate=args.candidate, error=str(err))
        server.online.refused = {"sha256": args.candidate_sha256, "mode": mode, "weight": weight,
                                 "error": f"--candidate {args.candidate}: {err}"}
        return
    server.online.set(model, mode, weight)


def _feedback_on(args: argparse.Namespace) -> bool:
    """--feedback, or a --feedback-token-file (which implies it)."""
    return bool(getattr(args, "feedback", False) or getattr(args, "feedback_token_file", None))


def _header_timeout(args: argparse.Namespace) -> float:
    from kompressor.api import defaults as d

    return getattr(args, "header_timeout_seconds", d.SERVING_HEADER_TIMEOUT_SECONDS)


def _worker(args: argparse.Namespace, grpc_port: int) -> int:
    """One of --workers N processes (started by the supervisor, kompressor_jobs.serve.workers)."""
    from pathlib import Path

    from kompressor.console import log
    from kompressor_jobs.serve import workers as w
    from kompressor_jobs.serve.app import InferenceServer
    from kompressor_jobs.serve.model import LoadedModel

    control = Path(args.worker_control)
    artifact, sha256 = w.current_artifact(control, args.artifact)
    model = LoadedModel(artifact, sha256)
    model.warm_up()
    sink = w.CaptureForwarder(control / w.CAPTURE_SOCKET) if args.capture else None
    peers = w.Peers(control, args.workers, args.worker_index)
    server = InferenceServer(args.name, model, capture_sink=sink, peers=peers, **_server_options(args))
    if sink is not None:
        sink.on_drop = lambda rows, reason: server.metrics.capture_dropped.labels(args.name, reason).inc(rows)
    log("serving worker", model=args.name, worker=args.worker_index, revision=model.revision, pid=os.getpid(),
        ort_threads=model.threads)
    asyncio.run(_serve(server, args.host, args.port, grpc_port, worker=(peers, w.worker_socket(control,
                                                                                             args.worker_index)),
                       header_timeout=_header_timeout(args)))
    return 0


async def _serve(server, host: str, port: int, grpc_port: int, worker=None, header_timeout: float = 75.0) -> None:
    """REST (aiohttp) and, when asked, gRPC (grpc.aio) on one event loop, until SIGTERM or SIGINT. ``worker``:
    (peers, control socket) of one of several workers: the ports are shared (SO_REUSEPORT), the control endpoints
    listen on the socket, and the worker stops with its supervisor. ``header_timeout``: aiohttp's keep-alive
    timeout, which also closes a connection whose request head has not fully arrived by then (slow headers)."""
    from aiohttp import web

    from kompressor.errors import UserError

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    app = server.app()
    if worker is not None:
        from kompressor_jobs.serve.workers import WORKER_HEADER, watch_parent

        index = str(worker[1].stem.rpartition("-")[2])

        async def name_the_worker(request, response):
            response.headers[WORKER_HEADER] = index

        app.on_response_prepare.append(name_the_worker)
        watch_parent(stop)
    runners = [web.AppRunner(app, access_log=None, handle_signals=False, keepalive_timeout=header_timeout)]
    rpc = None
    try:
        await runners[0].setup()
        if grpc_port:  # gRPC first: once REST answers ready, both do
            from kompressor_jobs.serve.grpc_server import grpc_server

            try:
                rpc = grpc_server(server, host, grpc_port, server.max_body_bytes, reuse_port=worker is not None)
            except OSError as err:
                raise UserError(f"--grpc-port: {err}") from None
            await rpc.start()
        try:
            await web.TCPSite(runners[0], host, port, reuse_port=worker is not None).start()
        except OSError as err:
            raise UserError(f"cannot listen on {host}:{port}: {err}") from None
        if worker is not None:  # the control socket last: the supervisor counts a worker started once it exists
            peers, path = worker
            runners.append(web.AppRunner(peers.control_app(server), access_log=None, handle_signals=False))
            await runners[1].setup()
            await web.UnixSite(runners[1], str(path)).start()
        await stop.wait()
    finally:
        if rpc is not None:
            await rpc.stop(grace=5)
        for runner in reversed(runners):
            await runner.cleanup()  # the main app's cleanup closes the capture after the last request
