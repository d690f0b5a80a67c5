"""The accuracy-aware search through the CLIs: probes judged on the validation split, the gates on eval, and
the evaluate Job falling back to the next passing probe when eval disagrees with validation. Expectations are
computed from the written files with a direct ONNX Runtime run."""

from __future__ import annotations

import json

import numpy as np
import pytest

from jobs_support import ort_predict
from kompressor.api import defaults as d
from kompressor.api.report import EvalReport
from kompressor.store import resolve_local, verify_artifact
from kompressor_jobs.data import load_dataset, split_validation

pytestmark = pytest.mark.slow

TRAIN, EVAL = "builtin://breast_cancer?split=train", "builtin://breast_cancer?split=eval"


def accuracy(folder, data) -> float:
    return float((ort_predict(folder / "model.onnx", data.X).argmax(1) == data.y).mean())


def alternates(candidate, probes_file):
    rows = json.loads((candidate / "probes.json").read_text())
    ranked = sorted((r for r in rows if r.get("fallbackRank")), key=lambda r: r["fallbackRank"])
    return rows, [(r["sparsity"], candidate / r["artifact"]) for r in ranked]


def test_probes_are_judged_on_validation_and_the_sparsest_pass_is_kept(jobs, write_spec):
    spec = write_spec({"compression": {"search": {"enabled": True, "minSparsity": 0.2, "maxSparsity": 0.99,
                                                  "maxProbes": 5}},
                       "gates": {"maxAccuracyDrop": 0.02}})
    candidate, manifest, metrics = jobs.prune_and_evaluate(spec)
    # the validation split is a seeded, stratified part of train, recorded in the manifest, and not trained on
    held = manifest["data"]["validation"]
    rest, validation = split_validation(load_dataset(TRAIN), d.VALIDATION_FRACTION, d.VALIDATION_SEED)
    assert held["heldOutOf"] == TRAIN and held["seed"] == d.VALIDATION_SEED
    assert held["sha256"] == validation.digest and held["rows"] == len(validation)
    assert manifest["data"]["train"]["rows"] == len(rest)
    assert "gates only" in manifest["data"]["eval"]["usedFor"]

    rows, alts = alternates(candidate, "probes.json")
    assert rows[0]["sparsity"] == 0.99 and len(rows) <= 5 and all(r["judgedOn"] == "validation" for r in rows)
    passing = [r["sparsity"] for r in rows if r["gates"]["passed"]]
    assert passing, "the bottom of the range should pass with a 2-point budget"
    assert manifest["search"]["passed"] is True and manifest["search"]["chosenSparsity"] == max(passing)
    # each probe's verdict follows from its accuracy on VALIDATION (the baseline measured there too)
    baseline = resolve_local(manifest["baseline"]["uri"])
    base_val = accuracy(baseline, validation)
    for r in rows:
        assert r["gates"]["passed"] == (base_val - r["metrics"]["accuracy"] <= 0.02 + 1e-6), r
    chosen = next(r for r in rows if r["chosen"])
    assert chosen["metrics"]["accuracy"] == pytest.approx(accuracy(candidate, validation), abs=1e-6)
    # the next passing probes (at most maxAlternates, default 2) are kept, sparsest first, each a complete artifact
    others = sorted((s for s in passing if s != max(passing)), reverse=True)
    assert [s for s, _ in alts] == others[:d.SEARCH_MAX_ALTERNATES]
    assert manifest["search"]["notKeptSparsities"] == others[d.SEARCH_MAX_ALTERNATES:]
    for _, folder in alts:
        verify_artifact(folder)
    # the gates judged eval alone, and eval confirmed the choice: one candidate touched the eval data
    assert metrics["accuracy"] == pytest.approx(accuracy(candidate, load_dataset(EVAL)), abs=1e-6)
    if metrics["gates"]["passed"]:
        assert metrics["search"]["probesOnEval"] == 1 and metrics["search"]["evalDisagreed"] == []
    card = json.loads((candidate.parent / "eval" / "model_card.json").read_text())
    assert card["probes"] == len(rows) and card["probesOnEval"] == metrics["search"]["probesOnEval"]
    assert card["data"]["validation"]["heldOutOf"] == TRAIN
    # the export's parity check read validation rows too: the card says which
    assert manifest["achieved"]["parityRows"]["data"] == "validation"
    assert "ONNX parity" in (markdown := (candidate.parent / "eval" / "model_card.md").read_text())
    assert f"on {manifest['achieved']['parityRows']['rows']} validation rows" in markdown


def seen_rows_spec(write_spec, tmp_path, max_alternates: int):
    """Validation = the training rows (the model fits them): every probe looks good there, while on eval even
    the baseline misses minAccuracy 0.975 -- eval disagrees with validation on every passing probe."""
    train = load_dataset(TRAIN)
    path = tmp_path / "seen.npz"
    np.savez(path, X=train.X, y=train.y)
    return path, write_spec({"data": {"validation": f"file://{path}"},
                             "compression": {"search": {"enabled": True, "minSparsity": 0.3, "maxSparsity": 0.99,
                                                        "maxProbes": 4, "maxAlternates": max_alternates},
                                             "pruning": {"fineTuneEpochs": 0}},
                             "gates": {"minAccuracy": 0.975}})


def test_eval_disagreeing_with_validation_tries_every_kept_passing_probe_and_says_so(jobs, write_spec, tmp_path):
    path, spec = seen_rows_spec(write_spec, tmp_path, max_alternates=1)
    candidate, manifest, metrics = jobs.prune_and_evaluate(spec)
    assert manifest["data"]["validation"]["uri"] == f"file://{path}"
    rows, alts = alternates(candidate, "probes.json")
    passing = sorted((r["sparsity"] for r in rows if r["gates"]["passed"]), reverse=True)
    assert len(passing) >= 3, "probes judged on the training rows should pass (99 % sparsity alone fails)"
    kept, not_kept = passing[:2], passing[2:]  # the chosen probe and maxAlternates=1 alternate
    assert [s for s, _ in alts] == kept[1:] and len(list((candidate / "alternates").iterdir())) == 1
    assert manifest["search"]["notKeptSparsities"] == not_kept
    assert sorted((r["sparsity"] for r in rows if r.get("notKept")), reverse=True) == not_kept
    assert all(r["artifact"] is None for r in rows if r.get("notKept"))
    report = EvalReport.read(candidate.parent / "eval")
    assert report.gates.passed is False
    assert report.search["evalDisagreed"] == kept  # the chosen one, then the kept fallback, in order
    assert report.search["probesOnEval"] == 2 and report.search["fellBack"] is False
    assert report.artifact.uri == candidate.as_uri()
    assert "none is left to try" in report.search["message"]
    assert "maxAlternates: 1), so none is left to try" in report.search["message"]
    assert all(str(s) in report.search["message"] for s in not_kept)
    card = (candidate.parent / "eval" / "model_card.md").read_text()
    assert "candidates measured on eval: 2" in card and "eval disagreed with validation" in card
    assert report.search["message"] in card


def test_max_alternates_zero_keeps_no_copy_and_falls_back_to_nothing(jobs, write_spec, tmp_path):
    _, spec = seen_rows_spec(write_spec, tmp_path, max_alternates=0)
    candidate, manifest, _ = jobs.prune_and_evaluate(spec)
    rows = json.loads((candidate / "probes.json").read_text())
    passing = sorted((r["sparsity"] for r in rows if r["gates"]["passed"]), reverse=True)
    assert len(passing) >= 2, "probes judged on the training rows should pass (99 % sparsity alone fails)"
    assert not (candidate / "alternates").exists()  # no full copy of any other probe
    assert manifest["search"]["maxAlternates"] == 0 and manifest["search"]["notKeptSparsities"] == passing[1:]
    assert not any(r["fallbackRank"] for r in rows)
    report = EvalReport.read(candidate.parent / "eval")
    assert report.gates.passed is False and report.search["probesOnEval"] == 1
    assert report.search["evalDisagreed"] == passing[:1] and report.search["notKept"] == passing[1:]
    assert "maxAlternates: 0" in report.search["message"] and "none is left to try" in report.search["message"]


def test_the_next_passing_probe_is_kept_when_it_passes_on_eval(jobs, write_spec, tmp_path):
    # Prune with a 10-point budget on validation: 99 % sparsity without fine-tuning fails it, 50 % passes, and
    # the refinement between them leaves at least two passing probes. Then evaluate on eval rows that the first
    # alternate gets right and the kept probe does not all get right, gated at minAccuracy 1: eval disagrees with
    # validation on the kept probe, and the evaluate Job must keep the alternate instead.
    search = {"enabled": True, "minSparsity": 0.5, "maxSparsity": 0.99, "maxProbes": 4}
    spec = write_spec({"compression": {"search": search, "pruning": {"fineTuneEpochs": 0}},
                       "gates": {"maxAccuracyDrop": 0.1}})
    candidate = tmp_path / "candidate"
    code, err = jobs.prune(spec, candidate)
    assert code == 0, err
    _, alts = alternates(candidate, "probes.json")
    assert alts, "at least two probes pass a 10-point budget"
    sparsity, folder = alts[0]
    pool = load_dataset(EVAL)
    alt_right = ort_predict(folder / "model.onnx", pool.X).argmax(1) == pool.y
    kept_right = ort_predict(candidate / "model.onnx", pool.X).argmax(1) == pool.y
    assert (alt_right & ~kept_right).any(), "the two probes should differ somewhere"
    rows = alt_right
    path = tmp_path / "eval-b.npz"
    np.savez(path, X=pool.X[rows], y=pool.y[rows])
    strict = write_spec({"data": {"eval": f"file://{path}"},
                         "compression": {"search": search, "pruning": {"fineTuneEpochs": 0}},
                         "gates": {"minAccuracy": 1.0}})
    code, err = jobs.evaluate(strict, candidate, tmp_path / "eval")
    assert code == 0, err
    report = EvalReport.read(tmp_path / "eval")
    assert report.gates.passed is True
    assert report.artifact.uri == folder.as_uri()
    assert report.artifact.sha256 == verify_artifact(folder)["files"]["model.onnx"]
    assert report.metrics.accuracy == 1.0
    assert report.search["fellBack"] is True and report.search["chosenSparsity"] == sparsity
    assert report.search["probesOnEval"] == 2 and report.search["evalDisagreed"] == [
        json.loads((candidate / "manifest.json").read_text())["search"]["chosenSparsity"]]
    card = json.loads((tmp_path / "eval" / "model_card.json").read_text())
    assert card["probesOnEval"] == 2 and card["compression"]["achieved"]["targetSparsity"] == sparsity


def test_no_passing_sparsity_keeps_the_least_bad_probe_marked_failing(jobs, write_spec):
    spec = write_spec({"compression": {"search": {"enabled": True, "minSparsity": 0.5, "maxSparsity": 0.9,
                                                  "maxProbes": 3}},
                       "gates": {"minAccuracy": 1.0}})
    candidate, manifest, metrics = jobs.prune_and_evaluate(spec)
    assert manifest["search"]["passed"] is False
    assert "no probed sparsity" in manifest["search"]["reason"] and "minAccuracy" in manifest["search"]["reason"]
    assert manifest["search"]["chosenSparsity"] in [p["sparsity"] for p in metrics["probes"]]
    assert len(metrics["probes"]) == 3  # the whole budget was spent looking
    assert metrics["gates"]["passed"] is False and metrics["search"]["probesOnEval"] == 1
    assert not (candidate / "alternates").exists()
