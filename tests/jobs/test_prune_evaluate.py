"""`kompressor prune` then `kompressor evaluate`, through the CLI, for every method, schedule and
quantization mode; expectations are computed from the written files (ONNX initializers, a direct ONNX
Runtime run), never hard-coded."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from jobs_support import onnx_weights, ort_predict
from kompressor.api.report import EvalReport
from kompressor.store import resolve_local, verify_artifact
from kompressor_jobs.data import load_dataset
from kompressor_jobs.compress.pruning import polynomial_schedule

pytestmark = pytest.mark.slow


def zero_fraction(path: Path) -> float:
    weights = onnx_weights(path)
    return sum(int((w == 0).sum()) for w in weights) / sum(w.size for w in weights)


def parameter_count(path: Path) -> int:
    return sum(w.size for w in onnx_weights(path))


def removed_or_zero(candidate: Path, baseline: Path, manifest: dict) -> float:
    """The fraction of the baseline's weights that are gone from the candidate: removed (structured) or zero.
    For an int8 graph, the zeros are those of the float graph before quantization (prune records them)."""
    quantized = (manifest["achieved"].get("quantization") or {}).get("mode", "none") != "none"
    zeros = manifest["achieved"]["graphSparsity"] if quantized else zero_fraction(candidate)
    return 1 - parameter_count(candidate) * (1 - zeros) / parameter_count(baseline)


def check_common(candidate: Path, manifest: dict, metrics: dict, eval_uri: str, input_shape: list[int]) -> None:
    """What holds for every prune+evaluate run."""
    report = EvalReport.from_json(metrics)
    # the artifact and its baseline verify against the digests that metrics.json names
    assert report.artifact.uri == candidate.absolute().as_uri()
    verify_artifact(candidate, report.artifact.sha256)
    baseline_dir = resolve_local(manifest["baseline"]["uri"])
    assert verify_artifact(baseline_dir, report.baseline_artifact.sha256)["revision"] == 0
    assert report.baseline_artifact.sha256 == manifest["baseline"]["sha256"]
    # the reported accuracy is what a direct ONNX Runtime run gives (one request per row)
    data = load_dataset(eval_uri, input_shape)
    direct = (ort_predict(candidate / "model.onnx", data.X).argmax(axis=1) == data.y).mean()
    assert metrics["accuracy"] == pytest.approx(direct, abs=1e-6)
    baseline_direct = (ort_predict(baseline_dir / "model.onnx", data.X).argmax(axis=1) == data.y).mean()
    assert report.baseline_metrics.accuracy == pytest.approx(baseline_direct, abs=1e-6)
    # real sparsity and size, read from the files
    assert metrics["sparsity"] == pytest.approx(
        removed_or_zero(candidate / "model.onnx", baseline_dir / "model.onnx", manifest), abs=1e-5)
    if (manifest["achieved"].get("quantization") or {}).get("mode", "none") == "none":
        assert metrics["zeroFraction"] == pytest.approx(zero_fraction(candidate / "model.onnx"), abs=1e-6)
    assert metrics["sizeBytes"] == (candidate / "model.onnx").stat().st_size
    assert metrics["sizeRatio"] == pytest.approx(
        metrics["sizeBytes"] / (baseline_dir / "model.onnx").stat().st_size, abs=1e-6)
    # latency is measured as served (the job env pins 1 thread) from enough runs, beside the baseline's
    assert 0 < metrics["latencyP50Ms"] <= metrics["latencyP95Ms"] <= metrics["latencyP99Ms"]
    assert metrics["latencyRuns"] >= 1000 and metrics["latencyThreads"] == 1
    assert metrics["throughputRps"] > 0 and report.baseline_metrics.throughput_rps > 0
    assert metrics["speedup"] == pytest.approx(report.baseline_metrics.latency_p50_ms / metrics["latencyP50Ms"],
                                               rel=1e-3)
    assert 0 < metrics["macs"] <= report.baseline_metrics.macs and metrics["parameters"] > 0
    assert sum(s["samples"] for s in metrics["slices"].values()) == len(data)
    # the manifest records provenance and what the server needs
    assert manifest["input"]["name"] == "input" and manifest["input"]["shape"] == [-1, *input_shape]
    assert manifest["input"]["dtype"] == "float32"
    assert manifest["data"]["eval"]["sha256"] == data.digest
    assert set(manifest["versions"]) >= {"torch", "onnxruntime", "onnx", "torchPruning"}
    import torch

    # --device auto: CUDA where torch sees a GPU (the GPU name is then recorded), CPU otherwise
    on_gpu = torch.cuda.is_available()
    assert manifest["hardware"]["device"] == ("cuda" if on_gpu else "cpu") and "cpuFlags" in manifest["hardware"]
    assert ("gpu" in manifest["hardware"]) == on_gpu
    for name in ("model_card.md", "model_card.json"):
        assert (candidate.parent / "eval" / name).is_file()


@pytest.mark.parametrize("method", ["unstructured", "global", "structured"])
@pytest.mark.parametrize("schedule", ["oneshot", "gradual"])
def test_methods_and_schedules(jobs, write_spec, method, schedule):
    sparsity = 0.6
    spec = write_spec({"compression": {"pruning": {"method": method, "sparsity": sparsity, "schedule": schedule,
                                                   "steps": 3, "fineTuneEpochs": 1}},
                       "gates": {"minAccuracy": 0.5}})
    candidate, manifest, metrics = jobs.prune_and_evaluate(spec)
    check_common(candidate, manifest, metrics, "builtin://breast_cancer?split=eval", [30])
    steps = manifest["achieved"]["stepSparsities"]
    expected_steps = [sparsity] if schedule == "oneshot" else polynomial_schedule(sparsity, 3)
    assert steps == pytest.approx(expected_steps, abs=1e-6)
    assert steps == sorted(steps)
    model = candidate / "model.onnx"
    baseline = resolve_local(manifest["baseline"]["uri"]) / "model.onnx"
    if method == "structured":
        # whole neurons are gone: fewer weights, physically smaller matrices, no masks of zeros
        kept = parameter_count(model) / parameter_count(baseline)
        assert kept < 0.6
        assert manifest["achieved"]["parametersAfter"] < manifest["achieved"]["parametersBefore"]
        # status.sparsity shows the fraction removed (not 0.00 for a revision this much smaller)
        assert metrics["sparsity"] == pytest.approx(1 - kept, abs=1e-5) and metrics["sparsity"] > 0.4
        assert metrics["zeroFraction"] < 0.05 and metrics["sizeRatio"] < 0.6
        assert metrics["macs"] < 0.6 * metrics["baseline"]["metrics"]["macs"]
    else:
        assert metrics["sparsity"] == pytest.approx(sparsity, abs=0.01)
        per_layer = [float((w == 0).mean()) for w in onnx_weights(model)]
        if method == "unstructured":  # every layer at the target
            assert per_layer == pytest.approx([sparsity] * len(per_layer), abs=0.01)
        else:  # one global threshold: layers end up at different sparsities
            assert max(per_layer) - min(per_layer) > 0.05
    assert metrics["gates"]["passed"] is True
    assert [r["outcome"] for r in metrics["gates"]["results"]] == ["Successful"]


def test_dynamic_int8_quantizes_weights_of_a_structured_mlp(jobs, write_spec):
    spec = write_spec({
        "model": {"uri": "builtin://digits-mlp"},
        "data": {"train": "builtin://digits?split=train", "eval": "builtin://digits?split=eval"},
        "compression": {"pruning": {"method": "structured", "sparsity": 0.5, "fineTuneEpochs": 1},
                        "quantization": {"mode": "dynamic-int8"}},
        "gates": {"maxAccuracyDrop": 0.03, "maxSizeRatio": 0.3},
    })
    candidate, manifest, metrics = jobs.prune_and_evaluate(spec)
    check_common(candidate, manifest, metrics, "builtin://digits?split=eval", [64])
    graph = onnx.load(str(candidate / "model.onnx")).graph
    assert {"DynamicQuantizeLinear", "MatMulInteger"} & {n.op_type for n in graph.node}
    assert any(i.data_type == onnx.TensorProto.INT8 and len(i.dims) == 2 for i in graph.initializer)
    assert metrics["sizeRatio"] < 0.3  # 4x from int8 on top of the removed neurons
    assert manifest["achieved"]["quantization"]["mode"] == "dynamic-int8"
    assert metrics["gates"]["passed"] is True


def test_static_int8_is_per_channel_qdq_on_a_cnn(jobs, write_spec):
    spec = write_spec({
        "model": {"uri": "builtin://digits-cnn"},
        "data": {"train": "builtin://digits?split=train", "eval": "builtin://digits?split=eval"},
        "compression": {"pruning": {"method": "global", "sparsity": 0.5, "schedule": "gradual", "steps": 2,
                                    "fineTuneEpochs": 1},
                        "quantization": {"mode": "static-int8"}},
        "gates": {"maxAccuracyDrop": 0.05, "slices": [{"name": "even", "minAccuracy": 0.8}]},
    })
    candidate, manifest, metrics = jobs.prune_and_evaluate(spec)
    check_common(candidate, manifest, metrics, "builtin://digits?split=eval", [1, 8, 8])
    graph = onnx.load(str(candidate / "model.onnx")).graph
    ops = {n.op_type for n in graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops
    # per-channel: the conv weights have one scale per output channel
    conv_weights = [i for i in graph.initializer if len(i.dims) == 4]
    scales = {i.name: list(i.dims) for i in graph.initializer if i.name.endswith("weight_scale")}
    assert conv_weights and all(any(dims == [w.dims[0]] for dims in scales.values()) for w in conv_weights)
    # zeros of the quantized weights: at least the pruned fraction
    assert metrics["sparsity"] >= 0.49
    assert metrics["gates"]["passed"] is True
    # INT8 fidelity recorded by prune (agreement with the float model on validation) is enforced as a gate
    assert [r["gate"] for r in metrics["gates"]["results"]] == ["maxAccuracyDrop", "slices[even].minAccuracy",
                                                               "quantization.minAgreement"]


def test_each_gate_fails_on_its_own_when_the_model_is_pruned_too_far(jobs, write_spec, tmp_path):
    """99 % of every layer's weights zeroed and no fine-tuning: the model is wrecked. For each gate, one
    evaluation sets that gate to a threshold such a model cannot meet and every other gate to one any model
    meets; only that gate fails, and the revision fails. Thresholds come from what the inputs guarantee (a
    dense artifact with zeros is as large as the baseline; ONNX Runtime cannot run a graph in a microsecond;
    a slice of a 143-row eval set has fewer than 1000 rows), never from the measured values."""
    spec = write_spec({"compression": {"pruning": {"method": "unstructured", "sparsity": 0.99,
                                                   "fineTuneEpochs": 0}}})
    candidate = tmp_path / "wrecked"
    code, err = jobs.prune(spec, candidate)
    assert code == 0, err
    failing = {"maxAccuracyDrop": 0.05, "minAccuracy": 0.9, "minF1": 0.9, "minAgreement": 0.95,
               "minCosineSimilarity": 0.999, "maxCalibrationError": 0.0, "maxSizeRatio": 0.5,
               "maxLatencyP95Ms": 0.001}
    passing = {"maxAccuracyDrop": 1.0, "minAccuracy": 0.0, "minF1": 0.0, "minAgreement": 0.0,
               "minCosineSimilarity": -1.0, "maxCalibrationError": 1.0, "maxSizeRatio": 1.5,
               "maxLatencyP95Ms": 60_000.0}
    for gate in failing:
        out = tmp_path / f"eval-{gate}"
        code, err = jobs.evaluate(write_spec({"gates": {**passing, gate: failing[gate]}}), candidate, out)
        assert code == 0, err
        metrics = json.loads((out / "metrics.json").read_text())
        verdict = {r["gate"]: r["outcome"] for r in metrics["gates"]["results"]}
        assert verdict == {g: "Failed" if g == gate else "Successful" for g in failing}, gate
        assert metrics["gates"]["passed"] is False
    # with every gate at its passing threshold, the same wreck passes: the failures above were each gate's own
    code, err = jobs.evaluate(write_spec({"gates": passing}), candidate, tmp_path / "eval-all-passing")
    assert code == 0, err
    assert EvalReport.read(tmp_path / "eval-all-passing").gates.passed is True
    # a slice gate on too few rows is Inconclusive (not passed); no quality gate at all: the default applies
    code, err = jobs.evaluate(write_spec({"gates": {"minSliceSamples": 1000,
                                                    "slices": [{"name": "small-radius", "minAccuracy": 0.0}]}}),
                              candidate, tmp_path / "eval-slice")
    assert code == 0, err
    [slice_gate] = EvalReport.read(tmp_path / "eval-slice").gates.results
    assert slice_gate.outcome == "Inconclusive" and "fewer than minSliceSamples=1000" in slice_gate.message
    card = (tmp_path / "eval-slice" / "model_card.md").read_text()
    assert "did not pass its gates" in card and "Inconclusive" in card
    code, err = jobs.evaluate(write_spec({}), candidate, tmp_path / "eval-default")
    assert code == 0, err
    [default] = EvalReport.read(tmp_path / "eval-default").gates.results
    assert (default.gate, default.threshold, default.default, default.outcome) == (
        "maxAccuracyDrop", 0.01, True, "Failed")


# The accuracy-aware search (validation probes, eval confirmation, fallback): tests/jobs/test_search.py


def rows_sha256(feed: dict) -> str:
    import hashlib

    digest = hashlib.sha256()
    for array in feed.values():
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def test_the_onnx_parity_check_reads_validation_rows_never_eval(jobs, write_spec, tmp_path):
    """Eval is left to the gates: prune's export parity check runs on validation rows. The eval file here is
    finite but overflows the model (ONNX Runtime answers NaN on it), so a parity check on it could not pass:
    prune succeeds only if parity never reads eval, and the manifests name the rows it did read."""
    from kompressor.api import defaults as d
    from kompressor_jobs.data import split_validation

    pool = load_dataset("builtin://breast_cancer?split=eval")
    signs = np.where(np.arange(pool.X.shape[1]) % 2 == 0, 1.0, -1.0).astype(np.float32)
    poisoned = tmp_path / "eval-overflows.npz"
    np.savez(poisoned, X=np.broadcast_to(signs * np.float32(3e38), pool.X.shape).copy(), y=pool.y)
    spec = write_spec({"data": {"eval": f"file://{poisoned}"}, "compression": {"pruning": {"fineTuneEpochs": 0}}})
    candidate = tmp_path / "candidate"
    code, err = jobs.run("prune", "--spec", str(spec), "--out", str(candidate),
                         "--baseline-cache", str(tmp_path / "fresh-baselines"))  # the baseline is exported here too
    assert code == 0, err
    manifest = json.loads((candidate / "manifest.json").read_text())
    baseline = resolve_local(manifest["baseline"]["uri"])
    outputs = ort_predict(baseline / "model.onnx", load_dataset(f"file://{poisoned}").X[:8])
    assert np.isnan(outputs).any(), "the eval rows should make ONNX Runtime answer NaN (no parity possible)"
    # the rows checked are the first 64 of the held-out validation split, byte for byte
    _, validation = split_validation(load_dataset("builtin://breast_cancer?split=train"), d.VALIDATION_FRACTION,
                                     d.VALIDATION_SEED)
    expected = {"data": "validation", "rows": 64, "sha256": rows_sha256(validation.feed(0, 64))}
    for record in (manifest["achieved"]["parityRows"], verify_artifact(baseline)["parityRows"]):
        assert {k: record[k] for k in expected} == expected
    assert "parity" in manifest["data"]["validation"]["usedFor"]
    assert "gates only" in manifest["data"]["eval"]["usedFor"]


def test_baseline_is_exported_once_per_source_digest(jobs, write_spec):
    spec = write_spec({"compression": {"pruning": {"fineTuneEpochs": 0}}})
    _, first, _ = jobs.prune_and_evaluate(spec, "r1")
    baseline = resolve_local(first["baseline"]["uri"])
    stamp = (baseline / "model.onnx").stat().st_mtime_ns
    _, second, _ = jobs.prune_and_evaluate(spec, "r2")
    assert second["baseline"] == first["baseline"]
    assert (baseline / "model.onnx").stat().st_mtime_ns == stamp
    assert baseline.name.startswith(first["model"]["sha256"][:16])
    # a damaged baseline is rebuilt rather than trusted
    (baseline / "model.onnx").write_bytes(b"damaged")
    _, third, _ = jobs.prune_and_evaluate(spec, "r3")
    verify_artifact(resolve_local(third["baseline"]["uri"]), third["baseline"]["sha256"])


def test_retrain_fine_tunes_on_the_retrain_data(jobs, write_spec, tmp_path):
    """A retrained revision is fine-tuned on data.retrain, not re-pruned: on "recent" data whose labels are the
    opposite of the training data's, the retrained model learns them and the plainly pruned one does not."""
    train = load_dataset("builtin://breast_cancer?split=train")
    path = tmp_path / "recent.npz"
    X, flipped = train.X[:200], 1 - train.y[:200]
    np.savez(path, X=X, y=flipped)
    # Distillation off: with it, the uncompressed teacher (which learned the old labels) holds the student back.
    spec = write_spec({"data": {"retrain": f"file://{path}"},
                       "compression": {"pruning": {"sparsity": 0.3, "fineTuneEpochs": 10},
                                       "distillation": {"enabled": False}}})
    pruned, retrained = tmp_path / "pruned", tmp_path / "retrained"
    code, err = jobs.prune(spec, pruned)
    assert code == 0, err
    code, err = jobs.prune(spec, retrained, "--retrain", "--revision", "7")
    assert code == 0, err
    manifest = verify_artifact(retrained)
    assert manifest["revision"] == 7 and manifest["data"]["retrain"] is True
    assert manifest["data"]["train"]["uri"] == f"file://{path}"
    # validation is held out of the retrain data, and those rows are not trained on
    assert manifest["data"]["validation"]["heldOutOf"] == f"file://{path}"
    assert manifest["data"]["train"]["rows"] + manifest["data"]["validation"]["rows"] == 200
    assert manifest["achieved"]["fineTuneSeconds"] > 0

    def agreement(folder):
        return float((ort_predict(folder / "model.onnx", X).argmax(1) == flipped).mean())

    assert agreement(retrained) > agreement(pruned) + 0.25, (agreement(retrained), agreement(pruned))


def test_file_model_pt2_is_pruned_structurally(jobs, write_spec, tmp_path):
    import torch
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(30, 48), nn.ReLU(), nn.Linear(48, 32), nn.ReLU(), nn.Linear(32, 2))
    program = torch.export.export(model, (torch.zeros(4, 30),), dynamic_shapes=({0: torch.export.Dim.DYNAMIC},))
    path = tmp_path / "model.pt2"
    torch.export.save(program, str(path))
    spec = write_spec({"model": {"uri": f"file://{path}", "inputShape": [30]},
                       "compression": {"pruning": {"method": "structured", "sparsity": 0.5, "fineTuneEpochs": 2}}})
    candidate, manifest, metrics = jobs.prune_and_evaluate(spec)
    check_common(candidate, manifest, metrics, "builtin://breast_cancer?split=eval", [30])
    shapes = sorted(tuple(w.shape) for w in onnx_weights(candidate / "model.onnx"))
    assert shapes == sorted([(24, 30), (16, 24), (2, 16)])
    import hashlib

    assert manifest["model"]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()


def test_bundled_example_passes_its_gates_through_the_real_command(tmp_path, job_env):
    """The example users start from, run as the Jobs run it: `kompressor --json-logs prune|evaluate`."""
    from jobs_support import run_cli

    example = Path(__file__).resolve().parents[2] / "examples" / "digits-cpu.yaml"
    candidate, evaluation = tmp_path / "candidate", tmp_path / "eval"
    pruned = run_cli("prune", "--spec", str(example), "--out", str(candidate), env=job_env)
    assert pruned.returncode == 0, pruned.stderr
    # progress and events are JSON lines a log pipeline can parse
    events = [json.loads(line) for line in pruned.stderr.splitlines() if line.startswith("{")]
    assert any(e["event"].startswith("fine-tuning") and "step" in e and "total" in e for e in events)
    evaluated = run_cli("evaluate", "--spec", str(example), "--candidate", str(candidate), "--out", str(evaluation),
                        env=job_env)
    assert evaluated.returncode == 0, evaluated.stderr
    report = EvalReport.read(evaluation)
    assert report.gates.passed, report.gates
    assert report.metrics.sparsity == pytest.approx(zero_fraction(candidate / "model.onnx"), abs=1e-6)
    assert report.metrics.sparsity >= 0.79
