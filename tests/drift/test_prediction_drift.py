"""Prediction drift beside input drift (``status.drift.prediction``): the served model's predicted classes
(chi-square, small cells pooled as the chisquare detector pools them) and top-1 softmax scores (KS) on a window
against its predictions on the reference data. The numbers are scipy's on the same counts and scores; windows
whose rows were captured without outputs are Inconclusive; `kompressor watch-drift` fills the block."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.special import softmax as scipy_softmax
from scipy.stats import chi2_contingency, ks_2samp

from drift_support import ROWS_PER_REVISION, tabular_rows, write_spec
from kompressor.api.status import DriftVerdict
from kompressor.api.wire import from_wire
from kompressor.cli import main as kompressor
from kompressor_jobs import capture
from kompressor_jobs.capture import CaptureWriter
from kompressor_jobs.drift.detectors import pooled_chi_square
from kompressor_jobs.drift.prediction import PredictionTest, window_outputs
from serving_support import ort_run

CLASSES = 4
P_VALUE = 0.05


def logits(rng: np.random.Generator, n: int) -> np.ndarray:
    """Scores of a 4-class model: every class predicted often enough that no cell is pooled."""
    return (rng.normal(size=(n, CLASSES)) + np.array([0.3, 0.0, -0.2, 0.1])).astype(np.float32)


def scipy_numbers(ref: np.ndarray, window: np.ndarray) -> tuple[float, float, float, float]:
    """(class statistic, class p, score statistic, score p) as scipy computes them on the same predictions."""
    counts = [np.bincount(np.argmax(x, axis=1), minlength=CLASSES) for x in (ref, window)]
    chi = chi2_contingency(np.stack(counts))
    top = [scipy_softmax(x.astype(np.float64), axis=1).max(axis=1) for x in (ref, window)]
    ks = ks_2samp(*top)
    return chi.statistic, chi.pvalue, ks.statistic, ks.pvalue


@pytest.fixture(scope="module")
def reference():
    ref = logits(np.random.default_rng(0), 2000)
    return ref, PredictionTest(ref, CLASSES, P_VALUE)


def test_a_window_from_the_reference_distribution_does_not_drift(reference):
    ref, test = reference
    window = logits(np.random.default_rng(1), 200)
    found = test.test(window)
    class_stat, class_p, score_stat, score_p = scipy_numbers(ref, window)
    assert found.outcome == "NoDrift" and found.samples == 200
    assert found.class_statistic == pytest.approx(class_stat) and found.class_p_value == pytest.approx(class_p)
    assert found.score_statistic == pytest.approx(score_stat, rel=1e-6)
    assert found.score_p_value == pytest.approx(score_p, rel=1e-4)
    counts = np.bincount(np.argmax(window, axis=1), minlength=CLASSES)
    assert found.classes == pytest.approx(list(counts / counts.sum()))
    ref_counts = np.bincount(np.argmax(ref, axis=1), minlength=CLASSES)
    assert found.reference_classes == pytest.approx(list(ref_counts / ref_counts.sum()))


def test_a_shifted_class_mix_drifts_on_the_classes(reference):
    ref, test = reference
    rows = logits(np.random.default_rng(2), 800)
    window = rows[np.argmax(rows, axis=1) == 0][:200]  # rows the model puts in one class only
    found = test.test(window)
    class_stat, class_p, _, score_p = scipy_numbers(ref, window)
    assert found.outcome == "Drift" and found.classes == [1.0, 0.0, 0.0, 0.0]
    assert found.class_p_value == pytest.approx(class_p) and found.class_statistic == pytest.approx(class_stat)
    assert found.class_p_value < P_VALUE / 2  # below the threshold after the correction for two tests
    assert found.score_p_value == pytest.approx(score_p, rel=1e-4)


def test_a_score_shift_with_the_same_class_mix_moves_the_ks_test(reference):
    ref, test = reference
    window = logits(np.random.default_rng(3), 200)
    calm, sharper = test.test(window), test.test(window * 4.0)  # the same argmax, more confident scores
    assert sharper.classes == calm.classes and sharper.class_p_value == calm.class_p_value
    _, _, score_stat, score_p = scipy_numbers(ref, window * 4.0)
    assert sharper.score_statistic == pytest.approx(score_stat, rel=1e-6)
    assert sharper.score_p_value == pytest.approx(score_p, rel=1e-4)
    assert sharper.score_p_value < P_VALUE / 2 < calm.score_p_value
    assert (calm.outcome, sharper.outcome) == ("NoDrift", "Drift")


def test_rare_classes_are_pooled_as_the_chisquare_detector_pools_them():
    rng = np.random.default_rng(4)
    ref = logits(rng, 2000)
    ref[:, 3] -= 2.0  # class 3 rarely predicted: its expected count in a window is below 5
    window = logits(rng, 200)
    window[:, 3] -= 2.0
    found = PredictionTest(ref, CLASSES, P_VALUE).test(window)
    counts = [np.bincount(np.argmax(x, axis=1), minlength=CLASSES).astype(float) for x in (ref, window)]
    stat, p = pooled_chi_square(*counts)
    assert (found.class_statistic, found.class_p_value) == pytest.approx((stat, p))
    unpooled = chi2_contingency(np.stack(counts)[:, counts[0] + counts[1] > 0])
    assert found.class_p_value != pytest.approx(unpooled.pvalue)


def test_windows_without_captured_outputs_are_inconclusive(reference):
    _, test = reference
    assert (test.test(None).outcome, test.test(None).samples) == ("Inconclusive", 0)
    few = test.test(logits(np.random.default_rng(5), 5))
    assert few.outcome == "Inconclusive" and few.samples == 5 and few.class_p_value is None
    # a window of rows 10..19 of which only some have captured outputs: none is tested
    values, sequences = np.zeros((6, CLASSES), np.float32), np.array([10, 11, 12, 15, 16, 17])
    assert window_outputs(values, sequences, 10, 19, rows=10) is None
    np.testing.assert_array_equal(window_outputs(values, sequences, 10, 12, rows=3), values[:3])
    assert window_outputs(None, np.zeros(0, np.int64), 10, 19, rows=10) is None


# -- through `kompressor watch-drift` ------------------------------------------------------------------------


def watch(spec, capture_dir, verdict, revision, artifact) -> dict:
    code = kompressor(["--json-logs", "watch-drift", "--spec", str(spec), "--capture", str(capture_dir),
                       "--verdict", str(verdict), "--revision", str(revision), "--once", "--artifact", str(artifact)])
    assert code == 0
    return json.loads(verdict.read_text())


def expected_prediction(artifact, reference_x: np.ndarray, window: np.ndarray) -> dict:
    """The served model's predictions on the reference and on the window, tested as the watcher should."""
    ref, got = ort_run(artifact, reference_x), window
    counts = [np.bincount(np.argmax(x, axis=1), minlength=ref.shape[1]).astype(float) for x in (ref, got)]
    stat, p = pooled_chi_square(*counts)
    ks = ks_2samp(*[scipy_softmax(x.astype(np.float64), axis=1).max(axis=1) for x in (ref, got)])
    return {"classStatistic": stat, "classPValue": p, "scoreStatistic": ks.statistic, "scorePValue": ks.pvalue,
            "classes": list(counts[1] / counts[1].sum()), "referenceClasses": list(counts[0] / counts[0].sum())}


@pytest.mark.slow
def test_watch_drift_fills_the_prediction_block(traffic, tmp_path, capsys):
    """The traffic fixture's requests asked for no particular output: the capture kept every output."""
    spec = write_spec(tmp_path, traffic["reference"], detector="ks", windowSize=ROWS_PER_REVISION)
    artifact = traffic["root"] / "r1"
    verdict = watch(spec, traffic["capture"], tmp_path / "v.json", 1, artifact)
    prediction = verdict["prediction"]
    assert verdict["signal"] == "inputs" and verdict["samples"] == ROWS_PER_REVISION
    assert prediction["samples"] == ROWS_PER_REVISION and prediction["outcome"] in ("Drift", "NoDrift")
    reference_x = np.load(traffic["reference"].removeprefix("file://"))["X"]
    window = capture.read_rows(traffic["capture"], 1, 0, "outputs")
    assert list(window.sequences) == list(range(verdict["firstSequence"], verdict["lastSequence"] + 1))
    for key, value in expected_prediction(artifact, reference_x, window.values).items():
        assert prediction[key] == pytest.approx(value, rel=1e-4, abs=1e-9), key
    corrected = min(1.0, 2 * min(prediction["classPValue"], prediction["scorePValue"]))  # bonferroni, two tests
    assert prediction["outcome"] == ("Drift" if corrected < verdict["threshold"] else "NoDrift")
    assert from_wire(DriftVerdict, verdict, "status.drift").prediction.samples == ROWS_PER_REVISION
    assert '"prediction drift check"' in capsys.readouterr().err


@pytest.mark.slow
def test_watch_drift_windows_without_captured_outputs_are_inconclusive(traffic, tmp_path):
    """Rows 0..99 captured with their outputs, rows 100..199 without (requests that asked for some outputs
    only): the first window's prediction is tested, the second's is Inconclusive with samples 0; the input test
    of both goes on as ever. The outputs signal reads the same outputs."""
    artifact = traffic["root"] / "r1"
    rng = np.random.default_rng(6)
    with_outputs, without = tabular_rows(rng, 100), tabular_rows(rng, 100)
    folder = tmp_path / "capture"
    writer = CaptureWriter(folder, 1 << 22)
    writer.submit({"input": with_outputs}, 1, outputs={"logits": ort_run(artifact, with_outputs)})
    writer.flush()
    writer.submit({"input": without}, 1)
    writer.close()
    spec = write_spec(tmp_path, traffic["reference"], detector="ks", windowSize=100)
    sink = tmp_path / "v.json"
    last = watch(spec, folder, sink, 1, artifact)
    first, second = [json.loads(line) for line in sink.with_name("v.history.jsonl").read_text().splitlines()]
    assert second == last and (first["firstSequence"], second["firstSequence"]) == (0, 100)
    assert first["outcome"] in ("Drift", "NoDrift") and second["outcome"] in ("Drift", "NoDrift")
    assert first["prediction"]["samples"] == 100 and first["prediction"]["classPValue"] is not None
    assert second["prediction"] == {"outcome": "Inconclusive", "samples": 0}

    reference_x = np.load(traffic["reference"].removeprefix("file://"))["X"]
    expected = expected_prediction(artifact, reference_x, ort_run(artifact, with_outputs))
    assert first["prediction"]["classPValue"] == pytest.approx(expected["classPValue"], rel=1e-4)
    outputs = write_spec(tmp_path, traffic["reference"], detector="ks", windowSize=100, signal="outputs")
    verdict = watch(outputs, folder, tmp_path / "outputs.json", 1, artifact)
    assert verdict["signal"] == "outputs" and verdict["firstSequence"] == 0 and verdict["windows"] == 1
    assert verdict["prediction"]["scorePValue"] == pytest.approx(expected["scorePValue"], rel=1e-4)


def test_the_report_shows_prediction_drift_beside_the_input_test(tmp_path):
    from kompressor.embedded.report import write_report

    model_dir = tmp_path / "default" / "digits"
    model_dir.mkdir(parents=True)
    windows = [{"revision": 1, "outcome": outcome, "isDrift": outcome == "Drift", "pValue": p, "threshold": 0.05,
                "checkedAt": f"2026-12-01T10:00:0{k}Z", "samples": 100, "firstSequence": 100 * k,
                "lastSequence": 100 * k + 99, "servingSinceSequence": 0, "prediction": prediction}
               for k, (outcome, p, prediction) in enumerate([
                   ("NoDrift", 0.4, {"outcome": "NoDrift", "classPValue": 0.3, "scorePValue": 0.6, "samples": 100}),
                   ("Drift", 0.001, {"outcome": "Inconclusive", "samples": 0}),
                   ("Drift", 1e-5, {"outcome": "Drift", "classPValue": 1e-4, "scorePValue": 0.2, "samples": 100})])]
    (model_dir / "status.json").write_text(json.dumps({"phase": "Serving", "currentRevision": 1,
                                                       "drift": windows[-1]}))
    (model_dir / "verdict.history.jsonl").write_text("".join(json.dumps(v) + "\n" for v in windows))
    page = write_report(tmp_path).read_text()
    assert "<th>Latest prediction drift</th><td>Drift (classes p=0.0001, score p=0.2)</td>" in page
    assert "prediction drift of the same windows" in page and "(no data for this plot)" not in page.split(
        "Drift p-value over time")[1].split("Revision timeline")[0]
