"""Gate verdicts and calibration error, on metrics built in the test."""

from __future__ import annotations

import numpy as np
import pytest

from kompressor.api.spec import GatesSpec, SliceGate
from kompressor.api.status import Metrics, SliceMetrics
from kompressor_jobs.evaluate.gates import check_gates
from kompressor_jobs.evaluate.metrics import expected_calibration_error, softmax


def metrics(**kw) -> Metrics:
    base = dict(accuracy=0.9, f1=0.88, ece=0.05, latency_p95_ms=2.0, size_ratio=0.3,
                slices={"a": SliceMetrics(accuracy=0.95, f1=0.9, samples=50),
                        "b": SliceMetrics(accuracy=0.7, f1=0.6, samples=5)})
    base.update(kw)
    return Metrics(**base)


def test_every_gate_kind_and_outcome():
    spec = GatesSpec(max_accuracy_drop=0.01, min_accuracy=0.85, min_f1=0.9, max_latency_p95_ms=5.0,
                     max_size_ratio=0.25, max_calibration_error=0.1, min_slice_samples=20,
                     slices=[SliceGate(name="a", min_accuracy=0.9), SliceGate(name="b", min_accuracy=0.5),
                             SliceGate(name="missing", min_accuracy=0.5)])
    baseline = Metrics(accuracy=0.905)
    verdict = check_gates(spec, metrics(), baseline)
    outcomes = {r.gate: r.outcome for r in verdict.results}
    assert outcomes == {
        "maxAccuracyDrop": "Successful", "minAccuracy": "Successful", "minF1": "Failed",
        "maxLatencyP95Ms": "Successful", "maxSizeRatio": "Failed", "maxCalibrationError": "Successful",
        "slices[a].minAccuracy": "Successful", "slices[b].minAccuracy": "Inconclusive",
        "slices[missing].minAccuracy": "Inconclusive",
    }
    assert verdict.passed is False
    drop = next(r for r in verdict.results if r.gate == "maxAccuracyDrop")
    assert drop.value == pytest.approx(0.905 - 0.9) and drop.threshold == 0.01
    small = next(r for r in verdict.results if r.gate == "slices[b].minAccuracy")
    assert "5 eval rows" in small.message and "minSliceSamples=20" in small.message


def test_only_all_successful_passes_and_no_gates_pass_trivially():
    spec = GatesSpec(min_accuracy=0.85, slices=[SliceGate(name="a", min_accuracy=0.9)])
    assert check_gates(spec, metrics(), None).passed is True
    assert check_gates(GatesSpec(), metrics(), None).passed is True


def test_missing_comparisons_are_errors_not_passes():
    spec = GatesSpec(max_accuracy_drop=0.5, max_size_ratio=1.0, slices=[SliceGate(name="a", min_accuracy=0.1)])
    verdict = check_gates(spec, metrics(size_ratio=None, slices=None), None)
    assert [r.outcome for r in verdict.results] == ["Error", "Error", "Error"]
    assert "no baseline" in verdict.results[0].message
    assert "no slice column" in verdict.results[2].message
    assert verdict.passed is False


def test_ece_is_zero_when_confidence_matches_accuracy_and_one_when_confidently_wrong():
    y = np.array([0, 1, 0, 1])
    sure_right = np.eye(2)[y]
    assert expected_calibration_error(sure_right, y) == pytest.approx(0.0)
    assert expected_calibration_error(np.eye(2)[1 - y], y) == pytest.approx(1.0)
    # confidence 0.75 everywhere, 3 of 4 right: calibrated
    probs = np.where(np.eye(2)[np.array([0, 1, 0, 0])] == 1, 0.75, 0.25)
    assert expected_calibration_error(probs, y) == pytest.approx(0.0)


def test_softmax_rows_sum_to_one_even_for_large_logits():
    p = softmax(np.array([[1000.0, 0.0], [0.0, 0.0]]))
    assert np.allclose(p.sum(axis=1), 1.0) and p[0, 0] == pytest.approx(1.0) and p[1, 0] == pytest.approx(0.5)
