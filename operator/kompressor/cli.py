"""The `kompressor` command.

Every subcommand's flags are declared here, but its code is imported only when it runs:
`kompressor operator` never imports torch, and `kompressor --help` stays fast.
Each implementation is a function ``main(args: argparse.Namespace) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from kompressor import __version__
from kompressor.api import defaults as d

COMMANDS = {
    "prune": "kompressor_jobs.compress.command:main",
    "evaluate": "kompressor_jobs.evaluate.command:main",
    "serve": "kompressor_jobs.serve:main",
    "watch-drift": "kompressor_jobs.drift:main",
    "operator": "kompressor.k8s.main:main",
    "run": "kompressor.embedded.main:main",
    "demo": "kompressor.embedded.demo:main",
    "crd": "kompressor.cli:print_crd",
    "validate": "kompressor.cli:validate",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kompressor",
        description="Continuous model compression and drift control: compress, gate, serve, watch, react.",
    )
    parser.add_argument("--version", action="version", version=f"kompressor {__version__}")
    parser.add_argument("--json-logs", action="store_true", help="log one JSON object per line")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("prune", help="compress a model and export an ONNX artifact with a manifest")
    p.add_argument("--spec", required=True, help="CompressedModel manifest (YAML)")
    p.add_argument("--out", required=True, help="artifact folder to write (model.onnx, manifest.json)")
    p.add_argument("--revision", type=int, default=1, help="revision number recorded in the manifest")
    p.add_argument("--retrain", action="store_true", help="fine-tune on spec.data.retrain instead of data.train")
    p.add_argument("--baseline-cache", help="folder where the uncompressed baseline ONNX is exported once per "
                   "source-model digest (default: $KOMPRESSOR_CACHE/baselines)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="where to prune and fine-tune (auto: CUDA when available)")

    p = sub.add_parser("evaluate", help="measure a candidate against the baseline and check the gates")
    p.add_argument("--spec", required=True, help="CompressedModel manifest (YAML)")
    p.add_argument("--candidate", required=True, help="artifact folder written by `kompressor prune`")
    p.add_argument("--out", required=True, help="folder for metrics.json and the model card")

    p = sub.add_parser("serve", help="serve an artifact over Open Inference Protocol v2 with ONNX Runtime")
    p.add_argument("--artifact", required=True, help="artifact folder (model.onnx, manifest.json)")
    p.add_argument("--name", required=True, help="model name in the OIP v2 URLs")
    p.add_argument("--port", type=int, default=d.SERVING_PORT)
    p.add_argument("--grpc-port", type=int, default=0,
                   help="also serve OIP v2 over gRPC (inference.GRPCInferenceService) on this port (0: off)")
    p.add_argument("--workers", type=int, default=1,
                   help="server processes sharing the ports (SO_REUSEPORT); 0: one per CPU of the container's "
                   "limit (one without a limit)")
    p.add_argument("--worker-control", help=argparse.SUPPRESS)  # set by the --workers supervisor for its workers
    p.add_argument("--worker-index", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--capture", help="folder where request inputs are captured for the drift watcher")
    p.add_argument("--max-body-bytes", type=int, default=8 * 1024 * 1024, help="largest accepted request body")
    p.add_argument("--capture-max-bytes", type=int, default=64 * 1024 * 1024,
                   help="size cap of the capture folder; oldest files are dropped first")
    p.add_argument("--max-batch-size", type=int, default=0,
                   help="dynamic batching: merge concurrent requests into ONNX Runtime runs of up to this many rows "
                   "(0 or 1: off)")
    p.add_argument("--max-batch-delay-ms", type=float, default=d.SERVING_BATCH_MAX_DELAY_MS,
                   help="dynamic batching: the longest a request waits for others to join its run")
    p.add_argument("--body-timeout-seconds", type=float, default=d.SERVING_BODY_TIMEOUT_SECONDS,
                   help="a REST request body must arrive within this time of its head (else 408)")
    p.add_argument("--header-timeout-seconds", type=float, default=d.SERVING_HEADER_TIMEOUT_SECONDS,
                   help="close a connection that sends no complete request head for this long (slow headers, idle "
                   "keep-alive)")
    p.add_argument("--feedback", action="store_true",
                   help="take true labels at POST /v2/models/{name}/feedback and export the online accuracy per "
                   "revision (needs --workers 1)")
    p.add_argument("--feedback-token-file", help="file holding the bearer token labels must carry (implies --feedback)")
    p.add_argument("--feedback-window", type=int, default=d.SERVING_FEEDBACK_WINDOW,
                   help="online accuracy over the last this many labelled predictions of each revision")
    p.add_argument("--feedback-max-requests", type=int, default=d.SERVING_FEEDBACK_MAX_REQUESTS,
                   help="recent requests remembered by id for labels (oldest forgotten)")
    p.add_argument("--candidate", help="online stage: a candidate artifact folder (or file:// URI) run beside the "
                   "served one, in --candidate-mode (needs --workers 1; also settable at "
                   "POST /v2/repository/models/{name}/candidate)")
    p.add_argument("--candidate-sha256", help="the expected sha256 of the candidate's model.onnx")
    p.add_argument("--candidate-mode", choices=["shadow", "canary"], default=d.SERVING_CANDIDATE_MODE,
                   help="shadow: every request is also run on the candidate, off the request path; canary: the "
                   "candidate answers --candidate-weight percent of requests")
    p.add_argument("--candidate-weight", type=float, default=d.SERVING_CANDIDATE_WEIGHT,
                   help="canary: percent of requests the candidate answers (0 to 100)")
    p.add_argument("--mirror-queue", type=int, default=d.SERVING_MIRROR_QUEUE,
                   help="requests waiting to be run on the other model; beyond it copies are dropped (and counted)")
    p.add_argument("--task", choices=["classification", "regression", "embedding"], default=d.MODEL_TASK,
                   help="how a candidate's agreement with the served model is measured (classification: top-1 "
                   "equal; regression: relative closeness; embedding: cosine similarity)")

    p = sub.add_parser("watch-drift", help="test captured traffic for drift with Alibi Detect")
    p.add_argument("--spec", required=True, help="CompressedModel manifest (YAML)")
    p.add_argument("--capture", required=True, help="capture folder written by `kompressor serve`")
    p.add_argument("--verdict", required=True,
                   help="where verdicts go: a JSON file path, or k8s://NAMESPACE/NAME to patch the status")
    p.add_argument("--reference", help="reference data URI (default: spec.data.reference, else spec.data.eval)")
    p.add_argument("--revision", type=int, help="serving revision, recorded in each verdict")
    p.add_argument("--state", help="folder for the watcher's place in the capture and detector state (a restart "
                   "goes on from it)")
    p.add_argument("--artifact", help="the served artifact folder (spec.drift.signal outputs/embeddings: the "
                   "reference is its outputs on the reference data)")
    p.add_argument("--once", action="store_true", help="run one check and exit")
    p.add_argument("--metrics-port", type=int, default=0, help="serve Prometheus metrics on this port (0: off)")
    p.add_argument("--serving-metrics-url", help="the serving process' /metrics: spec.drift.performance reads the "
                   "labelled windows from the same server (GET /v2/models/{name}/feedback/windows; needed when it "
                   "is set)")

    p = sub.add_parser("operator", help="run the Kubernetes operator (Kopf)")
    scope = p.add_mutually_exclusive_group()
    scope.add_argument("--namespace", "-n", action="append", default=[], help="watch this namespace (repeatable)")
    scope.add_argument("--all-namespaces", "-A", action="store_true", help="watch the whole cluster")
    p.add_argument("--artifact-store", default="file:///artifacts",
                   help="where jobs write artifacts and the operator reads metrics (file://, pvc://, s3://)")
    p.add_argument("--metrics-port", type=int, default=9090, help="Prometheus metrics port (0: off)")
    p.add_argument("--liveness", default="http://0.0.0.0:8081/healthz", help="Kopf liveness endpoint")
    p.add_argument("--peering", default="kompressor", help="Kopf peering name (multi-replica safety)")
    p.add_argument("--standalone", action="store_true", help="no peering (single replica, tests)")

    p = sub.add_parser("run", help="run CompressedModels on this machine, no Kubernetes needed")
    p.add_argument("file", help="manifest file with one or more CompressedModels")
    p.add_argument("--workdir", required=True, help="folder for artifacts, captures and status.json")
    p.add_argument("--port", type=int, default=d.SERVING_PORT, help="first serving port on 127.0.0.1")

    p = sub.add_parser("demo", help="the whole loop on a bundled example, with a report at the end")
    p.add_argument("--workdir", default="./kompressor-demo", help="where artifacts and report.html go")
    p.add_argument("--port", type=int, default=d.SERVING_PORT, help="serving port on 127.0.0.1")

    sub.add_parser("crd", help="print the CompressedModel CustomResourceDefinition")

    p = sub.add_parser("validate", help="check CompressedModel manifests without applying them")
    p.add_argument("files", nargs="+", help="manifest files")
    return parser


def print_crd(args: argparse.Namespace) -> int:
    from kompressor.api.crd import render_crd

    sys.stdout.write(render_crd())
    return 0


def validate(args: argparse.Namespace) -> int:
    from kompressor.api import SpecError, load_manifests

    failed = 0
    for path in args.files:
        try:
            models = load_manifests(path)
        except (SpecError, OSError) as err:
            failed += 1
            for line in getattr(err, "problems", [(path, str(err))]):
                print(f"error: {line[0]}: {line[1]}", file=sys.stderr)
            continue
        for cm in models:
            print(f"ok: {path}: {cm.key}")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.json_logs:
        from kompressor.console import use_json_logs

        use_json_logs(True)
    module, _, func = COMMANDS[args.command].partition(":")
    try:
        return int(getattr(importlib.import_module(module), func)(args) or 0)
    except KeyboardInterrupt:
        return 130
    except Exception as err:  # a clear message and a non-zero exit, never a bare traceback
        from kompressor.api import SpecError
        from kompressor.console import log
        from kompressor.errors import write_termination_message

        if isinstance(err, SpecError):
            for path, message in err.problems:
                print(f"error: {path}: {message}", file=sys.stderr)
            write_termination_message("; ".join(f"{path}: {message}" for path, message in err.problems))
            return 2
        if getattr(err, "user_error", False):  # see kompressor.errors.UserError
            log(str(err), level="error", command=args.command)
            write_termination_message(str(err))
            return 2
        write_termination_message(f"{type(err).__name__}: {err}")
        raise


if __name__ == "__main__":
    sys.exit(main())
