"""The command lines of the jobs, built in one place.

The operator puts these in Job/Deployment containers, the embedded mode runs them as
subprocesses, and the test fixture that plays the cluster's controllers runs what it
finds in the containers: all three therefore run exactly the same commands.
"""

from __future__ import annotations

from kompressor.api import defaults as d

ENTRYPOINT = ["kompressor", "--json-logs"]


def prune_argv(spec: str, out: str, revision: int, baseline_cache: str, retrain: bool = False) -> list[str]:
    argv = [*ENTRYPOINT, "prune", "--spec", spec, "--out", out, "--revision", str(revision),
            "--baseline-cache", baseline_cache]
    return argv + (["--retrain"] if retrain else [])


def evaluate_argv(spec: str, candidate: str, out: str) -> list[str]:
    return [*ENTRYPOINT, "evaluate", "--spec", spec, "--candidate", candidate, "--out", out]


def serve_argv(artifact: str, name: str, port: int, capture: str | None, host: str = "0.0.0.0",
               grpc_port: int | None = None, workers: int | None = None, batching=None, performance=None,
               feedback_token_file: str | None = None, online: "OnlineServing | None" = None) -> list[str]:
    """``workers`` None: ``--workers 0``, one per CPU of the container's limit. ``batching``: a
    spec.serving.batching (max_batch_size, max_delay_ms), or None for none. ``performance``: a
    spec.drift.performance, which turns the feedback endpoint on (``--feedback --feedback-window``) and forces
    ``--workers 1`` (labels must reach the process that answered the request); ``feedback_token_file`` guards it.
    ``online``: spec.promotion.strategy is shadow or canary (one worker: the evidence is per process)."""
    feedback = performance is not None or (online is not None and online.labels)
    if performance is not None or online is not None:
        workers = 1
    argv = [*ENTRYPOINT, "serve", "--artifact", artifact, "--name", name, "--port", str(port), "--host", host,
            "--workers", str(workers or d.SERVING_AUTO_WORKERS)]
    if feedback:
        window = performance.window if performance is not None else d.SERVING_FEEDBACK_WINDOW
        argv += ["--feedback", "--feedback-window", str(window)]
        if feedback_token_file:
            argv += ["--feedback-token-file", feedback_token_file]
    if grpc_port:
        argv += ["--grpc-port", str(grpc_port)]
    if batching is not None:
        argv += ["--max-batch-size", str(batching.max_batch_size), "--max-batch-delay-ms", str(batching.max_delay_ms)]
    if online is not None:
        argv += ["--task", online.task]
        if online.candidate is not None:
            path, sha256, mode, weight = online.candidate
            argv += ["--candidate", path, "--candidate-sha256", sha256, "--candidate-mode", mode,
                     "--candidate-weight", f"{weight:g}"]
    return argv + (["--capture", capture] if capture else [])


class OnlineServing:
    """What ``kompressor serve`` needs for an online stage: the task (how outputs are compared), whether labels
    are taken (onlineGates.minAccuracy), and the candidate as (local path, sha256, mode, weight), if any."""

    def __init__(self, task: str, labels: bool, candidate: tuple[str, str, str, float] | None = None):
        self.task, self.labels, self.candidate = task, labels, candidate

    @classmethod
    def of(cls, spec, candidate: tuple[str, str, str, float] | None = None) -> "OnlineServing | None":
        """From a CompressedModelSpec: None under strategy direct."""
        if spec.promotion.strategy == "direct":
            return None
        return cls(spec.model.task, spec.promotion.online_gates.min_accuracy is not None, candidate)


def watcher_argv(spec: str, capture: str, verdict: str, revision: int, reference: str | None = None,
                 state: str | None = None, metrics_port: int = 0, artifact: str | None = None,
                 serving_metrics_url: str | None = None) -> list[str]:
    """``serving_metrics_url``: the serving process' /metrics; spec.drift.performance reads the labelled windows
    from the same server (kompressor_jobs.drift.performance)."""
    argv = [*ENTRYPOINT, "watch-drift", "--spec", spec, "--capture", capture, "--verdict", verdict,
            "--revision", str(revision)]
    if reference:
        argv += ["--reference", reference]
    if artifact:
        argv += ["--artifact", artifact]
    if state:
        argv += ["--state", state]
    if metrics_port:
        argv += ["--metrics-port", str(metrics_port)]
    if serving_metrics_url:
        argv += ["--serving-metrics-url", serving_metrics_url]
    return argv
