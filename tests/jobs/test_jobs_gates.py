"""Gate verdicts, calibration error, fidelity measures, latency bounds, graph facts and the thread rule, on
values built in the test (every expected outcome follows from the inputs)."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from kompressor.api import defaults as d
from kompressor.api.spec import GatesSpec, SliceGate
from kompressor.api.status import Metrics, SliceMetrics
from kompressor_jobs import runtime
from kompressor_jobs.evaluate.gates import check_gates
from kompressor_jobs.evaluate.graph import compressed_size, macs, parameter_count
from kompressor_jobs.evaluate.metrics import (cosine_similarity, expected_calibration_error, fidelity,
                                              quantile_upper_bound, softmax)
from kompressor_jobs.runtime import cgroup_cpu_limit, cpu_quantity, graph_sparsity, ort_threads


def metrics(**kw) -> Metrics:
    base = dict(task="classification", accuracy=0.9, f1=0.88, ece=0.05, latency_p95_ms=2.0, latency_runs=1000,
                size_ratio=0.3, agreement=0.97, cosine_similarity=0.995,
                slices={"a": SliceMetrics(accuracy=0.95, f1=0.9, samples=50),
                        "b": SliceMetrics(accuracy=0.7, f1=0.6, samples=5)})
    base.update(kw)
    return Metrics(**base)


def outcomes(verdict) -> dict[str, str]:
    return {r.gate: r.outcome for r in verdict.results}


def test_every_gate_kind_and_outcome():
    spec = GatesSpec(max_accuracy_drop=0.01, min_accuracy=0.85, min_f1=0.9, max_latency_p95_ms=5.0,
                     max_size_ratio=0.25, max_calibration_error=0.1, min_agreement=0.98,
                     min_cosine_similarity=0.99, min_slice_samples=20,
                     slices=[SliceGate(name="a", min_accuracy=0.9), SliceGate(name="b", min_accuracy=0.5),
                             SliceGate(name="missing", min_accuracy=0.5)])
    verdict = check_gates(spec, metrics(), Metrics(accuracy=0.905))
    assert outcomes(verdict) == {
        "maxAccuracyDrop": "Successful", "minAccuracy": "Successful", "minF1": "Failed",
        "maxLatencyP95Ms": "Successful", "maxSizeRatio": "Failed", "maxCalibrationError": "Successful",
        "minAgreement": "Failed", "minCosineSimilarity": "Successful",
        "slices[a].minAccuracy": "Successful", "slices[b].minAccuracy": "Inconclusive",
        "slices[missing].minAccuracy": "Inconclusive",
    }
    assert verdict.passed is False
    drop = next(r for r in verdict.results if r.gate == "maxAccuracyDrop")
    assert drop.value == pytest.approx(0.905 - 0.9) and drop.threshold == 0.01 and drop.default is None
    small = next(r for r in verdict.results if r.gate == "slices[b].minAccuracy")
    assert "5 eval rows" in small.message and "minSliceSamples=20" in small.message


@pytest.mark.parametrize("gate, value, threshold, outcome", [
    ("max_mae", 0.30, 0.25, "Failed"), ("max_mae", 0.20, 0.25, "Successful"),
    ("max_rmse", 0.5, 0.4, "Failed"), ("min_r2", 0.79, 0.8, "Failed"), ("min_r2", 0.81, 0.8, "Successful"),
])
def test_regression_gates(gate, value, threshold, outcome):
    key = {"max_mae": "mae", "max_rmse": "rmse", "min_r2": "r2"}[gate]
    verdict = check_gates(GatesSpec(**{gate: threshold}), Metrics(task="regression", **{key: value}), None)
    assert [r.outcome for r in verdict.results] == [outcome]


def test_r2_drop_is_against_the_baseline():
    spec = GatesSpec(max_r2_drop=0.02)
    assert outcomes(check_gates(spec, Metrics(task="regression", r2=0.90), Metrics(r2=0.93))) == {
        "maxR2Drop": "Failed"}
    assert outcomes(check_gates(spec, Metrics(task="regression", r2=0.92), Metrics(r2=0.93))) == {
        "maxR2Drop": "Successful"}
    assert outcomes(check_gates(spec, Metrics(task="regression", r2=0.92), None)) == {"maxR2Drop": "Error"}


def test_gates_of_another_task_are_errors():
    verdict = check_gates(GatesSpec(min_accuracy=0.1, max_mae=1.0, min_agreement=0.5, max_calibration_error=0.5,
                                    slices=[SliceGate(name="a", min_accuracy=0.1)]),
                          Metrics(task="embedding", cosine_similarity=1.0), None)
    assert set(outcomes(verdict).values()) == {"Error"} and verdict.passed is False
    assert "use minCosineSimilarity" in next(r.message for r in verdict.results if r.gate == "minAgreement")


@pytest.mark.parametrize("task, measured, outcome", [
    ("classification", {"accuracy": 0.98}, "Successful"), ("classification", {"accuracy": 0.97}, "Failed"),
    ("regression", {"r2": 0.895}, "Successful"), ("regression", {"r2": 0.88}, "Failed"),
    ("embedding", {"cosine_similarity": 0.995}, "Successful"), ("embedding", {"cosine_similarity": 0.98}, "Failed"),
])
def test_no_quality_gate_means_the_tasks_default_gate(task, measured, outcome):
    baseline = Metrics(accuracy=0.985, r2=0.9)
    # a latency or size gate alone does not protect users: the default quality gate still applies
    verdict = check_gates(GatesSpec(max_size_ratio=1.0), Metrics(task=task, size_ratio=0.5, **measured), baseline)
    [(gate, threshold)] = d.DEFAULT_QUALITY_GATES[task].items()
    default = [r for r in verdict.results if r.default]
    assert [(r.gate, r.threshold, r.outcome) for r in default] == [(gate, threshold, outcome)]
    assert "default gate" in default[0].message
    assert verdict.passed is (outcome == "Successful")
    # opting out explicitly leaves only the gates that are set
    opted_out = check_gates(GatesSpec(max_size_ratio=1.0, defaults=False), Metrics(task=task, size_ratio=0.5,
                                                                                   **measured), baseline)
    assert outcomes(opted_out) == {"maxSizeRatio": "Successful"} and opted_out.passed is True


def test_kubectl_explain_names_the_default_gates_and_the_opt_out():
    """What `kubectl explain compressedmodel.spec.gates[.defaults]` prints: the committed CRD's descriptions."""
    from pathlib import Path

    import yaml

    crd = Path(__file__).resolve().parents[2] / "crds" / "compressedmodels.kompressor.io.yaml"
    schema = yaml.safe_load(crd.read_text())["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    gates = schema["properties"]["spec"]["properties"]["gates"]
    text = " ".join(gates["properties"]["defaults"]["description"].split())
    for task, defaults in d.DEFAULT_QUALITY_GATES.items():
        [(gate, threshold)] = defaults.items()
        assert f"{task}: {gate} {threshold}" in text
    assert "false opts out explicitly" in text and gates["properties"]["defaults"]["default"] is True
    assert "default quality gate applies" in " ".join(gates["description"].split())


def test_any_quality_gate_replaces_the_default():
    for spec in (GatesSpec(min_f1=0.5), GatesSpec(slices=[SliceGate(name="a", min_accuracy=0.5)]),
                 GatesSpec(min_agreement=0.5)):
        assert not any(r.default for r in check_gates(spec, metrics(), Metrics(accuracy=0.9)).results)


def test_missing_comparisons_are_errors_not_passes():
    spec = GatesSpec(max_accuracy_drop=0.5, max_size_ratio=1.0, min_cosine_similarity=0.5,
                     slices=[SliceGate(name="a", min_accuracy=0.1)])
    verdict = check_gates(spec, metrics(size_ratio=None, slices=None, cosine_similarity=None), None)
    assert [r.outcome for r in verdict.results] == ["Error"] * 4
    assert "no baseline" in verdict.results[0].message
    assert "no slice column" in verdict.results[-1].message
    assert verdict.passed is False


def test_latency_gates_need_enough_runs_or_a_confidence_bound():
    spec = GatesSpec(max_latency_p95_ms=2.5, defaults=False)
    full = check_gates(spec, metrics(latency_p95_ms=2.0, latency_p95_upper_ms=3.0, latency_runs=1000), None)
    assert outcomes(full) == {"maxLatencyP95Ms": "Successful"} and full.results[0].value == 2.0
    # 60 runs (a search probe): the bound, not the point estimate, is compared
    few = check_gates(spec, metrics(latency_p95_ms=2.0, latency_p95_upper_ms=3.0, latency_runs=60), None)
    assert outcomes(few) == {"maxLatencyP95Ms": "Failed"} and few.results[0].value == 3.0
    assert "upper confidence bound" in few.results[0].message
    # too few runs for any bound: no verdict
    none = check_gates(spec, metrics(latency_p95_ms=2.0, latency_p95_upper_ms=None, latency_runs=30), None)
    assert outcomes(none) == {"maxLatencyP95Ms": "Inconclusive"} and none.passed is False


def test_p95_upper_bound_is_the_right_order_statistic():
    def binom_cdf(k: int, n: int, q: Fraction) -> Fraction:  # exact P(Binomial(n, q) <= k)
        return sum(math.comb(n, i) * q ** i * (1 - q) ** (n - i) for i in range(k + 1))

    q = Fraction(95, 100)
    assert quantile_upper_bound(np.arange(1.0, 59.0)) is None  # 58 runs: even the maximum is not a 95 % bound
    for n in (59, 120, 400):
        times = np.random.default_rng(n).permutation(np.arange(1.0, n + 1))  # the k-th smallest is k
        k = int(quantile_upper_bound(times))
        assert binom_cdf(k - 1, n, q) >= Fraction(95, 100) > binom_cdf(k - 2, n, q)
    assert quantile_upper_bound(np.arange(1.0, 60.0)) == 59.0


def test_int8_fidelity_recorded_by_prune_is_enforced():
    def manifest(**fid):
        return {"achieved": {"quantization": {"mode": "dynamic-int8", "fidelity": {
            "metric": "top1Agreement", "rows": 300, "minAgreement": 0.99, **fid}}}}

    spec = GatesSpec(min_accuracy=0.5)
    kw = dict(int8_min_agreement=0.99)
    failed = check_gates(spec, metrics(), None, manifest=manifest(value=0.97, passed=False, reason="64 nodes"), **kw)
    assert outcomes(failed)["quantization.minAgreement"] == "Failed" and failed.passed is False
    assert "300 validation rows" in failed.results[-1].message and "64 nodes" in failed.results[-1].message
    below = check_gates(spec, metrics(), None, manifest=manifest(value=0.98), **kw)
    assert outcomes(below)["quantization.minAgreement"] == "Failed"
    ok = check_gates(spec, metrics(), None, manifest=manifest(value=0.995, passed=True), **kw)
    assert outcomes(ok) == {"minAccuracy": "Successful", "quantization.minAgreement": "Successful"}
    opted_out = check_gates(spec, metrics(), None, manifest=manifest(value=0.5, enforced=False, minAgreement=0),
                            int8_min_agreement=0)
    assert outcomes(opted_out) == {"minAccuracy": "Successful"}
    float_model = check_gates(spec, metrics(), None, manifest={"achieved": {"method": "structured"}}, **kw)
    assert outcomes(float_model) == {"minAccuracy": "Successful"}


# --- measures ---------------------------------------------------------------------------------

def test_ece_is_zero_when_confidence_matches_accuracy_and_one_when_confidently_wrong():
    y = np.array([0, 1, 0, 1])
    assert expected_calibration_error(np.eye(2)[y], y) == pytest.approx(0.0)
    assert expected_calibration_error(np.eye(2)[1 - y], y) == pytest.approx(1.0)


def binary_probs(confidence: float, rows: int, right: int) -> tuple[np.ndarray, np.ndarray]:
    """``rows`` rows predicting class 0 with ``confidence``, ``right`` of them labelled 0."""
    probs = np.tile([confidence, 1 - confidence], (rows, 1))
    return probs, np.array([0] * right + [1] * (rows - right))


def test_ece_weighs_several_bins_by_their_share_of_rows():
    groups = [(0.55, 4, 2), (0.75, 8, 6), (0.95, 20, 20)]  # bins 8, 11, 14 of 15
    parts = [binary_probs(*g) for g in groups]
    probs, y = np.concatenate([p for p, _ in parts]), np.concatenate([t for _, t in parts])
    n = sum(g[1] for g in groups)
    expected = sum(rows / n * abs(right / rows - conf) for conf, rows, right in groups)
    assert expected == pytest.approx(4 / 32 * 0.05 + 0 + 20 / 32 * 0.05)
    assert expected_calibration_error(probs, y) == pytest.approx(expected)
    # with one bin the groups' errors would cancel out; with 15 they do not
    assert expected_calibration_error(probs, y, bins=1) == pytest.approx(
        abs(28 / 32 - (4 * 0.55 + 8 * 0.75 + 20 * 0.95) / 32))


def test_softmax_rows_sum_to_one_even_for_large_logits():
    p = softmax(np.array([[1000.0, 0.0], [0.0, 0.0]]))
    assert np.allclose(p.sum(axis=1), 1.0) and p[0, 0] == pytest.approx(1.0) and p[1, 0] == pytest.approx(0.5)


def test_fidelity_measures():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(50, 3))
    same = fidelity("classification", logits + 5.0, logits)  # a constant shift changes no probability
    assert same["agreement"] == 1.0 and same["kl_divergence"] == pytest.approx(0, abs=1e-12)
    flipped = fidelity("classification", -logits, logits)
    assert flipped["agreement"] == pytest.approx(float((logits.argmax(1) == (-logits).argmax(1)).mean()))
    assert flipped["kl_divergence"] > 0.5
    # per-row cosine for vectors; a scalar output per row is compared as one column over the rows
    assert cosine_similarity(3 * logits, logits) == pytest.approx(1.0)
    assert cosine_similarity(-logits, logits) == pytest.approx(-1.0)
    column = rng.normal(size=(40, 1))
    assert cosine_similarity(column + 0.1, column) == pytest.approx(
        float((column[:, 0] + 0.1) @ column[:, 0] / np.linalg.norm(column + 0.1) / np.linalg.norm(column)))


# --- graph facts ------------------------------------------------------------------------------

def _save(tmp_path, nodes, inputs, outputs, inits, name="m.onnx"):
    graph = helper.make_graph(nodes, "g", inputs, outputs, [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / name
    onnx.save(model, str(path))
    return path, model


def test_int8_sparsity_counts_zero_points_not_int8_zeros(tmp_path):
    """Quantized weights are zero where they equal their zero point (per tensor or per channel)."""
    q = np.zeros((6, 4), np.int8)  # 24 int8 zeros, none of them a zero weight (the zero point is 3)
    q[0] = 3  # 4 true zeros
    zp_ch = np.array([1, -2, 0], dtype=np.int8)  # MatMul weights: one zero point per output column
    q_ch = np.full((4, 3), 7, np.int8)
    q_ch[:2, 0], q_ch[:1, 1], q_ch[:, 2] = 1, -2, 0  # 2 + 1 + 4 true zeros
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 6])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])
    nodes = [helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["w"]),
             helper.make_node("MatMul", ["x", "w"], ["h"]),
             helper.make_node("DequantizeLinear", ["q_ch", "s_ch", "zp_ch"], ["w_ch"], axis=1),
             helper.make_node("MatMul", ["h", "w_ch"], ["y"])]
    path, model = _save(tmp_path, nodes, [x], [y], {
        "q": q, "s": np.float32(0.1), "zp": np.int8(3), "q_ch": q_ch,
        "s_ch": np.full(3, 0.1, np.float32), "zp_ch": zp_ch})
    assert graph_sparsity(path) == (pytest.approx((4 + 7) / 36), 36)
    # scales and zero points are not parameters
    assert parameter_count(model) == q.size + q_ch.size


def test_macs_of_conv_gemm_and_matmul(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 5])
    w = np.zeros((4, 3, 3, 3), np.float32)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),  # -> [n, 4, 8, 8]
             helper.make_node("Flatten", ["c"], ["f"]),  # -> [n, 256]
             helper.make_node("Gemm", ["f", "g", "gb"], ["h"], transB=1),  # g: [16, 256]
             helper.make_node("MatMul", ["h", "m"], ["y"])]  # m: [16, 5]
    _, model = _save(tmp_path, nodes, [x], [y], {"w": w, "g": np.zeros((16, 256), np.float32),
                                                  "gb": np.zeros(16, np.float32), "m": np.zeros((16, 5), np.float32)})
    conv = 4 * 8 * 8 * (3 * 3 * 3)
    assert macs(model, {"x": [1, 3, 8, 8]}) == conv + 256 * 16 + 16 * 5
    assert parameter_count(model) == w.size + 16 * 256 + 16 + 16 * 5


def test_compressed_size_is_what_a_gzip_pull_costs(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "model.onnx").write_bytes(bytes(1 << 20))
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "model.onnx").write_bytes(np.random.default_rng(0).bytes(1 << 20))
    assert compressed_size(tmp_path / "a") < 10_000 < (1 << 20) < compressed_size(tmp_path / "b")


# --- ONNX Runtime threads: one rule for serving and evaluation --------------------------------

def test_threads_follow_the_cpu_limit(tmp_path, monkeypatch):
    assert [cpu_quantity(v) for v in ("500m", "2", 1.5, "2500m", None, "lots")] == [0.5, 2.0, 1.5, 2.5, None, None]
    assert ort_threads("500m", env={}) == 1 and ort_threads("2500m", env={}) == 2 and ort_threads(3, env={}) == 3
    assert ort_threads("4", env={"KOMPRESSOR_ORT_THREADS": "1"}) == 1  # an explicit setting wins
    cpu_max = tmp_path / "cpu.max"
    cpu_max.write_text("150000 100000\n")
    assert cgroup_cpu_limit(cpu_max) == 1.5
    monkeypatch.setattr(runtime, "CGROUP_CPU_MAX", cpu_max)
    assert ort_threads(None, env={}) == 1  # the server: its own Pod's limit
    assert ort_threads(None, env={}, own_cgroup=False) == 0  # evaluation for an unlimited serving Pod
    cpu_max.write_text("max 100000\n")
    assert cgroup_cpu_limit(cpu_max) is None and ort_threads(None, env={}) == 0
