"""What an ONNX model measures on the eval data, with ONNX Runtime: quality, calibration, latency,
throughput, size and real sparsity, overall and per slice."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kompressor.api.status import Metrics, SliceMetrics
from kompressor_jobs.data import Dataset
from kompressor_jobs.runtime import graph_sparsity, run, session

ECE_BINS = 15
THROUGHPUT_BATCH = 64


@dataclass
class Timing:
    """How much timing to do: the evaluation job measures fully, search probes lighter."""

    warmup: int = 20
    latency_runs: int = 300
    throughput_batches: int = 30


FULL = Timing()
QUICK = Timing(warmup=5, latency_runs=60, throughput_batches=5)


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=1, keepdims=True)


def expected_calibration_error(probs: np.ndarray, y: np.ndarray, bins: int = ECE_BINS) -> float:
    """Guo et al. (2017): sum over equal-width confidence bins of |accuracy - confidence| weighted by bin size."""
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == y
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        in_bin = which == b
        if in_bin.any():
            ece += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    return float(ece)


def quality(y: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support

    labels = np.unique(y)  # classes present in the data (a slice may hold only some classes)
    precision, recall, f1, _ = precision_recall_fscore_support(y, pred, labels=labels, average="macro",
                                                               zero_division=0)
    return {"accuracy": float(accuracy_score(y, pred)), "f1": float(f1), "precision": float(precision),
            "recall": float(recall)}


def predict(sess, X: np.ndarray) -> np.ndarray:
    """Logits, one row per run, as single inference requests see them. (Dynamically quantized graphs
    scale activations per batch, so batching would make predictions depend on their neighbours.)"""
    return np.concatenate([run(sess, X[i:i + 1]) for i in range(len(X))])


def latency_ms(sess, X: np.ndarray, timing: Timing) -> np.ndarray:
    """Batch-1 wall times of ``timing.latency_runs`` runs after a warm-up, cycling over the rows."""
    name = sess.get_inputs()[0].name
    rows = [X[i:i + 1] for i in range(min(len(X), 256))]
    for i in range(timing.warmup):
        sess.run(None, {name: rows[i % len(rows)]})
    times = np.empty(timing.latency_runs)
    for i in range(timing.latency_runs):
        feed = {name: rows[i % len(rows)]}
        start = time.perf_counter()
        sess.run(None, feed)
        times[i] = time.perf_counter() - start
    return times * 1000.0


def throughput_rps(sess, X: np.ndarray, timing: Timing) -> float:
    name = sess.get_inputs()[0].name
    reps = -(-THROUGHPUT_BATCH // len(X))
    batch = np.concatenate([X] * reps)[:THROUGHPUT_BATCH]
    sess.run(None, {name: batch})
    start = time.perf_counter()
    for _ in range(timing.throughput_batches):
        sess.run(None, {name: batch})
    return timing.throughput_batches * THROUGHPUT_BATCH / (time.perf_counter() - start)


def measure(model_path: Path, data: Dataset, baseline_size: int | None = None, timing: Timing = FULL) -> Metrics:
    sess = session(model_path)
    logits = predict(sess, data.X)
    probs = softmax(logits.astype(np.float64))
    pred = probs.argmax(axis=1)
    overall = quality(data.y, pred)
    lat = latency_ms(sess, data.X, timing)
    size = Path(model_path).stat().st_size
    sparsity, _ = graph_sparsity(model_path)
    return Metrics(
        **{k: round(v, 6) for k, v in overall.items()},
        ece=round(expected_calibration_error(probs, data.y), 6),
        latency_p50_ms=round(float(np.percentile(lat, 50)), 4),
        latency_p95_ms=round(float(np.percentile(lat, 95)), 4),
        latency_p99_ms=round(float(np.percentile(lat, 99)), 4),
        throughput_rps=round(throughput_rps(sess, data.X, timing), 1),
        size_bytes=size,
        size_ratio=round(size / baseline_size, 6) if baseline_size else None,
        sparsity=round(sparsity, 6),
        slices=slice_metrics(data, pred),
    )


def slice_metrics(data: Dataset, pred: np.ndarray) -> dict[str, SliceMetrics] | None:
    if data.slices is None:
        return None
    out = {}
    for name in sorted(set(data.slices.tolist())):
        rows = data.slices == name
        q = quality(data.y[rows], pred[rows])
        out[str(name)] = SliceMetrics(accuracy=round(q["accuracy"], 6), f1=round(q["f1"], 6),
                                      samples=int(rows.sum()))
    return out
