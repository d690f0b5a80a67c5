"""Prediction drift beside input drift: the served model's predictions on a window against its predictions on
the reference data (``status.drift.prediction``; informational, the drift policy does not act on it).

Two tests on the model's first output (a classifier's scores: its last axis, the classes, longer than 1):

- the predicted classes (argmax over the last axis): chi-square test of the window's class counts against the
  reference's, with ``detectors.pooled_chi_square`` (the chisquare detector's test, Cochran's pooling of small
  expected counts included);
- the top-1 softmax score: two-sample Kolmogorov-Smirnov test (``scipy.stats.ks_2samp``).

Drift when the smaller p-value, corrected for the two tests with ``spec.drift.correction``, is below
``spec.drift.pValue``. The reference predictions are computed once per watcher start (``signals.model_outputs``
on the reference rows, with ``--artifact``); a window's outputs are those the capture kept with the very rows the
input test used. The capture keeps outputs only of requests that asked for all of them (or for none): a window
with a row without outputs is Inconclusive with ``samples`` 0, and so is a window with too few rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kompressor.api.manifest import CompressedModel
from kompressor.api.status import PredictionDrift
from kompressor.console import log
from kompressor_jobs.drift.detectors import MIN_WINDOW_ROWS, _corrected_min_p, pooled_chi_square
from kompressor_jobs.drift.signals import MODEL_FILE, model_outputs, softmax


def _top1(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(predicted class, top-1 softmax score) of every prediction in ``scores`` [n, classes]."""
    return np.argmax(scores, axis=1), softmax(scores).max(axis=1).astype(np.float64)


def _shares(counts: np.ndarray) -> list[float]:
    total = counts.sum()
    return [float(c / total) if total else 0.0 for c in counts]


@dataclass
class PredictionTest:
    """The reference's predictions, counted once; ``test`` compares a window's with them.

    ``reference``: the model's first output on the reference rows, ``[rows, ..., classes]`` or flattened
    ``[rows, width]`` (any leading axes: one prediction per position, e.g. per token)."""

    reference: np.ndarray
    classes: int
    p_value: float
    correction: str = "bonferroni"

    def __post_init__(self):
        ref = np.asarray(self.reference, dtype=np.float32)
        self.width = int(np.prod(ref.shape[1:])) if ref.ndim > 1 else 1
        predicted, self.ref_scores = _top1(ref.reshape(-1, self.classes))
        self.ref_counts = np.bincount(predicted, minlength=self.classes).astype(np.float64)
        self.ref_scores = np.sort(self.ref_scores)

    def first_output(self, values: np.ndarray | None) -> np.ndarray | None:
        """The first output of captured rows (every output flattened and concatenated, as the capture keeps
        them), or None when there are none or they are narrower than the reference's first output."""
        if values is None:
            return None
        values = np.asarray(values).reshape(len(values), -1)
        return values[:, :self.width] if values.shape[1] >= self.width else None

    def test(self, outputs: np.ndarray | None) -> PredictionDrift:
        """Prediction drift of one window: ``outputs`` its rows' first output (None: not captured)."""
        if outputs is None:
            return PredictionDrift(outcome="Inconclusive", samples=0)
        scores = np.asarray(outputs, dtype=np.float32).reshape(-1, self.classes)
        if len(outputs) < MIN_WINDOW_ROWS:
            return PredictionDrift(outcome="Inconclusive", samples=len(scores))
        from scipy.stats import ks_2samp

        predicted, top = _top1(scores)
        counts = np.bincount(predicted, minlength=self.classes).astype(np.float64)
        class_stat, class_p = pooled_chi_square(self.ref_counts, counts)
        ks = ks_2samp(self.ref_scores, top)
        score_stat, score_p = float(ks.statistic), float(min(1.0, max(0.0, ks.pvalue)))
        corrected = _corrected_min_p(np.array([class_p, score_p]), self.correction)
        return PredictionDrift(
            outcome="Drift" if corrected < self.p_value else "NoDrift", class_p_value=float(class_p),
            class_statistic=float(class_stat), score_p_value=score_p, score_statistic=score_stat,
            samples=len(scores), classes=_shares(counts), reference_classes=_shares(self.ref_counts))


def window_outputs(values: np.ndarray | None, sequences: np.ndarray, first: int, last: int,
                   rows: int) -> np.ndarray | None:
    """The captured outputs (``values``, one per capture sequence in ``sequences``, ascending) of the window of
    ``rows`` rows from ``first`` to ``last``; None unless every row of it has them."""
    if values is None or not len(sequences):
        return None
    lo, hi = np.searchsorted(sequences, first), np.searchsorted(sequences, last, side="right")
    return values[lo:hi] if hi - lo == rows else None


def first_output_shape(artifact: Path, width: int) -> tuple[int, int] | None:
    """(values per row, last axis) of the artifact's first output, from the graph's declared shapes; ``width``:
    the values per row of all its outputs together. None where the graph does not say."""
    from kompressor_jobs import runtime

    path = artifact / MODEL_FILE if artifact.is_dir() else artifact
    outputs = runtime.io_signature(path)["outputs"]
    dims = outputs[0]["shape"][1:]
    if dims and all(v > 0 for v in dims):
        return int(np.prod(dims)), int(dims[-1])
    if len(outputs) == 1 and len(dims) == 1:  # [batch, classes] with a symbolic class axis
        return width, width
    if len(outputs) == 1 and dims and dims[-1] > 0 and width % dims[-1] == 0:
        return width, int(dims[-1])
    return None


def reference_test(cm: CompressedModel, args) -> PredictionTest | None:
    """The prediction test of a window-mode watcher started with ``--artifact`` on a classification model
    (first output's last axis > 1); None otherwise. Runs the artifact on the reference data once."""
    spec = cm.spec.drift
    artifact = Path(args.artifact) if getattr(args, "artifact", None) else None
    if artifact is None or spec.mode != "window" or (cm.spec.model.task or "classification") != "classification":
        return None
    from kompressor_jobs.data import load_dataset

    uri = getattr(args, "reference", None) or cm.spec.data.reference or cm.spec.data.eval
    data = load_dataset(uri, inputs=cm.spec.model.inputs or None, task=cm.spec.model.task)
    ref = model_outputs(artifact, data.inputs)
    shape = first_output_shape(artifact, ref.shape[1])
    if shape is None or shape[1] < 2:
        log("prediction drift off: the model's first output is not one score per class", level="debug",
            artifact=str(artifact))
        return None
    width, classes = shape
    test = PredictionTest(ref[:, :width], classes, spec.p_value, spec.correction)
    log("prediction drift reference", rows=len(ref), classes=classes,
        reference_classes=[round(s, 4) for s in _shares(test.ref_counts)])
    return test
