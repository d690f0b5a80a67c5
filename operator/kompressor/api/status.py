"""The observed state the operator reports: ``CompressedModel.status``.

Written only by the operator (or the embedded runner, which writes the same shape to
status.json) and by the drift watcher (``status.drift``). Like spec.py, the CRD's status
schema is generated from these dataclasses.
"""

from __future__ import annotations

from dataclasses import dataclass

from kompressor.api.fields import api_field

PHASES = (
    "Pending", "Compressing", "Evaluating", "Rejected", "AwaitingApproval", "Promoting", "Serving",
    "DriftDetected", "Retraining", "RollingBack", "Paused", "Failed",
)
CONDITION_TYPES = ("Ready", "Compressed", "GatesPassed", "Promoted", "Drifted")
CONDITION_STATUSES = ("True", "False", "Unknown")
GATE_OUTCOMES = ("Successful", "Failed", "Inconclusive", "Error")
DRIFT_OUTCOMES = ("Drift", "NoDrift", "Inconclusive")
CANDIDATE_REASONS = ("initial", "specChange", "retry", "retrain")


@dataclass
class Artifact:
    """A stored artifact: a folder with model.onnx and manifest.json."""

    uri: str = api_field("Where the artifact folder is (file://, pvc:// or s3://).", required=True)
    sha256: str = api_field("sha256 of model.onnx, checked on every read.", required=True,
                            pattern=r"^[0-9a-f]{64}$")


@dataclass
class SliceMetrics:
    """Metrics measured on one slice of the eval data."""

    accuracy: float | None = api_field("Accuracy on the slice.")
    f1: float | None = api_field("Macro-F1 on the slice.")
    samples: int | None = api_field("Eval rows in the slice.")


@dataclass
class Metrics:
    """What the evaluation Job measured (ONNX Runtime, eval data)."""

    accuracy: float | None = api_field("Top-1 accuracy.")
    f1: float | None = api_field("Macro-F1.")
    precision: float | None = api_field("Macro precision.")
    recall: float | None = api_field("Macro recall.")
    ece: float | None = api_field("Expected calibration error (15 equal-width bins).")
    latency_p50_ms: float | None = api_field("p50 latency at batch 1, ms.")
    latency_p95_ms: float | None = api_field("p95 latency at batch 1, ms.")
    latency_p99_ms: float | None = api_field("p99 latency at batch 1, ms.")
    throughput_rps: float | None = api_field("Rows per second at batch 64.")
    size_bytes: int | None = api_field("Size of model.onnx on disk.")
    size_ratio: float | None = api_field("Size relative to the uncompressed baseline.")
    sparsity: float | None = api_field("Fraction of exactly-zero weights in the exported graph.")
    slices: dict[str, SliceMetrics] | None = api_field("Metrics per slice.", map_of=SliceMetrics)


@dataclass
class GateResult:
    """One gate's verdict."""

    gate: str = api_field("Gate name, as in spec.gates (slice gates: slices[<name>].minAccuracy).", required=True)
    value: float | None = api_field("Measured value.")
    threshold: float | None = api_field("Threshold from the spec.")
    outcome: str = api_field("Successful, Failed, Inconclusive or Error.", required=True, enum=GATE_OUTCOMES)
    message: str = api_field("Why, in words.", default="")


@dataclass
class Gates:
    """All gate verdicts of a revision."""

    passed: bool = api_field("True only when every gate is Successful.", required=True)
    results: list[GateResult] = api_field("One result per checked gate.", default_factory=list)


@dataclass
class Revision:
    """One compressed (or baseline) artifact and how it measured."""

    revision: int = api_field("Revision number; 0 is the uncompressed baseline.", required=True, minimum=0)
    artifact: Artifact | None = api_field("The artifact.")
    metrics: Metrics | None = api_field("Measured metrics.")
    gates: Gates | None = api_field("Gate verdicts.")
    promoted_at: str | None = api_field("When it was last promoted to serving (RFC 3339).")
    reason: str | None = api_field("Why it was made: initial, specChange, retry or retrain.")
    generation: int | None = api_field("metadata.generation of the spec it was made from.")
    drifted_at: str | None = api_field("When drift was last confirmed while it served (RFC 3339). A drifted "
                                       "revision is not rolled back to automatically (no flapping).")


@dataclass
class DriftVerdict:
    """The drift watcher's latest verdict."""

    is_drift: bool = api_field("Whether the latest check found drift.", default=False)
    outcome: str | None = api_field("Drift, NoDrift, or Inconclusive (too few rows yet).", enum=DRIFT_OUTCOMES)
    p_value: float | None = api_field("p-value of the test (smallest feature-wise p-value, corrected).")
    distance: float | None = api_field("Test statistic / distance.")
    threshold: float | None = api_field("Threshold the p-value (or distance, online) was compared with.")
    samples: int | None = api_field("Rows tested.")
    consecutive: int = api_field("Drifting checks in a row.", default=0, minimum=0)
    checked_at: str | None = api_field("When the check ran (RFC 3339).")
    revision: int | None = api_field("The serving revision the traffic was sent to.")
    detector: str | None = api_field("Detector that produced the verdict.")
    feature_p_values: list[float] | None = api_field("Per-feature p-values, where the detector gives them.")


@dataclass
class Condition:
    """A Kubernetes-style condition."""

    type: str = api_field("Ready, Compressed, GatesPassed, Promoted or Drifted.", required=True,
                          enum=CONDITION_TYPES)
    status: str = api_field("True, False or Unknown.", required=True, enum=CONDITION_STATUSES)
    reason: str = api_field("One CamelCase word.", default="")
    message: str = api_field("Human-readable detail.", default="")
    last_transition_time: str | None = api_field("When status last changed (RFC 3339).")
    observed_generation: int | None = api_field("metadata.generation this condition was computed for.")


@dataclass
class Candidate:
    """The compression in flight, if any."""

    revision: int = api_field("Revision number the candidate will get.", required=True, minimum=1)
    generation: int = api_field("metadata.generation it was started for.", required=True)
    reason: str = api_field("initial, specChange, retry or retrain.", required=True, enum=CANDIDATE_REASONS)
    started_at: str | None = api_field("When it started (RFC 3339).")
    stage: str | None = api_field("prune or evaluate.", enum=("prune", "evaluate"))


@dataclass
class CompressedModelStatus:
    """Observed state, written by the operator."""

    phase: str = api_field("Lifecycle phase.", default="Pending", enum=PHASES)
    message: str | None = api_field("Why the resource is in this phase.")
    observed_generation: int | None = api_field("Last metadata.generation the operator acted on.")
    current_revision: int | None = api_field("Revision being served.")
    last_promoted_revision: int | None = api_field("Revision most recently promoted by gates or approval.")
    sparsity: float | None = api_field("Sparsity of the serving revision (for kubectl get).")
    accuracy: float | None = api_field("Accuracy of the serving revision (for kubectl get).")
    revisions: list[Revision] = api_field("Revision history, oldest first.", default_factory=list)
    candidate: Candidate | None = api_field("The compression in flight.")
    compression_digest: str | None = api_field("Digest of the spec parts the current revisions were made from.")
    auto_actions: int = api_field("Automatic actions since a human last touched the resource.", default=0,
                                  minimum=0)
    retrains: int = api_field("Automatic retrains so far.", default=0, minimum=0)
    last_auto_action_at: str | None = api_field("When the last automatic action ran (RFC 3339).")
    handled_retry: str | None = api_field("Last kompressor.io/retry token acted on.")
    handled_resume: str | None = api_field("Last kompressor.io/resume token acted on.")
    drift: DriftVerdict | None = api_field("Latest drift verdict.")
    conditions: list[Condition] = api_field("Conditions.", default_factory=list)
