"""Gate verdicts: each gate set in spec.gates, judged on measured metrics. Only all-Successful passes.

When no quality gate is set (defaults.QUALITY_GATES) and spec.gates.defaults is true, the task's default
quality gate (defaults.DEFAULT_QUALITY_GATES) is judged, marked ``default``. Latency gates are judged on a
p95 from at least defaults.LATENCY_TIMED_RUNS timed runs, or else on a confidence bound of it. INT8
fidelity recorded by `kompressor prune` (compression.quantization.minAgreement, on validation) is enforced
too.
"""

from __future__ import annotations

from kompressor.api import defaults as d
from kompressor.api.fields import snake
from kompressor.api.spec import GatesSpec
from kompressor.api.status import GateResult, Gates, Metrics

SUCCESSFUL, FAILED, INCONCLUSIVE, ERROR = "Successful", "Failed", "Inconclusive", "Error"
DEFAULT_NOTE = "default gate: no quality gate is set (spec.gates.defaults: false opts out)"


def _judge(gate: str, value: float | None, threshold: float, at_most: bool, what: str,
           missing: str | None = None) -> GateResult:
    if value is None:
        return GateResult(gate=gate, value=None, threshold=threshold, outcome=ERROR,
                          message=missing or f"{what} was not measured")
    ok = value <= threshold if at_most else value >= threshold
    relation = ("<=" if at_most else ">=") if ok else (">" if at_most else "<")
    return GateResult(gate=gate, value=round(float(value), 6), threshold=threshold,
                      outcome=SUCCESSFUL if ok else FAILED, message=f"{what} {value:.4g} {relation} {threshold:.4g}")


def _drop(baseline: Metrics | None, metrics: Metrics, key: str) -> float | None:
    before = getattr(baseline, key, None) if baseline is not None else None
    after = getattr(metrics, key, None)
    return None if before is None or after is None else before - after


def _wrong_task(gate: str, threshold: float, needs: str, task: str) -> GateResult:
    return GateResult(gate=gate, value=None, threshold=threshold, outcome=ERROR,
                      message=f"{gate} needs a {needs} model; this one is {task}")


def _quality(gate: str, threshold: float, metrics: Metrics, baseline: Metrics | None, task: str) -> GateResult:
    """One quality gate, by its wire name."""
    no_base = "no baseline to compare with"
    if gate in ("maxAccuracyDrop", "minAccuracy", "minF1") and task != "classification":
        return _wrong_task(gate, threshold, "classification", task)
    if gate in ("maxMae", "maxRmse", "minR2", "maxR2Drop") and task != "regression":
        return _wrong_task(gate, threshold, "regression", task)
    if gate == "minAgreement" and task != "classification":
        return GateResult(gate=gate, value=None, threshold=threshold, outcome=ERROR,
                          message=f"top-1 agreement needs a classification model; this one is {task} "
                                  "(use minCosineSimilarity)")
    if gate == "maxAccuracyDrop":
        return _judge(gate, _drop(baseline, metrics, "accuracy"), threshold, True, "accuracy drop vs baseline",
                      missing="no baseline accuracy to compare with")
    if gate == "minAccuracy":
        return _judge(gate, metrics.accuracy, threshold, False, "accuracy")
    if gate == "minF1":
        return _judge(gate, metrics.f1, threshold, False, "macro-F1")
    if gate == "maxMae":
        return _judge(gate, metrics.mae, threshold, True, "mean absolute error")
    if gate == "maxRmse":
        return _judge(gate, metrics.rmse, threshold, True, "root mean squared error")
    if gate == "minR2":
        return _judge(gate, metrics.r2, threshold, False, "R²")
    if gate == "maxR2Drop":
        return _judge(gate, _drop(baseline, metrics, "r2"), threshold, True, "R² drop vs baseline",
                      missing="no baseline R² to compare with")
    if gate == "minAgreement":
        return _judge(gate, metrics.agreement, threshold, False, "top-1 agreement with the uncompressed model",
                      missing=no_base)
    if gate == "minCosineSimilarity":
        return _judge(gate, metrics.cosine_similarity, threshold, False,
                      "mean cosine similarity to the uncompressed model's outputs", missing=no_base)
    raise ValueError(f"unknown quality gate {gate!r}")


def _latency(threshold: float, metrics: Metrics) -> GateResult:
    gate, runs = "maxLatencyP95Ms", metrics.latency_runs
    if metrics.latency_p95_ms is None:
        return _judge(gate, None, threshold, True, "p95 latency")
    if runs is None or runs >= d.LATENCY_TIMED_RUNS:
        return _judge(gate, metrics.latency_p95_ms, threshold, True,
                      f"p95 latency (ms, batch 1, {runs or 'unknown'} runs, {metrics.latency_threads} threads)")
    if metrics.latency_p95_upper_ms is None:
        return GateResult(gate=gate, value=metrics.latency_p95_ms, threshold=threshold, outcome=INCONCLUSIVE,
                          message=f"p95 from {runs} timed runs: a latency gate needs {d.LATENCY_TIMED_RUNS} "
                                  "runs, or enough for a confidence bound")
    return _judge(gate, metrics.latency_p95_upper_ms, threshold, True,
                  f"95 % upper confidence bound of the p95 latency (ms, batch 1, only {runs} runs)")


def _int8_fidelity(manifest: dict | None, min_agreement: float | None) -> GateResult | None:
    """INT8 fidelity as `kompressor prune` recorded it (achieved.quantization.fidelity: top-1 agreement or
    cosine similarity with the float model on the whole validation split), enforced as a gate. 0 opts out."""
    q = ((manifest or {}).get("achieved") or {}).get("quantization") or {}
    if not q or q.get("mode", "none") == "none":
        return None
    fid = q.get("fidelity") if isinstance(q.get("fidelity"), dict) else {}
    threshold = fid.get("minAgreement", min_agreement)
    if not threshold or fid.get("enforced") is False:
        return None
    value = fid.get("value")
    if not isinstance(value, (int, float)):
        value = next((q[k] for k in ("agreement", "top1AgreementWithFp32") if isinstance(q.get(k), (int, float))),
                     None)
    gate = "quantization.minAgreement"
    what = f"INT8 {fid.get('metric') or 'agreement'} with the float model" + (
        f" ({fid['rows']} validation rows)" if fid.get("rows") else "")
    if fid.get("passed") is False:
        return GateResult(gate=gate, value=round(float(value), 6) if value is not None else None,
                          threshold=threshold, outcome=FAILED,
                          message=f"{what} missed the floor even after the node-wise fallback"
                                  + (f": {fid['reason']}" if fid.get("reason") else ""))
    return _judge(gate, value, threshold, False, what, missing="prune recorded no INT8 fidelity")


def quality_gates_set(spec: GatesSpec) -> list[str]:
    return [g for g in d.QUALITY_GATES if (spec.slices if g == "slices" else getattr(spec, snake(g)) is not None)]


def check_gates(spec: GatesSpec, metrics: Metrics, baseline: Metrics | None, *, task: str | None = None,
                manifest: dict | None = None, int8_min_agreement: float | None = None) -> Gates:
    task = task or metrics.task or "classification"
    results: list[GateResult] = []
    for gate in ("maxAccuracyDrop", "minAccuracy", "minF1"):
        if getattr(spec, snake(gate)) is not None:
            results.append(_quality(gate, getattr(spec, snake(gate)), metrics, baseline, task))
    if spec.max_latency_p95_ms is not None:
        results.append(_latency(spec.max_latency_p95_ms, metrics))
    if spec.max_size_ratio is not None:
        results.append(_judge("maxSizeRatio", metrics.size_ratio, spec.max_size_ratio, True,
                              "size relative to the baseline", missing="no baseline size to compare with"))
    if spec.max_calibration_error is not None:
        if task != "classification":
            results.append(_wrong_task("maxCalibrationError", spec.max_calibration_error, "classification", task))
        else:
            results.append(_judge("maxCalibrationError", metrics.ece, spec.max_calibration_error, True,
                                  "expected calibration error"))
    for gate in ("maxMae", "maxRmse", "minR2", "maxR2Drop", "minAgreement", "minCosineSimilarity"):
        if getattr(spec, snake(gate)) is not None:
            results.append(_quality(gate, getattr(spec, snake(gate)), metrics, baseline, task))
    if spec.defaults and not quality_gates_set(spec):
        for gate, threshold in d.DEFAULT_QUALITY_GATES[task].items():
            result = _quality(gate, threshold, metrics, baseline, task)
            result.default = True
            result.message = f"{result.message} ({DEFAULT_NOTE})"
            results.append(result)
    for gate in spec.slices:
        name = f"slices[{gate.name}].minAccuracy"
        if task != "classification":
            results.append(_wrong_task(name, gate.min_accuracy, "classification", task))
            continue
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
    int8 = _int8_fidelity(manifest, int8_min_agreement)
    if int8 is not None:
        results.append(int8)
    return Gates(passed=all(r.outcome == SUCCESSFUL for r in results), results=results)
