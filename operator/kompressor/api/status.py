"""The observed state the operator reports: ``CompressedModel.status``.

Written only by the operator (or the embedded runner, which writes the same shape to
status.json) and by the drift watcher (``status.drift``). Like spec.py, the CRD's status
schema is generated from these dataclasses.
"""

from __future__ import annotations

from dataclasses import dataclass

from kompressor.api.fields import api_field
from kompressor.api.spec import DRIFT_SIGNALS

PHASES = (
    "Pending", "Compressing", "Evaluating", "Rejected", "AwaitingApproval", "Promoting", "Serving",
    "DriftDetected", "Retraining", "RollingBack", "Paused", "Failed", "Shadowing", "Canary",
)
CONDITION_TYPES = ("Ready", "Compressed", "GatesPassed", "Promoted", "Drifted")
CONDITION_STATUSES = ("True", "False", "Unknown")
GATE_OUTCOMES = ("Successful", "Failed", "Inconclusive", "Error")
DRIFT_OUTCOMES = ("Drift", "NoDrift", "Inconclusive")
CANDIDATE_REASONS = ("initial", "specChange", "retry", "retrain")
ONLINE_STRATEGIES = ("shadow", "canary")
ONLINE_OUTCOMES = GATE_OUTCOMES + ("Superseded",)


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
    mae: float | None = api_field("Regression: mean absolute error on the slice.")
    r2: float | None = api_field("Regression: R² on the slice.")
    cosine_similarity: float | None = api_field("Mean cosine similarity to the baseline's outputs on the slice.")
    samples: int | None = api_field("Eval rows in the slice.")


@dataclass
class Metrics:
    """What the evaluation Job measured (ONNX Runtime, eval data), beside the uncompressed baseline measured
    in the same run."""

    task: str | None = api_field("classification, regression or embedding.", enum=("classification", "regression",
                                                                                    "embedding"))
    accuracy: float | None = api_field("Top-1 accuracy (classification).")
    f1: float | None = api_field("Macro-F1.")
    precision: float | None = api_field("Macro precision.")
    recall: float | None = api_field("Macro recall.")
    ece: float | None = api_field("Expected calibration error (15 equal-width bins).")
    mae: float | None = api_field("Regression: mean absolute error.")
    rmse: float | None = api_field("Regression: root mean squared error.")
    r2: float | None = api_field("Regression: R² (coefficient of determination).")
    agreement: float | None = api_field("Fidelity: fraction of rows whose top-1 class equals the uncompressed "
                                        "model's (classification; no labels needed).")
    kl_divergence: float | None = api_field("Fidelity: mean KL divergence of the uncompressed model's class "
                                            "probabilities from this model's (classification).")
    cosine_similarity: float | None = api_field("Fidelity: mean cosine similarity of the outputs to the "
                                                "uncompressed model's on the same rows (any task).")
    latency_p50_ms: float | None = api_field("p50 latency at batch 1, ms.")
    latency_p95_ms: float | None = api_field("p95 latency at batch 1, ms.")
    latency_p99_ms: float | None = api_field("p99 latency at batch 1, ms.")
    latency_p95_upper_ms: float | None = api_field("Distribution-free 95 % upper confidence bound of the p95 "
                                                   "latency (an order statistic of the timed runs), ms.")
    latency_runs: int | None = api_field("Timed batch-1 runs behind the latency percentiles.")
    latency_threads: int | None = api_field("ONNX Runtime intra-op threads used, as the serving Pod uses them "
                                            "(its CPU limit); 0 is one per core.")
    throughput_rps: float | None = api_field("Rows per second at batch throughputBatch.")
    throughput_batch: int | None = api_field("Batch size of the throughput measurement.")
    speedup: float | None = api_field("Baseline p50 latency divided by this model's (batch 1).")
    throughput_speedup: float | None = api_field("This model's throughput divided by the baseline's.")
    size_bytes: int | None = api_field("Size of model.onnx on disk.")
    size_ratio: float | None = api_field("Size relative to the uncompressed baseline.")
    compressed_size_bytes: int | None = api_field("The artifact folder as a gzip-compressed tar: what a pull "
                                                  "costs.")
    compressed_size_ratio: float | None = api_field("Compressed size relative to the baseline's.")
    parameters: int | None = api_field("Elements of the weight tensors in the graph (8-bit or float).")
    macs: int | None = api_field("Multiply-accumulates of one batch-1 forward pass (MatMul, Gemm, Conv, "
                                 "attention), counted from the graph with shape inference.")
    sparsity: float | None = api_field("Fraction of the baseline's weights that are gone: removed (structured "
                                       "pruning) or exactly zero (unstructured; for int8 graphs the zeros of the "
                                       "float graph before quantization, not rounding zeros).")
    zero_fraction: float | None = api_field("Fraction of zero weights in this graph (zero-point aware).")
    slices: dict[str, SliceMetrics] | None = api_field("Metrics per slice.", map_of=SliceMetrics)


@dataclass
class GateResult:
    """One gate's verdict."""

    gate: str = api_field("Gate name, as in spec.gates (slice gates: slices[<name>].minAccuracy).", required=True)
    value: float | None = api_field("Measured value.")
    threshold: float | None = api_field("Threshold from the spec.")
    outcome: str = api_field("Successful, Failed, Inconclusive or Error.", required=True, enum=GATE_OUTCOMES)
    message: str = api_field("Why, in words.", default="")
    default: bool | None = api_field("True when no quality gate was set and this is the task's default gate "
                                     "(spec.gates.defaults).")


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
    online: OnlineVerdict | None = api_field("How its online stage (shadow or canary) ended.")
    drifted_at: str | None = api_field("When drift was last confirmed while it served (RFC 3339). A drifted "
                                       "revision is not rolled back to automatically (no flapping).")


@dataclass
class PredictionDrift:
    """Prediction drift of one window, beside the input test: the served model's predictions on the window's
    rows against its predictions on the reference data (classification models, window mode, watcher run with
    --artifact). Informational: the drift policy acts on the verdict's own outcome only."""

    outcome: str | None = api_field("Drift when the smaller of the two p-values, corrected for two tests "
                                    "(spec.drift.correction), is below spec.drift.pValue; Inconclusive when the "
                                    "window's rows have no captured outputs (samples 0) or are too few.",
                                    enum=DRIFT_OUTCOMES)
    class_p_value: float | None = api_field("p-value of the chi-square test of the predicted-class counts against "
                                            "the reference's (small cells pooled, as the chisquare detector does).",
                                            minimum=0.0, maximum=1.0)
    class_statistic: float | None = api_field("Chi-square statistic of the predicted-class test.", minimum=0.0)
    score_p_value: float | None = api_field("p-value of the two-sample Kolmogorov-Smirnov test of the top-1 softmax "
                                            "score against the reference's.", minimum=0.0, maximum=1.0)
    score_statistic: float | None = api_field("KS statistic of the score test (largest CDF gap).", minimum=0.0,
                                              maximum=1.0)
    samples: int | None = api_field("Predictions tested: the window's rows with captured outputs (0: none had "
                                    "them; the capture keeps outputs only of requests that asked for all of "
                                    "them).", minimum=0)
    classes: list[float] | None = api_field("Share of the window's predictions per class, class 0 first.")
    reference_classes: list[float] | None = api_field("Share of the reference data's predictions per class.")


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
    signal: str | None = api_field("What was tested: inputs, outputs or embeddings (spec.drift.signal).",
                                   enum=DRIFT_SIGNALS)
    first_sequence: int | None = api_field("Capture sequence of the first row tested (window mode: of this "
                                           "window; each window is fresh, disjoint traffic).", minimum=0)
    last_sequence: int | None = api_field("Capture sequence of the last row tested.", minimum=0)
    windows: int | None = api_field("Windows tested since the revision (re)started serving; consecutive counts "
                                    "the newest drifting ones among them.", minimum=0)
    serving_since_sequence: int | None = api_field("Capture sequence where the revision (re)started serving: "
                                                   "rows captured before it are never tested.", minimum=0)
    dropped_rows: int | None = api_field("Rows the capture's size cap deleted before the watcher read them, "
                                         "since the revision (re)started serving.", minimum=0)
    reason: str | None = api_field("DataDrift (the detector's test of captured traffic) or PerformanceDrift (online "
                                   "accuracy from ground-truth feedback, spec.drift.performance).",
                                   enum=("DataDrift", "PerformanceDrift"))
    accuracy: float | None = api_field("PerformanceDrift: the serving revision's online accuracy over the labels "
                                       "window.", minimum=0.0, maximum=1.0)
    labels: int | None = api_field("PerformanceDrift: labelled predictions in the window.", minimum=0)
    min_accuracy: float | None = api_field("PerformanceDrift: the floor (spec.drift.performance.minAccuracy).",
                                           minimum=0.0, maximum=1.0)
    labels_seen: int | None = api_field("PerformanceDrift: labelled rows of the revision in the serving "
                                        "process' disjoint windows judged up to this one (each window is judged "
                                        "once).", minimum=0)
    prediction: PredictionDrift | None = api_field("DataDrift, window mode: prediction drift of the same window "
                                                   "(the model's predicted classes and top-1 scores against the "
                                                   "reference's). Informational.")


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
class OnlineCounts:
    """A candidate's live evidence, as counts that add up over serving processes."""

    requests: int = api_field("Candidate runs on live requests (shadow: mirrored; canary: answered), failed ones "
                              "included.", default=0, minimum=0)
    errors: int = api_field("Candidate runs that failed.", default=0, minimum=0)
    dropped: int = api_field("Shadow: request copies not mirrored because the mirror queue was full.", default=0,
                             minimum=0)
    compared: int = api_field("Rows whose candidate and serving outputs were compared.", default=0, minimum=0)
    agreement: float = api_field("Sum over the compared rows of their agreement (0 to 1 each).", default=0.0,
                                 minimum=0.0)
    labels: int = api_field("Ground-truth labels for rows the candidate predicted.", default=0, minimum=0)
    right: int = api_field("Of those, rows the candidate predicted right.", default=0, minimum=0)
    serving_labels: int = api_field("Ground-truth labels for rows the serving revision answered meanwhile.",
                                    default=0, minimum=0)
    serving_right: int = api_field("Of those, rows the serving revision predicted right.", default=0, minimum=0)
    candidate_latency: list[int] = api_field("Candidate ONNX Runtime run times: counts per bucket of "
                                             "kompressor.api.defaults.ONLINE_LATENCY_BUCKETS, then +Inf.",
                                             default_factory=list, max_items=64)
    serving_latency: list[int] = api_field("The serving revision's run times on the compared requests, per bucket.",
                                           default_factory=list, max_items=64)


@dataclass
class OnlineStage:
    """A candidate being judged on live traffic (spec.promotion.strategy shadow or canary)."""

    revision: int = api_field("The candidate revision.", required=True, minimum=1)
    strategy: str = api_field("shadow or canary.", required=True, enum=ONLINE_STRATEGIES)
    step: int = api_field("Canary: index of the step in spec.promotion.canary.steps (shadow: 0).", default=0,
                          minimum=0)
    weight: float = api_field("Percent of live traffic the candidate answers now (shadow: 0).", default=0.0,
                              minimum=0.0, maximum=100.0)
    started_at: str | None = api_field("When the stage started (RFC 3339).")
    step_started_at: str | None = api_field("When the current step started (RFC 3339).")
    step_start_requests: int = api_field("totals.requests when the current step started.", default=0, minimum=0)
    totals: OnlineCounts = api_field("Evidence so far, summed over serving processes (kept across their restarts "
                                     "and the operator's).", default_factory=OnlineCounts)
    sources: dict[str, OnlineCounts] | None = api_field(
        "The last counts read from each serving process (by instance), so that a count is added once.",
        map_of=OnlineCounts)
    outcome: str | None = api_field("The latest online verdict: Successful, Failed, Inconclusive or Error.",
                                    enum=GATE_OUTCOMES)
    results: list[GateResult] = api_field("The latest online gate results.", default_factory=list)


@dataclass
class OnlineVerdict:
    """How a revision's online stage ended."""

    strategy: str = api_field("shadow or canary.", required=True, enum=ONLINE_STRATEGIES)
    outcome: str = api_field("Successful, Failed, Inconclusive, Error, or Superseded (a newer compression started).",
                             required=True, enum=ONLINE_OUTCOMES)
    results: list[GateResult] = api_field("The online gate results it ended on.", default_factory=list)
    requests: int = api_field("Live requests the candidate saw.", default=0, minimum=0)
    steps_passed: int = api_field("Canary steps passed.", default=0, minimum=0)
    decided_at: str | None = api_field("When it ended (RFC 3339).")


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
    online: OnlineStage | None = api_field("The online stage in progress (shadow or canary).")
    conditions: list[Condition] = api_field("Conditions.", default_factory=list)
