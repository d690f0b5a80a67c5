"""What an ONNX model measures on the eval data, with ONNX Runtime, beside its uncompressed baseline.

Per task: classification (accuracy, macro precision/recall/F1, ECE), regression (MAE, RMSE, R²) and
embedding (no labels). Fidelity to the baseline's outputs on the same rows, for every task: top-1
agreement and mean KL divergence (classification), mean cosine similarity (every task). Gains: parameters,
MACs at batch 1, size on disk and gzip-compressed (what a pull costs), p50/p95/p99 latency at batch 1 and
throughput at batch ``THROUGHPUT_BATCH``, with ONNX Runtime's threads pinned like the serving Pod's; the
baseline and the candidate are timed in the same process, in alternating blocks, so both see the same
machine. No torch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kompressor.api import defaults as d
from kompressor.api.status import Metrics, SliceMetrics
from kompressor.errors import UserError
from kompressor_jobs.runtime import graph_sparsity, session

ECE_BINS = 15
THROUGHPUT_BATCH = 64
LATENCY_QUANTILE, LATENCY_CONFIDENCE = 0.95, 0.95
TASKS = ("classification", "regression", "embedding")

_ORT_NUMPY = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
              "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(bool)": np.bool_,
              "tensor(int8)": np.int8, "tensor(uint8)": np.uint8}


@dataclass
class Timing:
    """How much timing to do: the evaluation Job measures fully (enough runs for a latency gate),
    search probes lighter (their latency gates are then judged on a confidence bound)."""

    warmup: int = 50
    latency_runs: int = d.LATENCY_TIMED_RUNS
    throughput_batches: int = 30
    throughput_seconds: float = 5.0  # stop timing throughput after this long (at least 3 batches)


FULL = Timing()
QUICK = Timing(warmup=5, latency_runs=60, throughput_batches=5, throughput_seconds=1.0)


@dataclass
class Reference:
    """The uncompressed baseline as measured in this run: its metrics and raw outputs on the same rows."""

    metrics: Metrics
    outputs: np.ndarray
    weights: int  # elements of its weight tensors (rank >= 2), for the fraction removed


# --- inputs and outputs ------------------------------------------------------------------------

def columns(data) -> dict[str, np.ndarray]:
    """The dataset's input arrays by name (a plain array is the one input "input")."""
    if isinstance(data, np.ndarray):
        return {"input": data}
    inputs = getattr(data, "inputs", None)
    if isinstance(inputs, dict) and inputs:
        return inputs
    return {"input": data.X}


def feeds_for(sess, data) -> dict[str, np.ndarray]:
    """The data's arrays under the session's input names, in the session's dtypes."""
    cols = columns(data)
    graph_inputs = sess.get_inputs()
    if len(graph_inputs) == 1 and len(cols) == 1:
        pairs = [(graph_inputs[0], next(iter(cols.values())))]
    else:
        missing = [i.name for i in graph_inputs if i.name not in cols]
        if missing:
            raise UserError(f"the model's input(s) {', '.join(missing)} are not in the data "
                            f"(data arrays: {', '.join(cols)})")
        pairs = [(i, cols[i.name]) for i in graph_inputs]
    feeds = {}
    for spec, array in pairs:
        dtype = _ORT_NUMPY.get(spec.type)
        if dtype is not None and array.dtype != dtype:
            if np.dtype(dtype).kind != array.dtype.kind and not (np.dtype(dtype).kind == "f"
                                                                  and array.dtype.kind in "iu"):
                raise UserError(f"input {spec.name!r}: the data holds {array.dtype}, the model takes "
                                f"{np.dtype(dtype).name}")
            array = array.astype(dtype)
        feeds[spec.name] = array
    return feeds


def _rows(feeds: dict[str, np.ndarray]) -> int:
    return len(next(iter(feeds.values())))


def _slice(feeds: dict[str, np.ndarray], start: int, stop: int) -> dict[str, np.ndarray]:
    return {k: v[start:stop] for k, v in feeds.items()}


def predict(sess, data) -> np.ndarray:
    """The first output, one batch-1 run per row, as single inference requests see it. (Dynamically
    quantized graphs scale activations per batch, so batching would make outputs depend on neighbours.)"""
    feeds = feeds_for(sess, data)
    return np.concatenate([sess.run(None, _slice(feeds, i, i + 1))[0] for i in range(_rows(feeds))])


# --- quality -----------------------------------------------------------------------------------

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


def regression_quality(y: np.ndarray, out: np.ndarray) -> dict[str, float]:
    """MAE, RMSE and R² (averaged over output columns), outputs shaped like the targets."""
    from sklearn.metrics import r2_score

    y = np.asarray(y, dtype=np.float64).reshape(len(y), -1)
    out = np.asarray(out, dtype=np.float64).reshape(len(out), -1)
    if y.shape != out.shape:
        raise UserError(f"regression targets y have {y.shape[1]} column(s) per row, the model outputs "
                        f"{out.shape[1]}")
    err = out - y
    r2 = float(r2_score(y, out)) if len(y) > 1 else float("nan")
    return {"mae": float(np.abs(err).mean()), "rmse": float(np.sqrt((err ** 2).mean())), "r2": r2}


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Mean cosine similarity of the rows (each row flattened). One value per row (a scalar regression
    output) has only a sign, so there the columns over all rows are compared instead."""
    a = np.asarray(a, dtype=np.float64).reshape(len(a), -1)
    b = np.asarray(b, dtype=np.float64).reshape(len(b), -1)
    if a.shape[1] == 1:
        a, b = a.T, b.T
    num = (a * b).sum(axis=1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    both_zero = den == 0
    cos = np.where(both_zero, np.where(np.abs(a - b).max(axis=1) == 0, 1.0, 0.0), num / np.where(both_zero, 1, den))
    return float(np.clip(cos, -1.0, 1.0).mean())


def fidelity(task: str, outputs: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """How closely the outputs follow the uncompressed model's on the same rows (no labels needed)."""
    out = {"cosine_similarity": cosine_similarity(outputs, reference)}
    if task == "classification":
        p, q = softmax(reference.astype(np.float64)), softmax(outputs.astype(np.float64))
        out["agreement"] = float((p.argmax(1) == q.argmax(1)).mean())
        out["kl_divergence"] = float(np.mean(np.sum(p * (np.log(np.clip(p, 1e-12, None))
                                                         - np.log(np.clip(q, 1e-12, None))), axis=1)))
    return out


def task_of(data, task: str | None = None) -> str:
    """The task, as given, else read from the labels: none (embedding), integers (classification), floats."""
    if task is not None:
        if task not in TASKS:
            raise UserError(f"unknown task {task!r} (tasks: {', '.join(TASKS)})")
        return task
    y = getattr(data, "y", None)
    if y is None:
        return "embedding"
    return "classification" if np.asarray(y).dtype.kind in "iub" else "regression"


# --- timing ------------------------------------------------------------------------------------

def latency_ms(sess, data, timing: Timing) -> np.ndarray:
    """Batch-1 wall times of ``timing.latency_runs`` runs after a warm-up, cycling over the rows."""
    return timed_latencies([sess], data, timing)[0]


def timed_latencies(sessions: list, data, timing: Timing, block: int = 50) -> list[np.ndarray]:
    """Batch-1 wall times (ms) of each session, timed in alternating blocks of ``block`` runs so that every
    session sees the same machine (frequency, noisy neighbours) over the same span of time."""
    feeds = [feeds_for(s, data) for s in sessions]
    n = min(_rows(feeds[0]), 256)
    rows = [[_slice(f, i, i + 1) for i in range(n)] for f in feeds]
    for s, r in zip(sessions, rows):
        for i in range(timing.warmup):
            s.run(None, r[i % n])
    times = [np.empty(timing.latency_runs) for _ in sessions]
    for start in range(0, timing.latency_runs, block):
        for s, r, t in zip(sessions, rows, times):
            for i in range(start, min(start + block, timing.latency_runs)):
                feed = r[i % n]
                began = time.perf_counter()
                s.run(None, feed)
                t[i] = time.perf_counter() - began
    return [t * 1000.0 for t in times]


def throughput_rps(sess, data, timing: Timing, batch_size: int = THROUGHPUT_BATCH) -> float:
    feeds = feeds_for(sess, data)
    n = _rows(feeds)
    reps = -(-batch_size // n)
    batch = {k: np.concatenate([v] * reps)[:batch_size] for k, v in feeds.items()}
    sess.run(None, batch)
    done, began = 0, time.perf_counter()
    while done < timing.throughput_batches:
        sess.run(None, batch)
        done += 1
        if done >= 3 and time.perf_counter() - began > timing.throughput_seconds:
            break
    return done * batch_size / (time.perf_counter() - began)


def quantile_upper_bound(times: np.ndarray, q: float = LATENCY_QUANTILE,
                         confidence: float = LATENCY_CONFIDENCE) -> float | None:
    """Distribution-free upper confidence bound of the q-quantile: the k-th smallest of n runs, k the least
    order statistic with P(Binomial(n, q) < k) >= confidence. None when n is too small (k > n; 59 runs
    suffice for the 95 % bound of p95)."""
    import math

    n = len(times)
    if n == 0:
        return None
    j = np.arange(n + 1)
    log_pmf = (math.lgamma(n + 1) - np.array([math.lgamma(i + 1) + math.lgamma(n - i + 1) for i in j])
               + j * math.log(q) + (n - j) * math.log1p(-q))
    cdf = np.cumsum(np.exp(log_pmf))  # cdf[i] = P(Binomial(n, q) <= i)
    ok = np.nonzero(cdf[:n] >= confidence)[0]  # k - 1 = i: P(B <= k - 1) >= confidence
    if not len(ok):
        return None
    return float(np.sort(times)[int(ok[0])])


# --- one model ---------------------------------------------------------------------------------

def measure(model_path: Path, data, baseline_size: int | None = None, timing: Timing = FULL, *,
            task: str | None = None, reference: Reference | None = None, threads: int | None = None,
            true_zero_fraction: float | None = None) -> Metrics:
    """Measure one model. With ``reference`` (the baseline measured on the same data), fidelity, size
    ratios, the fraction of weights removed and the speed-up are filled in too."""
    sess = session(model_path, threads=threads)
    return _assemble(model_path, sess, data, task_of(data, task), predict(sess, data),
                     latency_ms(sess, data, timing), throughput_rps(sess, data, timing),
                     sess.get_session_options().intra_op_num_threads, reference,
                     baseline_size if reference is None else reference.metrics.size_bytes, true_zero_fraction)


def measure_reference(model_path: Path, data, timing: Timing = FULL, *, task: str | None = None,
                      threads: int | None = None) -> Reference:
    """The baseline, measured once and reused (search probes)."""
    sess = session(model_path, threads=threads)
    outputs = predict(sess, data)
    metrics = _assemble(model_path, sess, data, task_of(data, task), outputs, latency_ms(sess, data, timing),
                        throughput_rps(sess, data, timing), sess.get_session_options().intra_op_num_threads,
                        None, None, None)
    return Reference(metrics, outputs, graph_sparsity(model_path)[1])


def measure_pair(candidate: Path, baseline: Path, data, timing: Timing = FULL, *, task: str | None = None,
                 threads: int | None = None, true_zero_fraction: float | None = None) -> tuple[Metrics, Reference]:
    """The candidate and its baseline in one evaluation: same rows, same process, latency timed in
    alternating blocks, threads pinned alike. Returns (candidate metrics, baseline reference)."""
    task = task_of(data, task)
    sessions = [session(baseline, threads=threads), session(candidate, threads=threads)]
    used = sessions[0].get_session_options().intra_op_num_threads
    base_out, cand_out = predict(sessions[0], data), predict(sessions[1], data)
    base_lat, cand_lat = timed_latencies(sessions, data, timing)
    base_rps, cand_rps = (throughput_rps(s, data, timing) for s in sessions)
    base = _assemble(baseline, sessions[0], data, task, base_out, base_lat, base_rps, used, None, None, None)
    ref = Reference(base, base_out, graph_sparsity(baseline)[1])
    cand = _assemble(candidate, sessions[1], data, task, cand_out, cand_lat, cand_rps, used, ref,
                     base.size_bytes, true_zero_fraction)
    return cand, ref


def _assemble(model_path: Path, sess, data, task: str, outputs: np.ndarray, lat: np.ndarray, rps: float,
              threads: int, reference: Reference | None, baseline_size: int | None,
              true_zero_fraction: float | None) -> Metrics:
    import onnx

    from kompressor_jobs.evaluate.graph import compressed_size, macs, parameter_count

    model_path = Path(model_path)
    y = getattr(data, "y", None)
    values: dict = {"task": task}
    pred = None
    if task == "classification":
        if y is None:
            raise UserError(f"{getattr(data, 'uri', 'the eval data')}: classification needs labels y")
        logits = outputs.reshape(len(outputs), -1).astype(np.float64)
        probs = softmax(logits)
        pred = probs.argmax(axis=1)
        values.update(quality(np.asarray(y), pred))
        values["ece"] = expected_calibration_error(probs, np.asarray(y))
    elif task == "regression":
        if y is None:
            raise UserError(f"{getattr(data, 'uri', 'the eval data')}: regression needs targets y")
        values.update(regression_quality(y, outputs))
    if reference is not None:
        if reference.outputs.shape != outputs.shape:
            raise UserError(f"{model_path}: outputs shaped {list(outputs.shape)} cannot be compared with the "
                            f"baseline's {list(reference.outputs.shape)}")
        values.update(fidelity(task, outputs, reference.outputs))
    graph = onnx.load(str(model_path))
    zero_fraction, weights = graph_sparsity(model_path)
    # a quantized graph: count the float graph's zeros, before int8 rounding added its own
    zeros = zero_fraction if true_zero_fraction is None else true_zero_fraction
    if reference is not None and reference.weights:
        sparsity = max(0.0, 1.0 - weights * (1.0 - zeros) / reference.weights)
    else:
        sparsity = zeros
    size = model_path.stat().st_size
    packed = compressed_size(model_path.parent)
    feeds = feeds_for(sess, data)
    p50, p95, p99 = (float(np.percentile(lat, q)) for q in (50, 95, 99))
    upper = quantile_upper_bound(lat)
    base = reference.metrics if reference is not None else None
    metrics = Metrics(
        **{k: (round(v, 6) if isinstance(v, float) and np.isfinite(v) else (None if isinstance(v, float) else v))
           for k, v in values.items()},
        latency_p50_ms=round(p50, 6), latency_p95_ms=round(p95, 6), latency_p99_ms=round(p99, 6),
        latency_p95_upper_ms=round(upper, 6) if upper is not None else None,
        latency_runs=len(lat), latency_threads=int(threads), throughput_rps=round(rps, 1),
        throughput_batch=THROUGHPUT_BATCH,
        size_bytes=size, size_ratio=round(size / baseline_size, 6) if baseline_size else None,
        compressed_size_bytes=packed,
        compressed_size_ratio=round(packed / base.compressed_size_bytes, 6)
        if base is not None and base.compressed_size_bytes else None,
        parameters=parameter_count(graph),
        macs=macs(graph, {k: [1, *v.shape[1:]] for k, v in feeds.items()}),
        sparsity=round(sparsity, 6), zero_fraction=round(zero_fraction, 6),
        speedup=round(base.latency_p50_ms / p50, 4) if base is not None and base.latency_p50_ms and p50 else None,
        throughput_speedup=round(rps / base.throughput_rps, 4) if base is not None and base.throughput_rps else None,
        slices=slice_metrics(data, task, pred, outputs, reference),
    )
    return metrics


def slice_metrics(data, task: str, pred: np.ndarray | None, outputs: np.ndarray,
                  reference: Reference | None) -> dict[str, SliceMetrics] | None:
    slices = getattr(data, "slices", None)
    if slices is None:
        return None
    out = {}
    for name in sorted(set(slices.tolist())):
        rows = slices == name
        s = SliceMetrics(samples=int(rows.sum()))
        if task == "classification":
            q = quality(np.asarray(data.y)[rows], pred[rows])
            s.accuracy, s.f1 = round(q["accuracy"], 6), round(q["f1"], 6)
        elif task == "regression":
            q = regression_quality(np.asarray(data.y)[rows], outputs[rows])
            s.mae = round(q["mae"], 6)
            s.r2 = round(q["r2"], 6) if np.isfinite(q["r2"]) else None
        if reference is not None:
            s.cosine_similarity = round(cosine_similarity(outputs[rows], reference.outputs[rows]), 6)
        out[str(name)] = s
    return out
