"""`kompressor watch-drift`: test the traffic `kompressor serve` captured for drift with Alibi Detect.

Reference data: ``--reference``, else ``spec.data.reference``, else ``spec.data.eval``. The detector
comes from ``spec.drift`` (see ``detectors.build_detector``). Window mode tests the newest
``windowSize`` rows captured for ``--revision`` every ``checkIntervalSeconds`` (skipping checks when
nothing new arrived); online mode feeds every new row to an online detector whose state (and the
capture position) is saved in ``--state``, so a restart resumes where it stopped. Each check writes a
``DriftVerdict`` (the ``status.drift`` shape) to ``--verdict``: a JSON file replaced atomically, or
``k8s://NAMESPACE/NAME`` (a merge patch on the CompressedModel's /status). ``consecutive`` continues
from the verdict the sink already holds for the same revision.
"""

from __future__ import annotations

import argparse


def main(args: argparse.Namespace) -> int:
    from kompressor_jobs.drift.watcher import run

    return run(args)
