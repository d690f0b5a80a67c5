"""Every default of the CompressedModel API, in one place.

The CRD schema, the Python spec model, the operator and the embedded mode all read
their defaults from here, so a default changes in exactly one line.
"""

GROUP = "kompressor.io"
VERSION = "v1alpha1"
KIND = "CompressedModel"
PLURAL = "compressedmodels"
SINGULAR = "compressedmodel"
SHORT_NAMES = ["cmodel"]
CATEGORIES = ["kompressor"]
API_VERSION = f"{GROUP}/{VERSION}"

DEFAULT_NAMESPACE = "default"

# Images: pinned by tag; a cluster operator overrides them in the Helm values.
JOBS_IMAGE = "ghcr.io/kompressor/kompressor-jobs:0.1.0"
OPERATOR_IMAGE = "ghcr.io/kompressor/kompressor-operator:0.1.0"

# spec.model
MODEL_FORMAT = "auto"
MODEL_TASK = "classification"
# A Hugging Face model without spec.model.inputs: input_ids + attention_mask (int64) of the tokenizer's
# model_max_length, capped at this many tokens.
HF_INPUT_NAMES = ("input_ids", "attention_mask")
HF_MAX_SEQUENCE_LENGTH = 128

# spec.data: the part of train held out as validation when spec.data.validation is unset.
VALIDATION_FRACTION = 0.15
VALIDATION_SEED = 0

# spec.compression
PRUNING_METHOD = "unstructured"
PRUNING_SPARSITY = 0.5
PRUNING_SCHEDULE = "oneshot"
# Enough, with distillation and a 3e-3 peak rate, to keep a ResNet within 1 point after 50 % channel pruning
# (early stopping usually ends it sooner).
FINE_TUNE_EPOCHS = 8
GRADUAL_STEPS = 4
PRUNING_IMPORTANCE = "magnitude"
LR_SCHEDULE = "cosine"
# The cosine schedule warms up linearly over this fraction of the fine-tuning steps.
FINE_TUNE_WARMUP_FRACTION = 0.1
FINE_TUNE_BATCH_SIZE = 64
EARLY_STOPPING_PATIENCE = 2
# Unset spec.compression.fineTuning.learningRate: small nets trained from scratch vs pretrained transformers.
LEARNING_RATE_SMALL = 3e-3
LEARNING_RATE_PRETRAINED = 3e-5
DISTILLATION_ENABLED = True
DISTILLATION_TEMPERATURE = 4.0
DISTILLATION_ALPHA = 0.5
QUANTIZATION_MODE = "none"
QUANTIZATION_CALIBRATION = "minmax"
QUANTIZATION_PER_CHANNEL = True
QUANTIZATION_MIN_AGREEMENT = 0.99
# The INT8 fallback keeps at most this fraction of the quantized nodes in float (rounded up): past about a
# quarter, most of INT8's speed-up is gone and another compression suits better. No count cap by default.
QUANTIZATION_MAX_FALLBACK_FRACTION = 0.25
QUANTIZATION_MAX_FALLBACK_NODES = None
SEARCH_MIN_SPARSITY = 0.0
SEARCH_MAX_SPARSITY = 0.95
SEARCH_MAX_PROBES = 6
SEARCH_MAX_ALTERNATES = 2  # passing probes kept as fallbacks besides the chosen one (full model copies)

# spec.gates: a slice with fewer eval rows than this is judged Inconclusive.
MIN_SLICE_SAMPLES = 20
# The quality gate applied when spec.gates sets none (unless spec.gates.defaults is false), per task.
GATES_DEFAULTS = True
DEFAULT_QUALITY_GATES = {
    "classification": {"maxAccuracyDrop": 0.01},  # Intel Neural Compressor's default accuracy criterion
    "regression": {"maxR2Drop": 0.01},
    "embedding": {"minCosineSimilarity": 0.99},
}
# The gates that count as quality gates for that rule (latency and size alone do not protect users).
QUALITY_GATES = ("maxAccuracyDrop", "minAccuracy", "minF1", "maxMae", "maxRmse", "minR2", "maxR2Drop",
                 "minAgreement", "minCosineSimilarity", "slices")
# Latency gates use a p95 from at least this many timed runs at batch 1.
LATENCY_TIMED_RUNS = 1000

# spec.serving
SERVING_REPLICAS = 1
SERVING_PORT = 8080
SERVING_GRPC_PORT = None  # spec.serving.grpcPort: gRPC off unless set (KServe and Triton use 9000 / 8001)
SERVING_RESOURCES = {"requests": {"cpu": "250m", "memory": "512Mi"}, "limits": {"memory": "2Gi"}}
# spec.serving.workers unset: `kompressor serve --workers 0`, one server process per CPU of the container's limit
# (one without a CPU limit, the default resources: ONNX Runtime then uses every core in one process).
SERVING_WORKERS = None
SERVING_AUTO_WORKERS = 0  # what --workers 0 means
# spec.serving.batching (dynamic batching; off unless the section is set): the most rows one merged ONNX Runtime
# run holds, and the longest a request waits for others to join it.
SERVING_BATCH_MAX_SIZE = 32
SERVING_BATCH_MAX_DELAY_MS = 2
# The REST server's read timeouts: a request body must arrive within this time once its head has (else 408);
# a connection that sends no complete request head for this long (slow headers, or idle keep-alive) is closed.
SERVING_BODY_TIMEOUT_SECONDS = 30.0
SERVING_HEADER_TIMEOUT_SECONDS = 75.0
# A body over --max-body-bytes is read and discarded up to this many times the limit, so that the client gets its
# 413 on a kept connection; past that (or a Content-Length past it) the 413 goes out at once and the connection
# is closed without reading the rest.
SERVING_BODY_DISCARD_FACTOR = 2
# Ground-truth feedback (`kompressor serve --feedback`): online accuracy per revision over the last this many
# labelled predictions, and the most recent requests remembered by id for labels to refer to (oldest forgotten).
SERVING_FEEDBACK_WINDOW = 500
SERVING_FEEDBACK_MAX_REQUESTS = 100_000
# completed disjoint label windows a server keeps per revision for the drift watcher (more between two of its
# checks: the oldest are lost, and the watcher says so)
SERVING_FEEDBACK_WINDOWS_KEPT = 100
# spec.serving.autoscaling: the operator owns an autoscaling/v2 HorizontalPodAutoscaler for the serving
# Deployment. targetConcurrency is a Pods metric: the per-Pod average of this gauge of the server's
# /metrics (requests being answered), served to the HPA by a custom-metrics adapter (prometheus-adapter).
SERVING_AUTOSCALING_MIN_REPLICAS = 1
SERVING_CONCURRENCY_METRIC = "kompressor_inference_requests_in_flight"
# targetCPUUtilization is a percentage of the container's CPU request: when spec.serving.resources sets
# neither requests.cpu nor limits.cpu (which the API server copies into requests), this request is added.
SERVING_AUTOSCALING_CPU_REQUEST = SERVING_RESOURCES["requests"]["cpu"]
# The serving PodDisruptionBudget (replicas > 1, or autoscaling): a drain or an eviction takes at most
# this many serving Pods at a time, and never blocks a drain of a single-replica model for good.
SERVING_PDB_MAX_UNAVAILABLE = 1
# With replicas > 1 (or autoscaling up to more than one), serving Pods spread over nodes by default: a soft
# constraint (ScheduleAnyway), so a one-node cluster still schedules them all.
SERVING_SPREAD_TOPOLOGY_KEY = "kubernetes.io/hostname"
SERVING_SPREAD_MAX_SKEW = 1

# spec.jobs
JOB_GPU = 0
# Container resources when spec.jobs.resources / spec.serving.resources is unset (a BestEffort Pod is the
# first evicted, and a namespace quota on requests or limits rejects it). No CPU limit: it would only
# throttle pruning and inference; set one in the spec where a quota demands it.
JOB_RESOURCES = {"requests": {"cpu": "1", "memory": "2Gi"}, "limits": {"memory": "8Gi"}}
JOB_BACKOFF_LIMIT = 2
JOB_ACTIVE_DEADLINE_SECONDS = 3600

# spec.drift
DRIFT_ENABLED = True
DRIFT_DETECTOR = "ks"
DRIFT_MODE = "window"
DRIFT_P_VALUE = 0.05
DRIFT_ERT = 200
DRIFT_WINDOW_SIZE = 200
DRIFT_CHECK_INTERVAL_SECONDS = 30
DRIFT_CORRECTION = "bonferroni"
DRIFT_CONSECUTIVE_WINDOWS = 2
DRIFT_ACTION = "rollback"
DRIFT_ROLLBACK_TO = "previous"
DRIFT_COOLDOWN_SECONDS = 300
DRIFT_MAX_RETRAINS = 3
DRIFT_MAX_AUTO_ACTIONS = 3
# spec.drift.performance: online accuracy from ground-truth feedback (`kompressor serve --feedback`). A check counts
# once `window` new labels arrived since the last one (disjoint windows: the server's --feedback-window is `window`);
# fewer than minLabels labelled predictions in the server's window is Inconclusive, never drift.
DRIFT_PERFORMANCE_WINDOW = SERVING_FEEDBACK_WINDOW
DRIFT_PERFORMANCE_MIN_LABELS = 100
FEEDBACK_TOKEN_SECRET_KEY = "token"  # spec.serving.feedback.tokenSecretRef.key unless given
PERFORMANCE_DRIFT_REASON = "PerformanceDrift"  # status.drift.reason of an online-accuracy verdict
DATA_DRIFT_REASON = "DataDrift"  # status.drift.reason of a data (input, output, embedding) verdict
# The drift watcher Pod (not part of the spec): its Prometheus port (container port "metrics", scraped by
# the chart's PodMonitor) and its resources.
DRIFT_METRICS_PORT = 9102
DRIFT_WATCHER_RESOURCES = {"requests": {"cpu": "100m", "memory": "768Mi"}, "limits": {"memory": "2Gi"}}

# spec.promotion
REQUIRE_APPROVAL = False
PAUSED = False
PROMOTION_STRATEGY = "direct"  # direct | shadow | canary
CANARY_STEPS = (10, 50)  # percent of live traffic answered by the candidate, step by step; then 100
ONLINE_MIN_REQUESTS = 200  # live requests the candidate must see (per canary step) before a verdict
ONLINE_MIN_AGREEMENT = 0.95  # top-1 agreement (cosine for embeddings) with the serving revision
ONLINE_MAX_ERROR_RATE = 0.01
ONLINE_MAX_LATENCY_RATIO = None  # the candidate's p95 ONNX Runtime time over the serving revision's
ONLINE_MIN_ACCURACY = None  # on requests with a ground-truth label (turns the feedback endpoint on)
ONLINE_DEADLINE_SECONDS = 3600  # an Inconclusive stage (or canary step) waits this long, then onInconclusive
ON_INCONCLUSIVE = "reject"  # reject | promote
# The serving process' online stage (kompressor serve --candidate ...)
SERVING_MIRROR_QUEUE = 256  # shadow: requests waiting to be mirrored; beyond it copies are dropped (and counted)
# mirrored copies gather this long after the first, then run merged, one ORT run per model and batch of at most
# SERVING_MIRROR_BATCH_ROWS rows: the event loop then pays one wake-up per batch, not per request (bench/mirroring.py)
SERVING_MIRROR_LINGER_SECONDS = 0.02
SERVING_MIRROR_BATCH_ROWS = 64
SERVING_MIRROR_NICE = 10  # added to the mirror thread's nice value: live requests get the CPU first
SERVING_CANDIDATE_MODE = "shadow"  # --candidate-mode / the candidate endpoint's parameters.mode unless given
SERVING_CANDIDATE_WEIGHT = 0.0  # canary: percent of requests the candidate answers unless given
ONLINE_LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                          2.5, 5.0)  # upper bounds (s) of the ORT run-time histograms; a last bucket is +Inf
ONLINE_EVIDENCE_TIMEOUT_SECONDS = 3.0  # reading one serving process' evidence (GET /v2/models/{name}/online)
ONLINE_POLL_SECONDS = 5.0  # reconcile at least this often during an online stage
ONLINE_MAX_SOURCES = 32  # serving processes whose last counts the status remembers (restarts, rollouts)

REVISION_HISTORY_LIMIT = 10

# Annotations a person (or a GitOps tool) sets to steer a CompressedModel.
ANNOTATION_APPROVE = f"{GROUP}/approve"  # value: the revision number to promote
ANNOTATION_RETRY = f"{GROUP}/retry"  # value: any new token re-runs a failed/rejected compression
ANNOTATION_RESUME = f"{GROUP}/resume"  # value: any new token resumes a Paused resource
LABEL_REVISION = f"{GROUP}/revision"
LABEL_MODEL = f"{GROUP}/model"
LABEL_COMPONENT = "app.kubernetes.io/component"

# The revision number of the uncompressed baseline.
BASELINE_REVISION = 0
