"""Gate verdicts: each gate set in spec.gates, judged on measured metrics. Only all-Successful passes."""

from __future__ import annotations

from kompressor.api.spec import GatesSpec
from kompressor.api.status import GateResult, Gates, Metrics

SUCCESSFUL, FAILED, INCONCLUSIVE, ERROR = "Successful", "Failed", "Inconclusive", "Error"


def _judge(gate: str, value: float | None, threshold: float, at_most: bool, what: str,
           missing: str | None = None) -> GateResult:
    if value is None:
        return GateResult(gate=gate, value=None, threshold=threshold, outcome=ERROR,
                          message=missing or f"{what} was not measured")
    ok = value <= threshold if at_most else value >= threshold
    relation = ("<=" if at_most else ">=") if ok else (">" if at_most else "<")
    return GateResult(gate=gate, value=round(float(value), 6), threshold=threshold,
                      outcome=SUCCESSFUL if ok else FAILED, message=f"{what} {value:.4g} {relation} {threshold:.4g}")


def check_gates(spec: GatesSpec, metrics: Metrics, baseline: Metrics | None) -> Gates:
    results: list[GateResult] = []
    if spec.max_accuracy_drop is not None:
        drop = None
        if baseline is not None and baseline.accuracy is not None and metrics.accuracy is not None:
            drop = baseline.accuracy - metrics.accuracy
        results.append(_judge("maxAccuracyDrop", drop, spec.max_accuracy_drop, True, "accuracy drop vs baseline",
                              missing="no baseline accuracy to compare with"))
    if spec.min_accuracy is not None:
        results.append(_judge("minAccuracy", metrics.accuracy, spec.min_accuracy, False, "accuracy"))
    if spec.min_f1 is not None:
        results.append(_judge("minF1", metrics.f1, spec.min_f1, False, "macro-F1"))
    if spec.max_latency_p95_ms is not None:
        results.append(_judge("maxLatencyP95Ms", metrics.latency_p95_ms, spec.max_latency_p95_ms, True,
                              "measured p95 latency (ms, batch 1)"))
    if spec.max_size_ratio is not None:
        results.append(_judge("maxSizeRatio", metrics.size_ratio, spec.max_size_ratio, True,
                              "size relative to the baseline", missing="no baseline size to compare with"))
    if spec.max_calibration_error is not None:
        results.append(_judge("maxCalibrationError", metrics.ece, spec.max_calibration_error, True,
                              "expected calibration error"))
    for gate in spec.slices:
        name = f"slices[{gate.name}].minAccuracy"
        if metrics.slices is None:
            results.append(GateResult(gate=name, value=None, threshold=gate.min_accuracy, outcome=ERROR,
                                      message="the eval data has no slice column, so no slice can be checked"))
            continue
        got = metrics.slices.get(gate.name)
        samples = got.samples if got is not None and got.samples else 0
        if samples < spec.min_slice_samples:
            results.append(GateResult(
                gate=name, value=got.accuracy if got is not None else None, threshold=gate.min_accuracy,
                outcome=INCONCLUSIVE,
                message=f"slice {gate.name!r} has {samples} eval rows, fewer than "
                        f"minSliceSamples={spec.min_slice_samples}"))
            continue
        results.append(_judge(name, got.accuracy, gate.min_accuracy, False,
                              f"accuracy on slice {gate.name!r} ({samples} rows)"))
    return Gates(passed=all(r.outcome == SUCCESSFUL for r in results), results=results)
