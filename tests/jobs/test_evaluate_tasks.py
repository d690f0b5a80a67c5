"""`kompressor evaluate` on models built op by op in the test (no torch, no exporter): a regressor with a float
and an int64 input, a token-id embedder without labels, linear classifiers and a deep MatMul chain. Each
candidate differs from its baseline by a construction whose effect is known exactly (a constant offset, a
sign flip, swapped classes), so every gate's outcome follows from the inputs, and each gate test makes its
own gate fail while the others pass."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from onnx_models import (baseline_and_candidate, bag_of_tokens_embedder, linear, matmul_chain,
                         two_input_regressor)
from kompressor.api.report import EvalReport

FEATURES, BUCKETS, OUT = 6, 4, 2
REGRESSION_INPUTS = [{"name": "features", "dtype": "float32", "shape": [FEATURES]},
                     {"name": "bucket", "dtype": "int64", "shape": [1]}]


def evaluate(jobs, write_spec, candidate: Path, model: dict, data: Path, gates: dict | None = None,
             serving: dict | None = None) -> dict:
    spec = {"model": {"uri": f"file://{candidate}/model.onnx", **model},
            "data": {"train": f"file://{data}", "eval": f"file://{data}"}}
    if gates is not None:
        spec["gates"] = gates
    if serving is not None:
        spec["serving"] = serving
    out = candidate.parent / "eval"
    code, err = jobs.evaluate(write_spec(spec), candidate, out)
    assert code == 0, err
    return json.loads((out / "metrics.json").read_text())


def outcomes(metrics: dict) -> dict[str, str]:
    return {r["gate"]: r["outcome"] for r in metrics["gates"]["results"]}


# --- regression: two inputs (float32 + int64), MAE / RMSE / R² -------------------------------------------

OFFSET = 0.5  # the candidate adds this to every output


@pytest.fixture
def regression(tmp_path):
    """Targets are the baseline's own outputs, so the baseline is exact (MAE 0, R² 1) and the candidate,
    which adds OFFSET to every output, has MAE = RMSE = OFFSET and R² = 1 - OFFSET² / var(y)."""
    rng = np.random.default_rng(1)
    w, table = rng.normal(size=(FEATURES, OUT)), rng.normal(size=(BUCKETS, OUT))
    n = 120
    features = rng.normal(size=(n, FEATURES)).astype(np.float32)
    bucket = rng.integers(0, BUCKETS, size=n).astype(np.int64)
    y = (features.astype(np.float64) @ w + table[bucket]).astype(np.float32)
    data = tmp_path / "regression.npz"
    np.savez(data, features=features, bucket=bucket.reshape(n, 1), y=y,
             slice=np.where(bucket < 2, "low", "high"))
    candidate = baseline_and_candidate(
        tmp_path, lambda p: two_input_regressor(p, w, table),
        lambda p: two_input_regressor(p, w, table + OFFSET), REGRESSION_INPUTS)
    r2 = 1 - OFFSET ** 2 / np.var(y.astype(np.float64), axis=0)
    return candidate, data, float(r2.mean())


def test_regression_metrics_are_exact_for_a_known_offset(jobs, write_spec, regression):
    candidate, data, r2 = regression
    metrics = evaluate(jobs, write_spec, candidate, {"task": "regression", "inputs": REGRESSION_INPUTS}, data,
                       gates={"maxMae": 1.0})
    base = metrics["baseline"]["metrics"]
    assert metrics["task"] == "regression" and "accuracy" not in metrics
    assert base["mae"] == pytest.approx(0, abs=1e-5) and base["r2"] == pytest.approx(1, abs=1e-6)
    assert metrics["mae"] == pytest.approx(OFFSET, abs=1e-5)
    assert metrics["rmse"] == pytest.approx(OFFSET, abs=1e-5)
    assert metrics["r2"] == pytest.approx(r2, abs=1e-5)
    assert set(metrics["slices"]) == {"low", "high"}
    assert all(s["mae"] == pytest.approx(OFFSET, abs=1e-5) for s in metrics["slices"].values())
    # gains beside the baseline: the same graph shape, so the same parameters and MACs
    assert metrics["parameters"] == base["parameters"] == FEATURES * OUT + BUCKETS * OUT
    assert metrics["macs"] == base["macs"] == FEATURES * OUT


@pytest.mark.parametrize("gate, failing, passing", [
    ("maxMae", OFFSET * 0.9, OFFSET * 1.1),
    ("maxRmse", OFFSET * 0.9, OFFSET * 1.1),
    ("minR2", "r2+0.001", "r2-0.001"),
    ("maxR2Drop", "drop-0.001", "drop+0.001"),
])
def test_each_regression_gate_fails_on_its_own(jobs, write_spec, regression, gate, failing, passing):
    candidate, data, r2 = regression
    resolve = {"r2+0.001": r2 + 0.001, "r2-0.001": r2 - 0.001, "drop-0.001": (1 - r2) - 0.001,
               "drop+0.001": (1 - r2) + 0.001}
    model = {"task": "regression", "inputs": REGRESSION_INPUTS}
    for threshold, expected in ((failing, "Failed"), (passing, "Successful")):
        threshold = resolve.get(threshold, threshold)
        metrics = evaluate(jobs, write_spec, candidate, model, data, gates={gate: threshold, "maxSizeRatio": 2.0})
        assert outcomes(metrics) == {gate: expected, "maxSizeRatio": "Successful"}
        assert metrics["gates"]["passed"] is (expected == "Successful")
        shutil.rmtree(candidate.parent / "eval")


def test_classification_gates_on_a_regressor_are_errors_not_passes(jobs, write_spec, regression):
    candidate, data, _ = regression
    metrics = evaluate(jobs, write_spec, candidate, {"task": "regression", "inputs": REGRESSION_INPUTS}, data,
                       gates={"minAccuracy": 0.1, "minAgreement": 0.1})
    assert outcomes(metrics) == {"minAccuracy": "Error", "minAgreement": "Error"}
    assert metrics["gates"]["passed"] is False


# --- embedding: int64 token ids, no labels -------------------------------------------------------------

VOCAB, TOKENS, DIM = 50, 7, 8


@pytest.fixture
def token_data(tmp_path):
    rng = np.random.default_rng(2)
    path = tmp_path / "tokens.npz"
    np.savez(path, input_ids=rng.integers(0, VOCAB, size=(80, TOKENS)).astype(np.int64))  # no y: no labels
    return path, rng.normal(size=(VOCAB, DIM)), rng.normal(size=(DIM, DIM))


EMBED_INPUTS = [{"name": "input_ids", "dtype": "int64", "shape": [TOKENS]}]


@pytest.mark.parametrize("scale, cosine", [(3.0, 1.0), (-1.0, -1.0)])
def test_embedding_fidelity_is_cosine_similarity_to_the_baseline(jobs, write_spec, tmp_path, token_data, scale,
                                                                 cosine):
    """A scaled embedding table points every output the same way (cosine 1); a negated one, the opposite (-1)."""
    data, table, proj = token_data
    candidate = baseline_and_candidate(tmp_path, lambda p: bag_of_tokens_embedder(p, table, proj),
                                       lambda p: bag_of_tokens_embedder(p, table * scale, proj), EMBED_INPUTS)
    metrics = evaluate(jobs, write_spec, candidate, {"task": "embedding", "inputs": EMBED_INPUTS}, data,
                       gates={"minCosineSimilarity": 0.99})
    assert metrics["cosineSimilarity"] == pytest.approx(cosine, abs=1e-5)
    assert outcomes(metrics) == {"minCosineSimilarity": "Successful" if cosine > 0 else "Failed"}
    assert "accuracy" not in metrics and "mae" not in metrics
    assert metrics["parameters"] == VOCAB * DIM + DIM * DIM


def test_embedding_default_gate_applies_when_no_gate_is_set_and_can_be_opted_out(jobs, write_spec, tmp_path,
                                                                                 token_data):
    data, table, proj = token_data
    candidate = baseline_and_candidate(tmp_path, lambda p: bag_of_tokens_embedder(p, table, proj),
                                       lambda p: bag_of_tokens_embedder(p, -table, proj), EMBED_INPUTS)
    model = {"task": "embedding", "inputs": EMBED_INPUTS}
    metrics = evaluate(jobs, write_spec, candidate, model, data, gates={"maxSizeRatio": 2.0})
    default = [r for r in metrics["gates"]["results"] if r.get("default")]
    assert [(r["gate"], r["threshold"], r["outcome"]) for r in default] == [("minCosineSimilarity", 0.99, "Failed")]
    assert "default gate" in default[0]["message"] and metrics["gates"]["passed"] is False
    shutil.rmtree(candidate.parent / "eval")
    opted_out = evaluate(jobs, write_spec, candidate, model, data, gates={"maxSizeRatio": 2.0, "defaults": False})
    assert outcomes(opted_out) == {"maxSizeRatio": "Successful"} and opted_out["gates"]["passed"] is True


# --- classification: fidelity without labels, default gate --------------------------------------------

@pytest.fixture
def classifier(tmp_path):
    """Two classes; labels are the baseline's predictions (accuracy 1). The candidate swaps the classes'
    weight columns, so it disagrees with the baseline on every row: agreement 0, accuracy 0."""
    rng = np.random.default_rng(3)
    w, b = rng.normal(size=(5, 2)), np.zeros(2)
    X = rng.normal(size=(90, 5)).astype(np.float32)
    y = (X @ w).argmax(1).astype(np.int64)
    data = tmp_path / "cls.npz"
    np.savez(data, X=X, y=y)

    def build(swap: bool, shift: float = 0.0):
        return lambda p: linear(p, w[:, ::-1] if swap else w, b + shift)

    return tmp_path, data, build


def test_shifted_logits_agree_fully_and_swapped_classes_not_at_all(jobs, write_spec, classifier):
    tmp, data, build = classifier
    model = {"task": "classification", "inputShape": [5]}
    shifted = baseline_and_candidate(tmp / "a", build(False), build(False, shift=7.0), [])
    same = evaluate(jobs, write_spec, shifted, model, data, gates={"minAgreement": 1.0})
    # softmax ignores a constant shift: identical predictions and probabilities
    assert same["agreement"] == 1.0 and same["klDivergence"] == pytest.approx(0, abs=1e-9)
    assert outcomes(same) == {"minAgreement": "Successful"}
    swapped = baseline_and_candidate(tmp / "b", build(False), build(True), [])
    other = evaluate(jobs, write_spec, swapped, model, data, gates={"minAgreement": 0.5})
    assert other["agreement"] == 0.0 and other["accuracy"] == 0.0 and other["klDivergence"] > 0.1
    assert outcomes(other) == {"minAgreement": "Failed"}


def test_classification_default_gate_is_max_accuracy_drop(jobs, write_spec, classifier):
    tmp, data, build = classifier
    model = {"task": "classification", "inputShape": [5]}
    good = evaluate(jobs, write_spec, baseline_and_candidate(tmp / "a", build(False), build(False, 1.0), []),
                    model, data)
    bad = evaluate(jobs, write_spec, baseline_and_candidate(tmp / "b", build(False), build(True), []), model, data)
    for metrics, outcome in ((good, "Successful"), (bad, "Failed")):
        [result] = metrics["gates"]["results"]
        assert (result["gate"], result["threshold"], result["default"], result["outcome"]) == (
            "maxAccuracyDrop", 0.01, True, outcome)
    assert good["gates"]["passed"] is True and bad["gates"]["passed"] is False


# --- latency, measured like serving --------------------------------------------------------------------

def test_latency_is_timed_with_the_serving_pods_threads_and_enough_runs(jobs, write_spec, tmp_path, monkeypatch):
    """The serving Pod's CPU limit (2) pins ONNX Runtime's threads; the p95 comes from >= 1000 runs. A gate of
    1 microsecond cannot be met by a 263 k-MAC model (~260 GMAC/s on 2 threads, and more than ONNX Runtime's
    own per-run overhead), a gate of a second always is."""
    monkeypatch.delenv("KOMPRESSOR_ORT_THREADS", raising=False)
    rng = np.random.default_rng(4)
    X = rng.normal(size=(64, 256)).astype(np.float32)
    data = tmp_path / "wide.npz"
    np.savez(data, X=X, y=(X[:, 0] > 0).astype(np.int64))
    candidate = baseline_and_candidate(tmp_path, lambda p: matmul_chain(p, 256, 4),
                                       lambda p: matmul_chain(p, 256, 4, seed=1), [])
    metrics = evaluate(jobs, write_spec, candidate, {"inputShape": [256]}, data,
                       gates={"maxLatencyP95Ms": 0.001, "defaults": False},
                       serving={"resources": {"limits": {"cpu": "2", "memory": "1Gi"}}})
    assert metrics["latencyThreads"] == 2 and metrics["latencyRuns"] >= 1000
    assert metrics["macs"] == 4 * 256 * 256 + 256 * 2
    [latency] = metrics["gates"]["results"]
    assert latency["outcome"] == "Failed" and latency["value"] == metrics["latencyP95Ms"]
    card = json.loads((candidate.parent / "eval" / "model_card.json").read_text())
    assert card["measurement"]["onnxruntimeThreads"] == 2 and card["measurement"]["servingCpuLimit"] == "2"
    assert card["measurement"]["cpuModel"] and card["measurement"]["latencyRuns"] == metrics["latencyRuns"]
    shutil.rmtree(candidate.parent / "eval")
    relaxed = evaluate(jobs, write_spec, candidate, {"inputShape": [256]}, data,
                       gates={"maxLatencyP95Ms": 1000.0, "defaults": False})
    assert outcomes(relaxed) == {"maxLatencyP95Ms": "Successful"}


def test_gains_are_reported_beside_the_baseline(jobs, write_spec, tmp_path):
    """A candidate with half the layers of its baseline: half the MACs and parameters (known from the shapes),
    a smaller file, and a speed-up measured in the same run."""
    rng = np.random.default_rng(5)
    X = rng.normal(size=(32, 256)).astype(np.float32)
    data = tmp_path / "gains.npz"
    np.savez(data, X=X, y=(X[:, 0] > 0).astype(np.int64))
    candidate = baseline_and_candidate(tmp_path, lambda p: matmul_chain(p, 256, 8),
                                       lambda p: matmul_chain(p, 256, 4), [])
    metrics = evaluate(jobs, write_spec, candidate, {"inputShape": [256]}, data, gates={"defaults": False})
    base = metrics["baseline"]["metrics"]
    assert base["macs"] == 8 * 256 * 256 + 256 * 2 and metrics["macs"] == 4 * 256 * 256 + 256 * 2
    assert metrics["parameters"] == metrics["macs"] and base["parameters"] == base["macs"]
    assert metrics["sizeRatio"] < 0.55 and metrics["compressedSizeRatio"] < 0.55
    assert metrics["compressedSizeBytes"] < metrics["sizeBytes"] * 1.05  # random float32 barely compresses
    # the fraction of the baseline's weights that are gone (structured-like removal, no zeros)
    assert metrics["sparsity"] == pytest.approx(1 - (4 * 256 * 256 + 512) / (8 * 256 * 256 + 512), abs=1e-6)
    assert metrics["speedup"] == pytest.approx(base["latencyP50Ms"] / metrics["latencyP50Ms"], rel=1e-2)
    assert metrics["speedup"] > 1.2 and metrics["throughputSpeedup"] > 1.0  # half the work: faster, same run
    card = (candidate.parent / "eval" / "model_card.md").read_text()
    assert "Gains vs the uncompressed baseline" in card and "MACs at batch 1" in card
    report = EvalReport.read(candidate.parent / "eval")
    assert report.baseline_metrics.macs == base["macs"]


def test_int8_sparsity_is_the_float_graphs_zeros_not_rounding_zeros(jobs, write_spec, tmp_path):
    """An unpruned model quantized to INT8: its small weights round to the zero point, so the int8 graph holds
    zeros, but none was pruned: sparsity 0 (prune records the float graph's zeros before quantizing)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    rng = np.random.default_rng(6)
    w = rng.normal(size=(16, 16))
    w[:4] = 1e-5 * np.sign(w[:4])  # far below max|w| / 254: these round to zero in int8
    X = rng.normal(size=(40, 16)).astype(np.float32)
    data = tmp_path / "int8.npz"
    np.savez(data, X=X, y=(X @ w).argmax(1).astype(np.int64))

    def int8(path):
        fp32 = linear(path.parent / "fp32.onnx", w, np.zeros(16))
        quantize_dynamic(str(fp32), str(path), weight_type=QuantType.QInt8)
        fp32.unlink()

    achieved = {"quantization": {"mode": "dynamic-int8"}, "graphSparsity": 0.0, "quantizedZeroFraction": 0.25}
    candidate = baseline_and_candidate(tmp_path, lambda p: linear(p, w, np.zeros(16)), int8, [],
                                       achieved=achieved)
    metrics = evaluate(jobs, write_spec, candidate, {"inputShape": [16]}, data, gates={"defaults": False})
    assert metrics["zeroFraction"] >= 0.25  # the int8 graph's zeros, rounding zeros included
    assert metrics["sparsity"] == 0.0
    assert metrics["parameters"] == metrics["baseline"]["metrics"]["parameters"] == 16 * 16 + 16
    assert metrics["sizeRatio"] < 1.0
