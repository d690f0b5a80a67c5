"""The desired state a user declares: ``CompressedModel.spec``.

This module is the single source of the spec's shape. The CRD in crds/ is generated from
it (``kompressor crd``), and a test fails when the committed CRD differs. It imports
nothing heavy: the operator, the jobs and the embedded mode all use it.
"""

from __future__ import annotations

from dataclasses import dataclass

from kompressor.api import defaults as d
from kompressor.api.fields import api_field

BUILTIN_MODELS = ("digits-mlp", "digits-cnn", "digits-resnet", "wine-mlp", "breast-cancer-mlp")
BUILTIN_DATASETS = ("digits", "wine", "breast_cancer")

# Where a URI may point. `file://` needs an absolute path; `..` segments are refused by a
# separate rule (see rules.py) so that the message can say why.
_STORE_URI = r"file:///[^\s]*|pvc://[a-z0-9]([-a-z0-9]*[a-z0-9])?/[^\s]+|s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]/[^\s]+"
MODEL_URI_PATTERN = rf"^(builtin://({'|'.join(BUILTIN_MODELS)})|{_STORE_URI})$"
DATA_URI_PATTERN = rf"^(builtin://({'|'.join(BUILTIN_DATASETS)})(\?split=(train|eval))?|{_STORE_URI})$"

MODEL_FORMATS = ("auto", "torch-export", "onnx", "huggingface")
TASKS = ("classification", "regression", "embedding")
INPUT_DTYPES = ("float32", "float16", "int64", "int32", "bool")
PRUNING_METHODS = ("none", "unstructured", "global", "structured")
IMPORTANCES = ("magnitude", "taylor")
LR_SCHEDULES = ("cosine", "constant")
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
SCHEDULES = ("oneshot", "gradual")
QUANTIZATION_MODES = ("none", "dynamic-int8", "static-int8")
DETECTORS = ("ks", "cvm", "chisquare", "tabular", "mmd", "lsdd")
ONLINE_DETECTORS = ("mmd", "lsdd", "cvm")
DRIFT_MODES = ("window", "online")
DRIFT_SIGNALS = ("inputs", "outputs", "embeddings")
CORRECTIONS = ("bonferroni", "fdr")
DRIFT_ACTIONS = ("rollback", "retrain", "alert")
ROLLBACK_TARGETS = ("previous", "baseline")
PROMOTION_STRATEGIES = ("direct", "shadow", "canary")
ON_INCONCLUSIVE = ("reject", "promote")


@dataclass
class InputSpec:
    """One named input of the model."""

    name: str = api_field("Input name: the ONNX graph input, the Hugging Face forward() argument, or a label for "
                          "a torch.export program's positional argument (inputs are passed in this order). "
                          "Data files hold one array under this name.", required=True, min_length=1, max_length=128,
                          pattern=r"^[A-Za-z_][A-Za-z0-9_.:-]*$")
    dtype: str = api_field("Element type: float32, float16, int64, int32 or bool.", default="float32",
                           enum=INPUT_DTYPES)
    shape: list[int] = api_field("Shape of one sample, without the batch dimension (e.g. [128] for token ids).",
                                 required=True, min_items=1, max_items=4, item_minimum=1)


@dataclass
class ModelSpec:
    """The source model to compress."""

    uri: str = api_field(
        "Where the source model is: builtin://digits-mlp, builtin://digits-cnn, builtin://digits-resnet, "
        "builtin://wine-mlp, builtin://breast-cancer-mlp (trained on first use with a fixed seed); "
        "file:///abs/path/model.pt2 (a torch.export program), file:///abs/path/model.onnx, a Hugging Face "
        "Transformers folder (config.json, safetensors weights, tokenizer files; read offline, never downloaded), "
        "pvc://claim/path or s3://bucket/key.",
        required=True,
        pattern=MODEL_URI_PATTERN,
        max_length=1024,
    )
    format: str = api_field("auto (decided by the file: .pt2 is torch-export, .onnx is onnx, a folder with "
                            "config.json is huggingface), torch-export, onnx or huggingface.",
                            default=d.MODEL_FORMAT, enum=MODEL_FORMATS)
    task: str = api_field("classification (logits, labels y), regression (one or more real outputs, targets y) or "
                          "embedding (a vector per row; no labels, judged by cosine similarity to the baseline).",
                          default=d.MODEL_TASK, enum=TASKS)
    input_shape: list[int] | None = api_field(
        "Shorthand for one float32 input: the shape of one sample, without the batch dimension (e.g. [64] or "
        "[1, 8, 8]). A non-builtin torch.export program needs inputShape or inputs.",
        min_items=1,
        max_items=4,
        item_minimum=1,
    )
    inputs: list[InputSpec] = api_field(
        "The model's named inputs, in order, for models with several inputs or non-float inputs (e.g. input_ids "
        "and attention_mask, int64, shape [128]). Exclusive with inputShape. ONNX and Hugging Face models may "
        "leave it unset: the graph's inputs (or input_ids/attention_mask) are used.",
        default_factory=list, max_items=16)


@dataclass
class DataSpec:
    """Datasets, as URIs: builtin://digits|wine|breast_cancer?split=train|eval, or an .npz file holding one
    array per input (X for the inputShape shorthand, else each spec.model.inputs name, [n, *shape]), y (int64 class
    labels, or float targets for regression; not needed for embedding) and optionally slice (one label per row).

    Three roles: train fine-tunes and calibrates; validation judges search probes, early stopping and the INT8
    fallback; eval is touched by the gates alone."""

    train: str = api_field("Training data, used for fine-tuning and calibration.", required=True,
                           pattern=DATA_URI_PATTERN, max_length=1024)
    eval: str = api_field("Held-out evaluation data the gates are measured on.", required=True,
                          pattern=DATA_URI_PATTERN, max_length=1024)
    validation: str | None = api_field("Validation data for search probes, early stopping and the INT8 fallback. "
                                       "Unset: a seeded, stratified validationFraction of train is held out "
                                       "(and recorded in the manifest).", pattern=DATA_URI_PATTERN, max_length=1024)
    validation_fraction: float = api_field("Fraction of train held out as validation when validation is unset.",
                                           default=d.VALIDATION_FRACTION, minimum=0.05, maximum=0.5)
    retrain: str | None = api_field("Recent labelled data used when drift triggers a retrain.",
                                    pattern=DATA_URI_PATTERN, max_length=1024)
    reference: str | None = api_field("Reference data for the drift detector; defaults to the eval data.",
                                      pattern=DATA_URI_PATTERN, max_length=1024)


@dataclass
class PruningSpec:
    """How weights are removed."""

    method: str = api_field(
        "none: no pruning (quantization alone); unstructured: per-layer L1 magnitude; global: magnitude ranked "
        "across all layers; structured: dependency-aware removal of whole channels, neurons, attention heads and "
        "FFN channels (a physically smaller, faster graph; norms and residual groups pruned together, embeddings "
        "and the output head kept).",
        default=d.PRUNING_METHOD, enum=PRUNING_METHODS)
    sparsity: float = api_field("Target fraction of weights (or channels, for structured) removed.",
                                default=d.PRUNING_SPARSITY, minimum=0.0, maximum=0.99)
    schedule: str = api_field("oneshot: prune once then fine-tune; gradual: polynomial sparsity ramp "
                              "(Zhu & Gupta 2017) with fine-tuning between steps.",
                              default=d.PRUNING_SCHEDULE, enum=SCHEDULES)
    fine_tune_epochs: int = api_field("Fine-tuning epochs after pruning (per step when gradual).",
                                      default=d.FINE_TUNE_EPOCHS, minimum=0, maximum=100)
    steps: int = api_field("Number of pruning steps of the gradual schedule.",
                           default=d.GRADUAL_STEPS, minimum=1, maximum=20)
    importance: str = api_field("How structured pruning ranks channels: magnitude (L2 of the weights) or taylor "
                                "(first-order Taylor expansion of the loss, from gradients on training data).",
                                default=d.PRUNING_IMPORTANCE, enum=IMPORTANCES)


@dataclass
class FineTuningSpec:
    """How a pruned model is fine-tuned to recover accuracy."""

    learning_rate: float | None = api_field("Peak learning rate (AdamW). Unset: chosen for the architecture "
                                            f"({d.LEARNING_RATE_SMALL:g} for small nets trained from scratch, "
                                            f"{d.LEARNING_RATE_PRETRAINED:g} for pretrained transformers).",
                                            minimum=0.0, exclusive_minimum=True, maximum=1.0)
    lr_schedule: str = api_field("cosine: warm-up then cosine decay over the fine-tuning; constant.",
                                 default=d.LR_SCHEDULE, enum=LR_SCHEDULES)
    batch_size: int = api_field("Rows per fine-tuning step.", default=d.FINE_TUNE_BATCH_SIZE, minimum=1,
                                maximum=4096)
    early_stopping_patience: int = api_field("Stop after this many epochs without improvement on the validation "
                                             "data and keep the best epoch's weights; 0 disables.",
                                             default=d.EARLY_STOPPING_PATIENCE, minimum=0, maximum=100)


@dataclass
class DistillationSpec:
    """Knowledge distillation from the uncompressed model while fine-tuning."""

    enabled: bool = api_field("Distil from the uncompressed model (the teacher). Embedding models, which have no "
                              "labels, are always fine-tuned this way.", default=d.DISTILLATION_ENABLED)
    temperature: float = api_field("Softmax temperature of the distillation loss (classification).",
                                   default=d.DISTILLATION_TEMPERATURE, minimum=0.0, exclusive_minimum=True,
                                   maximum=100.0)
    alpha: float = api_field("Weight of the distillation loss; 1 - alpha weighs the task loss on labels.",
                             default=d.DISTILLATION_ALPHA, minimum=0.0, maximum=1.0)


@dataclass
class QuantizationSpec:
    """Post-training quantization with onnxruntime.quantization."""

    mode: str = api_field("none; dynamic-int8 (MLP/transformer-style graphs; transformers are fused first by "
                          "onnxruntime's transformer optimizer); static-int8 (QDQ, per-channel, calibrated on "
                          "training data; for CNNs).",
                          default=d.QUANTIZATION_MODE, enum=QUANTIZATION_MODES)
    calibration: str = api_field("Static INT8 calibration: minmax, entropy or percentile.",
                                 default=d.QUANTIZATION_CALIBRATION, enum=CALIBRATION_METHODS)
    per_channel: bool = api_field("Per-channel INT8 weights.", default=d.QUANTIZATION_PER_CHANNEL)
    min_agreement: float = api_field("INT8 fidelity: the least top-1 agreement (cosine similarity for regression and "
                                     "embedding) with the float model on the whole validation split. Below it, the "
                                     "most sensitive nodes are kept in float (the fallback: nodes ranked by the "
                                     "error of quantizing each alone, then the fewest that pass). 0 opts out "
                                     "explicitly.", default=d.QUANTIZATION_MIN_AGREEMENT, minimum=0.0, maximum=1.0)
    max_fallback_fraction: float = api_field("Most of the quantized nodes the fallback may keep in float, as a "
                                             "fraction (rounded up), before the quantization is declared a failure. "
                                             "0 turns the fallback off.", default=d.QUANTIZATION_MAX_FALLBACK_FRACTION,
                                             minimum=0.0, maximum=1.0)
    max_fallback_nodes: int | None = api_field("Most nodes the fallback may keep in float, as a count, on top of "
                                               "maxFallbackFraction. Unset: no count cap; 0 turns the fallback off.",
                                               default=d.QUANTIZATION_MAX_FALLBACK_NODES, minimum=0, maximum=1000)


@dataclass
class SearchSpec:
    """Accuracy-aware search: find the largest sparsity that passes every gate. Probes are judged on the
    validation split (never on eval): a grid from maxSparsity down, stopping at its first pass, then refined
    above it (accuracy need not fall steadily with sparsity). The sparsest passing probe is kept and the other
    passing probes too (at most maxAlternates of them); the evaluate Job gates it on eval, and when eval
    disagrees it tries the next kept passing probe (the status and the model card say how many touched the eval
    data)."""

    enabled: bool = api_field("Search the sparsity instead of using pruning.sparsity.", default=False)
    min_sparsity: float = api_field("Lower end of the searched sparsity range.",
                                    default=d.SEARCH_MIN_SPARSITY, minimum=0.0, maximum=0.99)
    max_sparsity: float = api_field("Upper end of the searched sparsity range.",
                                    default=d.SEARCH_MAX_SPARSITY, minimum=0.0, maximum=0.99)
    max_probes: int = api_field("Most candidate sparsities tried.", default=d.SEARCH_MAX_PROBES,
                                minimum=1, maximum=20)
    max_alternates: int = api_field(
        "Most passing probes kept besides the chosen one, sparsest first, each a full copy of the model under "
        "alternates/ in the artifact. When eval disagrees with validation on the chosen probe, the evaluate Job "
        "tries only these, in order, and says when none is left; passing probes beyond this are not kept. "
        "0 keeps none (no fallback).", default=d.SEARCH_MAX_ALTERNATES, minimum=0, maximum=19)


@dataclass
class CompressionSpec:
    """How to compress the model."""

    pruning: PruningSpec = api_field("Pruning settings.", default_factory=PruningSpec)
    quantization: QuantizationSpec = api_field("Quantization settings.", default_factory=QuantizationSpec)
    search: SearchSpec = api_field("Sparsity search settings.", default_factory=SearchSpec)
    fine_tuning: FineTuningSpec = api_field("Fine-tuning settings.", default_factory=FineTuningSpec)
    distillation: DistillationSpec = api_field("Knowledge distillation settings.", default_factory=DistillationSpec)


@dataclass
class SliceGate:
    """A minimum accuracy on one slice of the eval data."""

    name: str = api_field("Slice label, as in the eval data's `slice` column.", required=True,
                          min_length=1, max_length=63)
    min_accuracy: float = api_field("Lowest accepted accuracy on this slice.", required=True,
                                    minimum=0.0, maximum=1.0)


@dataclass
class GatesSpec:
    """Metric gates a compressed artifact must pass to be promoted, measured on the eval data alone.

    When no quality gate is set, the task's default applies (classification: maxAccuracyDrop 0.01, Intel Neural
    Compressor's default criterion; regression: maxR2Drop 0.01; embedding: minCosineSimilarity 0.99), unless
    defaults is false."""

    max_accuracy_drop: float | None = api_field("Largest accepted accuracy drop vs the baseline, as a fraction "
                                                "(0.01 = one point).", minimum=0.0, maximum=1.0)
    min_accuracy: float | None = api_field("Lowest accepted accuracy.", minimum=0.0, maximum=1.0)
    min_f1: float | None = api_field("Lowest accepted macro-F1.", minimum=0.0, maximum=1.0)
    max_latency_p95_ms: float | None = api_field("Highest accepted p95 latency at batch 1, in milliseconds.",
                                                 minimum=0.0, exclusive_minimum=True)
    max_size_ratio: float | None = api_field("Largest accepted size on disk relative to the baseline.",
                                             minimum=0.0, exclusive_minimum=True)
    max_calibration_error: float | None = api_field("Largest accepted expected calibration error.",
                                                    minimum=0.0, maximum=1.0)
    max_mae: float | None = api_field("Regression: largest accepted mean absolute error.", minimum=0.0)
    max_rmse: float | None = api_field("Regression: largest accepted root mean squared error.", minimum=0.0)
    min_r2: float | None = api_field("Regression: lowest accepted R² (coefficient of determination).", maximum=1.0)
    max_r2_drop: float | None = api_field("Regression: largest accepted R² drop vs the baseline.", minimum=0.0)
    min_agreement: float | None = api_field("Fidelity: lowest accepted top-1 agreement with the uncompressed "
                                            "model's predictions (classification); needs no labels.",
                                            minimum=0.0, maximum=1.0)
    min_cosine_similarity: float | None = api_field("Fidelity: lowest accepted mean cosine similarity of the outputs "
                                                    "to the uncompressed model's (any task; needs no labels).",
                                                    minimum=-1.0, maximum=1.0)
    defaults: bool = api_field(
        "Apply the task's default quality gate when no quality gate is set ("
        + "; ".join(f"{task}: " + ", ".join(f"{gate} {value}" for gate, value in gates.items())
                    for task, gates in d.DEFAULT_QUALITY_GATES.items())
        + "; the classification default is Intel Neural Compressor's default criterion); false opts out "
        "explicitly (then a candidate with no gates is promoted unchecked).", default=d.GATES_DEFAULTS)
    slices: list[SliceGate] = api_field("Per-slice accuracy floors.", default_factory=list, max_items=64)
    min_slice_samples: int = api_field("A slice with fewer eval rows is judged Inconclusive, not passed.",
                                       default=d.MIN_SLICE_SAMPLES, minimum=1)


@dataclass
class AutoscalingSpec:
    """Autoscaling of the serving Deployment: the operator owns an autoscaling/v2 HorizontalPodAutoscaler for it
    (and deletes it when this section is removed). Set exactly one target. While it is set, replicas is not
    applied: the HPA owns the Deployment's replica count. A cluster feature: the embedded mode ignores it."""

    min_replicas: int = api_field("Fewest serving replicas.", default=d.SERVING_AUTOSCALING_MIN_REPLICAS,
                                  minimum=1, maximum=100)
    max_replicas: int = api_field("Most serving replicas (at least minReplicas).", required=True, minimum=1,
                                  maximum=100)
    target_cpu_utilization: int | None = api_field(
        "Target average CPU use, as a percentage of the serving container's CPU request (a Resource metric, "
        "served by metrics-server). It needs a CPU request: when resources sets neither requests.cpu nor "
        f"limits.cpu, the serving container gets requests.cpu {d.SERVING_AUTOSCALING_CPU_REQUEST}.",
        minimum=1, maximum=1000, wire="targetCPUUtilization")
    target_concurrency: int | None = api_field(
        "Target average of requests in flight per serving Pod (a Pods metric on the server's "
        f"{d.SERVING_CONCURRENCY_METRIC} gauge). Needs a custom-metrics adapter that serves that gauge from "
        "Prometheus to the custom.metrics.k8s.io API (prometheus-adapter, or KEDA's); without one the HPA "
        "reports FailedGetPodsMetric and does not scale.", minimum=1, maximum=10000)


@dataclass
class BatchingSpec:
    """Server-side dynamic batching, as Triton's dynamic batcher does it: concurrent requests for the model (REST
    and gRPC) are merged along the batch dimension into one ONNX Runtime run, and each gets its own rows back.
    Requests with other non-batch shapes or datatypes are not merged; a request the model rejects fails alone;
    capture and metrics stay per request."""

    max_batch_size: int = api_field("Most rows in one merged run (a request this big or bigger runs alone).",
                                    default=d.SERVING_BATCH_MAX_SIZE, minimum=2, maximum=4096)
    max_delay_ms: int = api_field("Longest a request waits for others to join its run, in milliseconds (0: only "
                                  "requests that arrive together are merged).", default=d.SERVING_BATCH_MAX_DELAY_MS,
                                  minimum=0, maximum=1000)


@dataclass
class SecretKeyRef:
    """One key of a Secret in the CompressedModel's namespace."""

    name: str = api_field("Secret name.", required=True, min_length=1, max_length=253)
    key: str = api_field("Key in the Secret.", default=d.FEEDBACK_TOKEN_SECRET_KEY, min_length=1, max_length=253)


@dataclass
class FeedbackSpec:
    """The ground-truth feedback endpoint (`POST /v2/models/{name}/feedback`), on while spec.drift.performance
    is set."""

    token_secret_ref: SecretKeyRef | None = api_field(
        "A bearer token labels must carry (`Authorization: Bearer <token>`): the Secret key is mounted read-only "
        "into the serving Pod and passed as `kompressor serve --feedback-token-file`; a wrong or missing token gets "
        "401. Unset: labels need no token (embedded mode always runs without one, on the local machine).")


@dataclass
class ServingSpec:
    """The serving Deployment (ONNX Runtime, Open Inference Protocol v2)."""

    replicas: int = api_field("Serving replicas (not applied while autoscaling is set: the HPA owns the count).",
                              default=d.SERVING_REPLICAS, minimum=0, maximum=100)
    resources: dict | None = api_field("Container resources (requests/limits), as in a Pod spec.", free_form=True)
    port: int = api_field("HTTP port of the inference server.", default=d.SERVING_PORT, minimum=1, maximum=65535)
    grpc_port: int | None = api_field("gRPC port of the inference server (Open Inference Protocol v2, "
                                      "inference.GRPCInferenceService, beside REST on port; same model, capture and "
                                      "metrics). Unset: REST only.", default=d.SERVING_GRPC_PORT, minimum=1,
                                      maximum=65535)
    workers: int | None = api_field(
        "Server processes per serving Pod (`kompressor serve --workers`), sharing the ports (SO_REUSEPORT), with "
        "ONNX Runtime's threads divided among them. Unset: one per CPU of the container's CPU limit "
        "(resources.limits.cpu, rounded down); one when there is no CPU limit (the default resources), ONNX Runtime "
        "then using every core of the node in that one process. Always 1 while spec.drift.performance is set.",
        default=d.SERVING_WORKERS, minimum=1, maximum=64)
    batching: BatchingSpec | None = api_field(
        "Dynamic batching of concurrent requests (`kompressor serve --max-batch-size --max-batch-delay-ms`). Unset: "
        "every request runs on its own.")
    autoscaling: AutoscalingSpec | None = api_field(
        "Scale the serving Deployment with the load (a HorizontalPodAutoscaler; replicas is then not applied). "
        "Unset: a fixed replicas count. With more than one replica, or autoscaling, the operator also keeps a "
        f"PodDisruptionBudget (maxUnavailable {d.SERVING_PDB_MAX_UNAVAILABLE}) and spreads the Pods over nodes "
        "(a soft topologySpreadConstraint on kubernetes.io/hostname).")
    feedback: FeedbackSpec | None = api_field(
        "Guarding the ground-truth feedback endpoint, which spec.drift.performance turns on.")


@dataclass
class JobsSpec:
    """The pruning and evaluation Jobs."""

    image: str = api_field("Container image of the jobs.", default=d.JOBS_IMAGE, min_length=1, max_length=512)
    gpu: int = api_field("GPUs per pruning Job (nvidia.com/gpu); 0 runs on CPU.", default=d.JOB_GPU,
                         minimum=0, maximum=16)
    resources: dict | None = api_field("Container resources (requests/limits), as in a Pod spec.", free_form=True)
    node_selector: dict[str, str] | None = api_field("Node labels the Job's Pod must match.", map_of=str)
    tolerations: list[dict] = api_field("Pod tolerations, as in a Pod spec (e.g. for GPU taints).",
                                        default_factory=list, free_form=True, max_items=32)
    backoff_limit: int = api_field("Retries before a Job is marked failed.", default=d.JOB_BACKOFF_LIMIT,
                                   minimum=0, maximum=20)
    active_deadline_seconds: int = api_field("Wall-clock limit of one Job.", default=d.JOB_ACTIVE_DEADLINE_SECONDS,
                                             minimum=1)


@dataclass
class CategoricalFeature:
    """A categorical input feature and its number of categories."""

    feature: int = api_field("Index of the feature in the flattened input.", required=True, minimum=0)
    categories: int = api_field("Number of categories the feature takes (values 0..categories-1).",
                                required=True, minimum=2)


@dataclass
class PerformanceDriftSpec:
    """Performance drift: online accuracy from ground-truth labels that arrive after the predictions
    (`POST /v2/models/{name}/feedback`). Setting it turns the serving Pod's feedback endpoint on
    (`kompressor serve --feedback --feedback-window <window>`) and forces one server process per Pod (`--workers
    1`, whatever serving.workers says: each process remembers only the requests it answered); serving.replicas
    must be 1 without autoscaling, for the same reason.
    Every `window` labelled rows make one window, judged once (fresh, disjoint evidence; labels that complete
    several windows between two checks are several windows); accuracy below minAccuracy is a drifting window (reason PerformanceDrift) that goes through the same
    consecutiveWindows, cooldown, caps and action as data drift."""

    min_accuracy: float = api_field("Online accuracy floor (share of labelled predictions that were right).",
                                    required=True, minimum=0.0, maximum=1.0)
    window: int = api_field("Labelled predictions per check (the server's accuracy window).",
                            default=d.DRIFT_PERFORMANCE_WINDOW, minimum=1, maximum=100000)
    min_labels: int = api_field("Fewest labelled predictions in the window for a verdict (below: Inconclusive, "
                                "never drift); at most window.", default=d.DRIFT_PERFORMANCE_MIN_LABELS, minimum=1,
                                maximum=100000)


@dataclass
class DriftSpec:
    """How live traffic is watched for drift (Alibi Detect), and what a drift verdict does."""

    enabled: bool = api_field("Run the drift watcher.", default=d.DRIFT_ENABLED)
    detector: str = api_field("Alibi Detect detector: ks, cvm, chisquare, tabular, mmd, lsdd.",
                              default=d.DRIFT_DETECTOR, enum=DETECTORS)
    signal: str | None = api_field("What is tested: inputs (the request features), outputs (predicted classes "
                                   "or scores: prediction drift) or embeddings (the model's output vectors). "
                                   "Unset: inputs for float inputs, outputs for token/integer inputs (a KS test on "
                                   "token ids means nothing).", enum=DRIFT_SIGNALS)
    mode: str = api_field("window: test each disjoint run of windowSize fresh rows once, in order; online: Alibi Detect's online "
                          "detectors (mmd, lsdd, cvm) fed one row at a time, calibrated by ert.",
                          default=d.DRIFT_MODE, enum=DRIFT_MODES)
    p_value: float = api_field("Significance level of the drift test.", default=d.DRIFT_P_VALUE,
                               minimum=0.0, maximum=1.0, exclusive_minimum=True, exclusive_maximum=True)
    ert: int = api_field("Expected run time between false alarms, in rows (online mode).", default=d.DRIFT_ERT,
                         minimum=1)
    window_size: int = api_field("Rows per test (window mode) or online window size.",
                                 default=d.DRIFT_WINDOW_SIZE, minimum=10, maximum=100000)
    max_window_age_seconds: int | None = api_field("Window mode: test a partial window once its oldest row is this "
                                                   "old (marked with its size; Inconclusive below the detector's "
                                                   "minimum). Unset: a partial window waits until it fills.",
                                                   minimum=1)
    check_interval_seconds: int = api_field("Seconds between checks.", default=d.DRIFT_CHECK_INTERVAL_SECONDS,
                                            minimum=1)
    correction: str = api_field("Multivariate correction for feature-wise tests.", default=d.DRIFT_CORRECTION,
                                enum=CORRECTIONS)
    categorical_features: list[CategoricalFeature] = api_field(
        "Categorical features (for chisquare and tabular).", default_factory=list, max_items=256)
    consecutive_windows: int = api_field("Act only after this many drifting windows in a row (hysteresis); each "
                                         "window is fresh, disjoint traffic.",
                                         default=d.DRIFT_CONSECUTIVE_WINDOWS, minimum=1, maximum=100)
    action: str = api_field("What a drift verdict does: rollback, retrain (needs data.retrain) or alert.",
                            default=d.DRIFT_ACTION, enum=DRIFT_ACTIONS)
    rollback_to: str = api_field("previous: the previously promoted revision; baseline: revision 0, "
                                 "the uncompressed model.", default=d.DRIFT_ROLLBACK_TO, enum=ROLLBACK_TARGETS)
    cooldown_seconds: int = api_field("Least time between two automatic actions.",
                                      default=d.DRIFT_COOLDOWN_SECONDS, minimum=0)
    max_retrains: int = api_field("Most automatic retrains.", default=d.DRIFT_MAX_RETRAINS, minimum=0)
    max_auto_actions: int = api_field("After this many automatic actions without a human touching the resource, "
                                      "pause and alert.", default=d.DRIFT_MAX_AUTO_ACTIONS, minimum=1)
    performance: PerformanceDriftSpec | None = api_field(
        "Performance drift: act when the online accuracy from ground-truth feedback (POST "
        "/v2/models/{name}/feedback) falls below a floor, as on data drift (same consecutiveWindows, cooldown, caps "
        "and action; reason PerformanceDrift). Turns the serving Pod's feedback endpoint on and forces one server "
        "process per Pod (--workers 1, whatever serving.workers says: a label must reach the process that answered "
        "the request) and one serving replica without autoscaling (labels sent through the Service would reach a Pod that "
        "did not answer the request). Unset: only data drift is watched.")


@dataclass
class OnlineGatesSpec:
    """Gates judged on live traffic while a candidate is shadowed or canaried, against the serving revision."""

    min_requests: int = api_field("Live requests the candidate must have seen (in each canary step) before the gates "
                                  "are judged; fewer is Inconclusive.", default=d.ONLINE_MIN_REQUESTS, minimum=1,
                                  maximum=10_000_000)
    min_agreement: float | None = api_field("Least mean agreement of the candidate's outputs with the serving "
                                            "revision's on the same requests: top-1 agreement (classification), "
                                            "cosine similarity (embedding), 1 - relative error (regression).",
                                            default=d.ONLINE_MIN_AGREEMENT, minimum=0.0, maximum=1.0)
    max_latency_ratio: float | None = api_field("Most the candidate's p95 ONNX Runtime time may be, relative to the "
                                                "serving revision's on the same requests.",
                                                default=d.ONLINE_MAX_LATENCY_RATIO, minimum=0.0,
                                                exclusive_minimum=True, maximum=100.0)
    max_error_rate: float | None = api_field("Most share of the candidate's runs that may fail.",
                                             default=d.ONLINE_MAX_ERROR_RATE, minimum=0.0, maximum=1.0)
    min_accuracy: float | None = api_field("Least accuracy on the candidate's requests that got a ground-truth label "
                                           "(POST /v2/models/{name}/feedback, which this turns on); judged once "
                                           "minRequests labels arrived.", default=d.ONLINE_MIN_ACCURACY, minimum=0.0,
                                           maximum=1.0)


@dataclass
class CanarySpec:
    """The canary's steps."""

    steps: list[int] | None = api_field("Percent of live traffic the candidate answers, step by step (increasing, "
                                        "each 1-99); the online gates are judged after each, and all traffic moves "
                                        "once the last passes. Unset: "
                                        + ", ".join(map(str, d.CANARY_STEPS)) + ".", min_items=1, max_items=10,
                                        item_minimum=1)

    def percentages(self) -> list[int]:
        return list(self.steps) if self.steps else list(d.CANARY_STEPS)


@dataclass
class PromotionSpec:
    """Promotion control."""

    strategy: str = api_field("direct: a revision that passes its gates serves all traffic at once. shadow: it first "
                              "gets a copy of live requests (clients keep getting the serving revision's answers). "
                              "canary: it first answers canary.steps shares of them. Shadow and canary promote "
                              "only once the online gates pass; the baseline serves while the first candidate is "
                              "judged.", default=d.PROMOTION_STRATEGY, enum=PROMOTION_STRATEGIES)
    online_gates: OnlineGatesSpec = api_field("Gates on live traffic (shadow and canary).",
                                              default_factory=OnlineGatesSpec)
    canary: CanarySpec = api_field("Canary steps.", default_factory=CanarySpec)
    on_inconclusive: str = api_field("What an online stage still Inconclusive at its deadline does: reject the "
                                     "candidate, or promote it.", default=d.ON_INCONCLUSIVE, enum=ON_INCONCLUSIVE)
    online_deadline_seconds: int = api_field("How long an online stage (each canary step) may stay Inconclusive.",
                                             default=d.ONLINE_DEADLINE_SECONDS, minimum=10, maximum=30 * 86400)

    require_approval: bool = api_field("Hold a passing revision in AwaitingApproval until the annotation "
                                       "kompressor.io/approve is set to its revision number.",
                                       default=d.REQUIRE_APPROVAL)
    paused: bool = api_field("Stop acting (no jobs, no promotions, no rollbacks); keep observing.",
                             default=d.PAUSED)


@dataclass
class CompressedModelSpec:
    """A model to compress, gate, serve and watch for drift."""

    model: ModelSpec = api_field("The source model.", required=True)
    data: DataSpec = api_field("Datasets.", required=True)
    compression: CompressionSpec = api_field("Compression settings.", default_factory=CompressionSpec)
    gates: GatesSpec = api_field("Metric gates, judged on the eval data alone; with no quality gate set, the task's "
                                 "default quality gate applies (see gates.defaults).", default_factory=GatesSpec)
    serving: ServingSpec = api_field("Serving settings.", default_factory=ServingSpec)
    jobs: JobsSpec = api_field("Job settings.", default_factory=JobsSpec)
    drift: DriftSpec = api_field("Drift watching.", default_factory=DriftSpec)
    promotion: PromotionSpec = api_field("Promotion control.", default_factory=PromotionSpec)
    revision_history_limit: int = api_field("Most revisions kept in status (the baseline and the serving "
                                            "revision are always kept).", default=d.REVISION_HISTORY_LIMIT,
                                            minimum=1, maximum=100)


def compression_inputs(spec: CompressedModelSpec) -> dict:
    """The part of a spec whose edit starts a new compression.

    Edits elsewhere (serving, drift, promotion, job placement, data.retrain/reference,
    revisionHistoryLimit) take effect without recompressing.
    """
    from kompressor.api.wire import to_wire

    return {
        "model": to_wire(spec.model),
        "data": {"train": spec.data.train, "eval": spec.data.eval, "validation": spec.data.validation,
                 "validationFraction": spec.data.validation_fraction},
        "compression": to_wire(spec.compression),
        "gates": to_wire(spec.gates),
    }
