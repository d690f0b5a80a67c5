"""`kompressor serve`: one artifact served with ONNX Runtime over the Open Inference Protocol v2 (REST).

The artifact's sha256 digests are verified before anything is served. The model version in
the URLs is the artifact's revision (``manifest.json`` ``revision``).

Endpoints (JSON; every error is ``{"error": "..."}`` with HTTP 400, 404 or 413):

- ``GET /v2`` server metadata; ``GET /v2/health/live``, ``GET /v2/health/ready``.
- ``GET /v2/models/{name}[/versions/{v}]`` model metadata (inputs and outputs as ONNX Runtime sees them);
  ``GET /v2/models/{name}[/versions/{v}]/ready``.
- ``POST /v2/models/{name}[/versions/{v}]/infer``: any batch; ``data`` flat (row-major) or nested, checked
  against ``shape``; ``id`` echoed; optional ``outputs`` selects outputs. Every numeric OIP datatype is
  accepted and converted to the model's input type when no value changes (integers to floats while exact,
  FP64 to FP32 while finite); BYTES, NaN/inf, wrong shapes and unknown inputs are refused with 400.
- ``POST /v2/repository/index``: the served model and its version.
- ``POST /v2/repository/models/{name}/load`` with
  ``{"parameters": {"artifact": "/abs/artifact/dir" | "file:///...", "sha256": "<expected model.onnx digest>"}}``:
  hot swap. The new artifact is verified (against ``sha256`` too, when given), loaded into a new session
  and warmed up; then the server switches to it in one assignment. Requests already running finish on
  the old session; none is dropped. On any problem the answer is 400 and the old model keeps serving.
  The embedded runner uses this for promotion and rollback.
- ``GET /metrics``: Prometheus (requests, errors, latency and batch-size histograms, labelled by model
  and revision; serving revision; swaps; captured and dropped capture rows).

With ``--capture DIR`` the inputs of every successful request are appended to rolling files there (see
``kompressor_jobs.capture``) for ``kompressor watch-drift``; capture never blocks a request.
"""

from __future__ import annotations

import argparse


def main(args: argparse.Namespace) -> int:
    from aiohttp import web

    from kompressor.console import log
    from kompressor.errors import UserError
    from kompressor_jobs.serve.app import InferenceServer
    from kompressor_jobs.serve.model import LoadedModel

    if args.max_body_bytes < 1 or args.capture_max_bytes < 1:
        raise UserError("--max-body-bytes and --capture-max-bytes must be positive")
    model = LoadedModel(args.artifact)
    model.warm_up()
    try:
        server = InferenceServer(args.name, model, capture=args.capture, capture_max_bytes=args.capture_max_bytes,
                                 max_body_bytes=args.max_body_bytes)
    except OSError as err:
        raise UserError(f"--capture {args.capture}: cannot write there: {err}") from None
    log("serving", model=args.name, revision=model.revision, sha256=model.sha256, host=args.host, port=args.port,
        capture=args.capture)
    try:
        web.run_app(server.app(), host=args.host, port=args.port, print=None, access_log=None)
    except OSError as err:
        raise UserError(f"cannot listen on {args.host}:{args.port}: {err}") from None
    return 0
