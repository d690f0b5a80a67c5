"""metrics.json: what the evaluation Job writes and the operator reads.

Its top-level keys are the metric names of ``status.revisions[].metrics`` plus
``gates``, ``artifact`` (the candidate), ``baseline`` (revision 0: the uncompressed model)
and, after an accuracy-aware search, ``probes`` (each judged on the validation split) and ``search``:
how the evaluate Job confirmed the search's choice on eval (``probesOnEval``: how many probes touched
the eval data; ``evalDisagreed``: the sparsities that passed on validation but failed on eval).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kompressor.api.status import Artifact, Gates, Metrics
from kompressor.api.wire import fields_of, from_wire, to_wire

METRICS_FILE = "metrics.json"


@dataclass
class Probe:
    """One candidate sparsity tried by the accuracy-aware search."""

    sparsity: float
    metrics: Metrics
    gates: Gates


@dataclass
class EvalReport:
    metrics: Metrics
    gates: Gates
    artifact: Artifact
    baseline_artifact: Artifact | None = None
    baseline_metrics: Metrics | None = None
    probes: list[Probe] = field(default_factory=list)
    search: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        out = dict(to_wire(self.metrics))
        out["gates"] = to_wire(self.gates)
        out["artifact"] = to_wire(self.artifact)
        if self.baseline_artifact or self.baseline_metrics:
            out["baseline"] = {
                "artifact": to_wire(self.baseline_artifact) if self.baseline_artifact else None,
                "metrics": to_wire(self.baseline_metrics) if self.baseline_metrics else None,
            }
        if self.probes:
            out["probes"] = [
                {"sparsity": p.sparsity, "metrics": to_wire(p.metrics), "gates": to_wire(p.gates)} for p in self.probes
            ]
        if self.search:
            out["search"] = self.search
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "EvalReport":
        metric_keys = {info.wire for info in fields_of(Metrics)}
        baseline = data.get("baseline") or {}
        return cls(
            metrics=from_wire(Metrics, {k: v for k, v in data.items() if k in metric_keys}, "metrics"),
            gates=from_wire(Gates, data["gates"], "gates"),
            artifact=from_wire(Artifact, data["artifact"], "artifact"),
            baseline_artifact=from_wire(Artifact, baseline["artifact"], "baseline.artifact")
            if baseline.get("artifact") else None,
            baseline_metrics=from_wire(Metrics, baseline["metrics"], "baseline.metrics")
            if baseline.get("metrics") else None,
            probes=[
                Probe(sparsity=p["sparsity"], metrics=from_wire(Metrics, p["metrics"], "probes.metrics"),
                      gates=from_wire(Gates, p["gates"], "probes.gates"))
                for p in data.get("probes") or []
            ],
            search=data.get("search") if isinstance(data.get("search"), dict) else None,
        )

    @classmethod
    def read(cls, folder: str | Path) -> "EvalReport":
        return cls.from_json(json.loads((Path(folder) / METRICS_FILE).read_text()))
