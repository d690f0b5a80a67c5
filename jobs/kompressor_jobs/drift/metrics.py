"""The drift watcher's Prometheus gauges (served with --metrics-port)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, start_http_server

from kompressor.api.status import DriftVerdict


class DriftMetrics:
    def __init__(self, model: str, port: int):
        self.model = model
        self.p_value = Gauge("kompressor_drift_p_value", "p-value of the latest drift check.", ["model"])
        self.distance = Gauge("kompressor_drift_distance", "Test statistic of the latest drift check.", ["model"])
        self.is_drift = Gauge("kompressor_drift_is_drift", "1 when the latest check found drift.", ["model"])
        self.consecutive = Gauge("kompressor_drift_consecutive", "Drifting windows in a row.", ["model"])
        self.windows = Gauge("kompressor_drift_windows", "Windows tested since the revision (re)started serving.",
                             ["model"])
        self.last_sequence = Gauge("kompressor_drift_last_sequence", "Capture sequence of the last row tested.",
                                   ["model"])
        self.dropped = Gauge("kompressor_drift_dropped_rows", "Rows the capture's size cap deleted before the "
                             "watcher read them, since the revision (re)started serving.", ["model"])
        self.checks = Counter("kompressor_drift_checks", "Drift checks, by outcome.", ["model", "outcome"])
        start_http_server(port)

    def observe(self, verdict: DriftVerdict) -> None:
        m = self.model
        if verdict.p_value is not None:
            self.p_value.labels(m).set(verdict.p_value)
        if verdict.distance is not None:
            self.distance.labels(m).set(verdict.distance)
        self.is_drift.labels(m).set(1 if verdict.is_drift else 0)
        self.consecutive.labels(m).set(verdict.consecutive)
        if verdict.windows is not None:
            self.windows.labels(m).set(verdict.windows)
        if verdict.last_sequence is not None:
            self.last_sequence.labels(m).set(verdict.last_sequence)
        if verdict.dropped_rows is not None:
            self.dropped.labels(m).set(verdict.dropped_rows)
        self.checks.labels(m, verdict.outcome).inc()
