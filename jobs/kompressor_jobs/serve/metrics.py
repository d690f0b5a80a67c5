"""The inference server's Prometheus metrics (one registry per server)."""

from __future__ import annotations

import os
from contextlib import contextmanager

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from kompressor.api.defaults import ONLINE_LATENCY_BUCKETS

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)


class InFlight:
    """The in-flight gauge of one model, and the same count as a plain number the dynamic batcher reads (a
    request the server holds but the batcher has not seen yet -- its body still being read or decoded -- is
    one that may join a batch)."""

    def __init__(self, gauge) -> None:
        self.gauge = gauge
        self.count = 0

    @contextmanager
    def track_inprogress(self):
        self.count += 1
        try:
            with self.gauge.track_inprogress():
                yield
        finally:
            self.count -= 1


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("kompressor_inference_requests",
                                "Successful inference requests, by protocol (rest, grpc).",
                                ["model", "revision", "protocol"], registry=r)
        self.errors = Counter("kompressor_inference_errors",
                              "Failed inference requests, by protocol and status (REST: the HTTP status; gRPC: the "
                              "status code name).", ["model", "revision", "protocol", "code"], registry=r)
        self.latency = Histogram("kompressor_inference_latency_seconds",
                                 "Time from request received to response ready (successful requests).",
                                 ["model", "revision"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch = Histogram("kompressor_inference_batch_size", "Rows per successful request.",
                               ["model", "revision"], buckets=BATCH_BUCKETS, registry=r)
        # with dynamic batching (--max-batch-size): what each ONNX Runtime run held, after merging
        self.run_rows = Histogram("kompressor_inference_run_batch_size",
                                  "Rows per ONNX Runtime run of the dynamic batcher (several requests merged).",
                                  ["model"], buckets=BATCH_BUCKETS, registry=r)
        self.run_requests = Histogram("kompressor_inference_run_requests",
                                      "Requests per ONNX Runtime run of the dynamic batcher.", ["model"],
                                      buckets=BATCH_BUCKETS, registry=r)
        # what spec.serving.autoscaling.targetConcurrency scales on (per-Pod average, through a metrics adapter)
        self.in_flight = Gauge("kompressor_inference_requests_in_flight",
                               "Inference requests being answered now (REST and gRPC).", ["model"], registry=r,
                               multiprocess_mode="livesum")
        self.revision = Gauge("kompressor_serving_revision", "Revision being served.", ["model"], registry=r,
                              multiprocess_mode="livemostrecent")
        self.swaps = Counter("kompressor_model_swaps", "Hot swaps, by outcome.", ["model", "outcome"], registry=r)
        self.captured = Counter("kompressor_capture_rows", "Rows written to the capture folder.", ["model"],
                                registry=r)
        self._children: dict[tuple[str, str], tuple] = {}
        # ground-truth feedback (--feedback, kompressor_jobs.serve.feedback)
        self.online_accuracy = Gauge("kompressor_online_accuracy",
                                     "Share of the last --feedback-window labelled predictions of a revision that "
                                     "were right.", ["model", "revision"], registry=r,
                                     multiprocess_mode="livemostrecent")
        self.online_labels = Gauge("kompressor_online_accuracy_labels",
                                   "Labelled predictions in a revision's online accuracy window.",
                                   ["model", "revision"], registry=r, multiprocess_mode="livemostrecent")
        self.feedback_accepted = Counter("kompressor_feedback_labels_accepted",
                                         "Ground-truth labels accepted, by the revision that made the prediction.",
                                         ["model", "revision"], registry=r)
        self.feedback_refused = Counter("kompressor_feedback_labels_refused",
                                        "Ground-truth labels refused (malformed, unknown_id, duplicate, "
                                        "label_out_of_range, unauthorized).", ["model", "reason"], registry=r)
        self.capture_dropped = Counter("kompressor_capture_dropped_rows",
                                       "Rows not kept for drift watching (queue_full, size_cap, write_error).",
                                       ["model", "reason"], registry=r)
        # the online stage: a candidate beside the serving revision (kompressor_jobs.serve.online)
        self.online_candidate_revision = Gauge("kompressor_online_candidate_revision",
                                               "Revision of the candidate run beside the serving one (-1: none).",
                                               ["model"], registry=r, multiprocess_mode="livemostrecent")
        self.online_candidate_weight = Gauge("kompressor_online_candidate_weight",
                                             "Percent of requests the candidate answers (canary; shadow and none: "
                                             "0).", ["model"], registry=r, multiprocess_mode="livemostrecent")
        self.online_requests = Counter("kompressor_online_candidate_requests",
                                       "Candidate runs on live requests (shadow: mirrored; canary: answered), "
                                       "failed ones included.", ["model", "revision", "mode"], registry=r)
        self.online_errors = Counter("kompressor_online_candidate_errors", "Candidate runs that failed.",
                                     ["model", "revision", "mode"], registry=r)
        self.online_dropped = Counter("kompressor_online_mirror_dropped",
                                      "Request copies not mirrored because the mirror queue was full.", ["model"],
                                      registry=r)
        self.online_agreement_rows = Counter("kompressor_online_agreement_rows",
                                             "Rows whose candidate and serving outputs were compared.",
                                             ["model", "revision"], registry=r)
        self.online_agreement = Counter("kompressor_online_agreement",
                                        "Sum of the agreement (0 to 1) of the compared rows: over "
                                        "kompressor_online_agreement_rows, the mean agreement.",
                                        ["model", "revision"], registry=r)
        self.online_run_seconds = Histogram("kompressor_online_run_seconds",
                                            "ONNX Runtime run time of each mirrored run (a merged batch of copies, "
                                            "or one alone) of the candidate and of the serving model (role), on "
                                            "the same copies.", ["model", "revision", "role"],
                                            buckets=ONLINE_LATENCY_BUCKETS, registry=r)
        self.online_stage_labels = Counter("kompressor_online_stage_labels",
                                           "Labelled rows during the candidate's stint: predicted by the candidate "
                                           "or by the serving revision (role).", ["model", "revision", "role"],
                                           registry=r)
        self.online_stage_right = Counter("kompressor_online_stage_right", "Of those, rows predicted right.",
                                          ["model", "revision", "role"], registry=r)

    def exposition(self) -> CollectorRegistry:
        """What /metrics shows: this registry; with several worker processes (PROMETHEUS_MULTIPROC_DIR set, see
        kompressor_jobs.serve.workers), the sum over all of them and the supervisor, whichever worker answers."""
        folder = os.environ.get(MULTIPROC_ENV)
        if not folder:
            return self.registry
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=folder)
        return registry

    def for_revision(self, model: str, revision: str, protocol: str) -> tuple:
        """(requests, batch, latency) children for one revision and protocol, looked up once (labels() is not
        free)."""
        key = (model, revision, protocol)
        if key not in self._children:
            self._children[key] = (self.requests.labels(*key), self.batch.labels(model, revision),
                                   self.latency.labels(model, revision))
        return self._children[key]
