"""`kompressor watch-drift`: test the traffic `kompressor serve` captured for drift with Alibi Detect.

Reference data: ``--reference``, else ``spec.data.reference``, else ``spec.data.eval``; what is tested
(``spec.drift.signal``: inputs, or the served model's outputs or output vectors, for which ``--artifact``
gives the model) is signals.py's business. The detector comes from ``spec.drift`` (see
``detectors.build_detector``). Window mode consumes the rows captured for ``--revision`` since it
(re)started serving in disjoint windows of ``windowSize`` rows, each tested once, in order (looking every
``checkIntervalSeconds``); online mode feeds every new row to an online detector. Both keep their place in
``--state``, so a restart resumes where it stopped. Each window writes a ``DriftVerdict`` (the
``status.drift`` shape) to ``--verdict``: a JSON file replaced atomically (and a line in its
``.history.jsonl``), or ``k8s://NAMESPACE/NAME`` (a merge patch on the CompressedModel's /status). The
verdict says what was tested (first and last capture sequence, rows, windows) and ``consecutive`` counts
drifting windows in a row; a restarted watcher goes on from it (see watcher.py).

Prediction drift (prediction.py), beside the input test: in window mode, with ``--artifact`` and a classifier (the
first output's last axis > 1), each window's verdict also carries ``prediction``: a chi-square test of the
window's predicted-class counts (Cochran pooling, as the chisquare detector) and a KS test of its top-1 softmax
scores, both against the served model's predictions on the reference data. Informational: the drift policy acts
on the verdict's own outcome. Windows whose rows were captured without outputs are Inconclusive (samples 0).
"""

from __future__ import annotations

import argparse


def main(args: argparse.Namespace) -> int:
    from kompressor_jobs.drift.watcher import run

    return run(args)
