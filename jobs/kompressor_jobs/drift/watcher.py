"""The watch loop: read captured rows, test them, count drifting windows, hand verdicts to a sink.

Window mode consumes the capture of the watched revision in disjoint windows of ``windowSize`` rows, in
order: each row is tested once, a burst of 2 x windowSize rows is two windows (two verdicts), and a partial
window waits until it fills (or, with ``maxWindowAgeSeconds``, is tested once its oldest row is that old,
marked with its size). Only rows captured since the revision (re)started serving count (the capture's
newest serving stint of the revision: see capture.py); an older stint's rows are never tested.

Where it stands survives restarts: the verdict the sink holds says which rows it tested (``lastSequence``),
how many drifting windows in a row (``consecutive``) and since which stint (``servingSinceSequence``); the
``--state`` folder keeps the same after every verdict written. A restarted watcher goes on from the newer of
the two: no row is tested twice or skipped, and the count is neither reset nor inflated. Online mode feeds
every new row of the stint to an Alibi Detect online detector whose state is saved in ``--state``.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from kompressor.api import defaults as d
from kompressor.api.manifest import CompressedModel, load_manifests
from kompressor.api.status import DriftVerdict, PredictionDrift
from kompressor.console import log
from kompressor.errors import UserError
from kompressor_jobs import capture
from kompressor_jobs.drift.detectors import Check, Detector, OnlineDetector, build_detector

POSITION_FILE = "position.json"
DETECTOR_STATE = "detector"
WINDOW_STATE = "window-r{revision}.json"  # window mode's place, one file per revision


def pick_model(spec_path: str, verdict_target: str) -> CompressedModel:
    models = load_manifests(spec_path)
    if len(models) == 1:
        return models[0]
    name = verdict_target.rstrip("/").rsplit("/", 1)[-1] if verdict_target.startswith("k8s://") else None
    matching = [m for m in models if m.name == name]
    if len(matching) != 1:
        raise UserError(f"{spec_path}: holds {len(models)} CompressedModels; give a file with one")
    return matching[0]


def reference_rows(cm: CompressedModel, uri: str | None) -> tuple[np.ndarray, str]:
    from kompressor_jobs.data import load_dataset

    uri = uri or cm.spec.data.reference or cm.spec.data.eval
    data = load_dataset(uri)
    return data.X.reshape(len(data.X), -1).astype(np.float32), uri


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def next_verdict(check: Check, previous: DriftVerdict | None, revision: int | None, detector: str) -> DriftVerdict:
    """The verdict for ``check`` (online mode and ``--once`` without a window); ``consecutive`` continues the
    previous verdict's count when that one was about the same revision, and restarts at 0 on any check that
    is not Drift."""
    carried = previous.consecutive if previous is not None and previous.revision == revision else 0
    return DriftVerdict(
        is_drift=check.is_drift, outcome=check.outcome, p_value=check.p_value, distance=check.distance,
        threshold=check.threshold, samples=check.samples, consecutive=carried + 1 if check.is_drift else 0,
        checked_at=_now(), revision=revision, detector=detector, feature_p_values=check.feature_p_values,
    )


@dataclass
class Window:
    """Rows to test: their values, and the capture sequences of the first and last of them."""

    values: np.ndarray
    first: int
    last: int
    outputs: np.ndarray | None = None  # the rows' captured first output (prediction drift; None: not captured)


@dataclass
class WindowState:
    """Where window mode stands in the capture of one revision's serving stint."""

    revision: int | None
    stint: int  # capture sequence where the stint starts
    next_row: int  # the first capture sequence not tested yet
    consecutive: int = 0  # drifting windows in a row
    windows: int = 0  # windows tested in this stint
    dropped: int = 0  # rows of this stint the size cap deleted unread
    pending_since: float | None = None  # wall-clock time a partial window was first seen (maxWindowAgeSeconds)


class Watcher:
    def __init__(self, detector: Detector, capture_dir: str | Path, revision: int | None,
                 state_dir: str | Path | None = None, n_features: int | None = None,
                 max_window_age_seconds: float | None = None, signal: str = capture.SIGNAL_INPUTS,
                 transform=None, signal_name: str | None = None, prediction=None):
        self.detector = detector
        self.n_features = n_features
        self.capture_dir = Path(capture_dir)
        self.revision = revision
        self.state_dir = Path(state_dir) if state_dir else None
        self.max_window_age = max_window_age_seconds
        self.signal = signal  # what read_rows reads: inputs, or outputs (outputs and embeddings)
        self.signal_name = signal_name or signal  # what the verdict names
        self.transform = transform  # captured values -> what the detector tests (e.g. outputs -> classes)
        self.prediction = prediction  # prediction.PredictionTest: prediction drift of each window (window mode)
        self.position = capture.Position()
        self.stint = capture.serving_start(self.capture_dir, revision)
        self.window: WindowState | None = None
        self.pending_rows = 0  # rows waiting for their window to fill
        self._mark: tuple | None = None
        if isinstance(detector, OnlineDetector):
            self.position = self._stint_position()
            if self.state_dir:
                self._resume()

    @property
    def online(self) -> bool:
        return isinstance(self.detector, OnlineDetector)

    # -- online mode ---------------------------------------------------------------------------------

    def _stint_position(self) -> capture.Position:
        """Online mode reads from the segment where the stint starts."""
        for seg, first in capture.numbered_segments(capture.list_segments(self.capture_dir)):
            if first >= self.stint and (self.revision is None or seg.revision == self.revision):
                return capture.Position(seg.seq, 0)
        return capture.Position()

    def _resume(self) -> None:
        folder = self.state_dir / DETECTOR_STATE
        saved = _read_json(folder / POSITION_FILE)
        if not saved or saved.get("revision") != self.revision or saved.get("stint", 0) != self.stint:
            return  # nothing saved, or a new revision or serving stint: a new stream
        if self.detector.load_state(folder):
            self.position = capture.Position(int(saved["seq"]), int(saved["records"]))
            log("online detector resumed", t=self.detector.t, seq=self.position.seq, records=self.position.records)

    def check(self) -> Check:
        """Online mode: feed every row captured since the last call."""
        rows, self.position = capture.read_since(self.capture_dir, self.position, self.revision)
        if rows is not None and self.transform is not None:
            rows = self.transform(rows)
        self._check_width(rows)
        found = self.detector.check(rows)
        if self.state_dir:
            self._save_state()
        return found

    def _save_state(self) -> None:
        """Detector state and capture position together, in a new folder swapped in by renames, so a crash
        leaves either the old pair or the new one."""
        target = self.state_dir / DETECTOR_STATE
        fresh, stale = self.state_dir / f".{DETECTOR_STATE}.new", self.state_dir / f".{DETECTOR_STATE}.old"
        for leftover in (fresh, stale):
            shutil.rmtree(leftover, ignore_errors=True)
        fresh.mkdir(parents=True)
        self.detector.save_state(fresh)
        _write_json(fresh / POSITION_FILE, {**asdict(self.position), "revision": self.revision, "stint": self.stint})
        if target.exists():
            os.replace(target, stale)
        os.replace(fresh, target)
        shutil.rmtree(stale, ignore_errors=True)

    # -- both ----------------------------------------------------------------------------------------

    def has_new_rows(self) -> bool:
        """Whether anything was captured since the last call (cheap: newest segment and its size)."""
        segments = capture.list_segments(self.capture_dir)
        try:
            mark = (segments[-1].seq, segments[-1].path.stat().st_size) if segments else None
        except FileNotFoundError:  # dropped by the size cap just now
            mark = None
        changed, self._mark = mark != self._mark, mark
        return changed

    def forget_mark(self) -> None:
        """Make the next has_new_rows() answer True (re-check after a failed write)."""
        self._mark = None

    def _check_width(self, rows: np.ndarray | None) -> None:
        if rows is not None and self.n_features is not None and rows.shape[1] != self.n_features:
            what = "rows" if self.signal == capture.SIGNAL_INPUTS else f"{self.signal_name}"
            raise UserError(f"{self.capture_dir}: captured {what} have {rows.shape[1]} features, the reference "
                            f"data has {self.n_features}; is --reference the data this model is served on?")

    # -- window mode ---------------------------------------------------------------------------------

    def resume(self, previous: DriftVerdict | None) -> WindowState:
        """Window mode's starting point: the stint's first row, or after the last window the sink's verdict
        or the saved state tested in this stint, whichever is newer."""
        state = WindowState(self.revision, self.stint, self.stint)
        if (previous is not None and previous.revision == self.revision and previous.last_sequence is not None
                and (previous.serving_since_sequence or 0) == self.stint and previous.last_sequence >= self.stint):
            state = WindowState(self.revision, self.stint, previous.last_sequence + 1, previous.consecutive,
                                previous.windows or 0, previous.dropped_rows or 0)
        saved = _read_json(self._window_file) if self.state_dir else None
        if saved and saved.get("revision") == self.revision and saved.get("stint") == self.stint:
            try:
                on_disk = WindowState(**saved)
            except TypeError:
                on_disk = None
            if on_disk is not None and on_disk.next_row >= state.next_row:
                state = on_disk
        if state.next_row > self.stint:
            log("drift watcher resumed", revision=self.revision, next_row=state.next_row,
                consecutive=state.consecutive, windows=state.windows)
        self.window = state
        return state

    @property
    def _window_file(self) -> Path:
        return self.state_dir / WINDOW_STATE.format(revision=self.revision)

    def _new_stint(self) -> bool:
        """The revision started serving again (a rollback back to it) while this watcher ran: start over."""
        stint = capture.serving_start(self.capture_dir, self.revision)
        if stint == self.stint:
            return False
        log("serving stint changed: testing only rows served since", revision=self.revision, since=stint)
        self.stint = stint
        self.window = WindowState(self.revision, stint, stint)
        return True

    def windows(self, now: float | None = None) -> list[Window]:
        """The windows ready to test, in order (not yet consumed: ``commit`` each after its verdict is
        written): every full window, then a partial one once it is ``maxWindowAgeSeconds`` old."""
        now = time.time() if now is None else now
        if self.window is None:
            self.resume(None)
        self._new_stint()
        st, size = self.window, self.detector.rows_needed
        got = capture.read_rows(self.capture_dir, self.revision, st.next_row, self.signal)
        if got.dropped:  # deleted by the size cap before they were read: counted, then skipped
            st.dropped += got.dropped
            st.next_row += got.dropped
            log("capture rows dropped before the drift watcher read them", level="warning", rows=got.dropped,
                revision=self.revision)
        self.pending_rows = len(got)
        if not len(got):
            st.pending_since = None
            return []
        values = got.values if self.transform is None else self.transform(got.values)
        self._check_width(values)
        out = [Window(values[k:k + size], int(got.sequences[k]), int(got.sequences[k + size - 1]))
               for k in range(0, len(got) - size + 1, size)]
        rest = len(got) - len(out) * size
        self.pending_rows = rest
        if rest:
            if st.pending_since is None or out:
                st.pending_since = now
            aged = self.max_window_age is not None and now - st.pending_since >= self.max_window_age
            if aged:
                k = len(out) * size
                out.append(Window(values[k:], int(got.sequences[k]), int(got.sequences[-1])))
        else:
            st.pending_since = None
        if self.prediction is not None and out:
            self._attach_outputs(out, got)
        return out

    def _attach_outputs(self, windows: list[Window], got: capture.Rows) -> None:
        """Each window's captured first output, for prediction drift: of the rows just read when the signal is
        the outputs, else read beside the inputs (rows captured without outputs have none)."""
        from kompressor_jobs.drift.prediction import window_outputs

        try:
            outs = got if self.signal != capture.SIGNAL_INPUTS else capture.read_rows(
                self.capture_dir, self.revision, windows[0].first, "outputs")
            first = self.prediction.first_output(outs.values)
            for window in windows:
                window.outputs = window_outputs(first, outs.sequences, window.first, window.last, len(window.values))
        except Exception as err:  # noqa: BLE001 - informational: those windows' prediction drift is Inconclusive
            log("could not read the captured outputs for prediction drift", level="warning", error=repr(err))

    def partial_due(self, now: float | None = None) -> bool:
        """A partial window has waited ``maxWindowAgeSeconds``."""
        st = self.window
        if st is None or st.pending_since is None or self.max_window_age is None:
            return False
        return (time.time() if now is None else now) - st.pending_since >= self.max_window_age

    def verdict(self, window: Window) -> DriftVerdict:
        """The verdict on one window, counting on from the windows before it (not yet committed)."""
        st = self.window
        check = self.detector.test(window.values)
        if check.is_drift:
            consecutive = st.consecutive + 1
        elif check.outcome == "Inconclusive":
            consecutive = st.consecutive  # too few rows to say: no evidence either way
        else:
            consecutive = 0
        return DriftVerdict(
            is_drift=check.is_drift, outcome=check.outcome, p_value=check.p_value, distance=check.distance,
            threshold=check.threshold, samples=check.samples, consecutive=consecutive, checked_at=_now(),
            revision=self.revision, detector=self.detector.name, feature_p_values=check.feature_p_values,
            signal=self.signal_name, first_sequence=window.first, last_sequence=window.last,
            windows=st.windows + 1, serving_since_sequence=self.stint, dropped_rows=st.dropped,
            prediction=self._prediction(window))

    def _prediction(self, window: Window):
        """Prediction drift of ``window`` (None when off). Informational: a failure is logged, never raised."""
        if self.prediction is None:
            return None
        try:
            return self.prediction.test(window.outputs)
        except Exception as err:  # noqa: BLE001 - the input test's verdict must still be written
            log("prediction drift check failed", level="warning", error=repr(err), first_sequence=window.first)
            return PredictionDrift(outcome="Inconclusive", samples=0)

    def commit(self, window: Window, verdict: DriftVerdict) -> None:
        """The verdict on ``window`` was written: move past it and save where the watcher stands."""
        st = self.window
        st.next_row = window.last + 1
        st.consecutive, st.windows = verdict.consecutive, verdict.windows
        if window.values is not None and len(window.values) < self.detector.rows_needed:
            st.pending_since = None
        if self.state_dir:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            _write_json(self._window_file, asdict(st))

    def has_verdict(self, previous: DriftVerdict | None) -> bool:
        """Whether ``previous`` is a verdict on a window of this revision's current stint."""
        return (previous is not None and previous.revision == self.revision and previous.first_sequence is not None
                and (previous.serving_since_sequence or 0) == self.stint)

    def waiting(self) -> DriftVerdict:
        """``--once`` without a full window: Inconclusive, ``samples`` the rows waiting for the window to fill
        (not consumed), the count kept, ``lastSequence`` still the last row tested (where to go on from)."""
        st = self.window
        return DriftVerdict(is_drift=False, outcome="Inconclusive", samples=self.pending_rows,
                            consecutive=st.consecutive, checked_at=_now(), revision=self.revision,
                            detector=self.detector.name, signal=self.signal_name,
                            last_sequence=st.next_row - 1 if st.next_row > self.stint else None,
                            windows=st.windows, serving_since_sequence=self.stint, dropped_rows=st.dropped)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return None


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def run(args) -> int:
    from kompressor_jobs.drift.metrics import DriftMetrics
    from kompressor_jobs.drift.sinks import open_sink
    from kompressor_jobs.drift.signals import prepare_signal

    cm = pick_model(args.spec, args.verdict)
    spec = cm.spec.drift
    sink = open_sink(args.verdict)
    signal = prepare_signal(cm, args)
    log("building drift detector", detector=spec.detector, mode=spec.mode, reference=signal.reference_uri,
        signal=signal.name, rows=len(signal.x_ref), features=signal.x_ref.shape[1])
    detector = build_detector(signal.drift_spec, signal.x_ref)
    watcher = Watcher(detector, args.capture, args.revision, args.state, n_features=signal.x_ref.shape[1],
                      max_window_age_seconds=spec.max_window_age_seconds, signal=signal.capture_signal,
                      transform=signal.transform, signal_name=signal.name)
    metrics = DriftMetrics(cm.name, args.metrics_port) if args.metrics_port else None
    if not watcher.online:  # after the metrics server is up: running the model on the reference takes a while
        watcher.prediction = _prediction_test(cm, args)
    previous = sink.read()
    if not watcher.online:
        watcher.resume(previous)
    perf = _performance_watch(cm, args, previous)
    if previous is not None and previous.reason == d.PERFORMANCE_DRIFT_REASON:
        previous = None  # the data checks' count is not the performance checks'
    while True:
        if watcher.online:
            if args.once or watcher.has_new_rows():
                verdict = next_verdict(watcher.check(), previous, args.revision, detector.name)
                verdict.signal, verdict.reason = signal.name, d.DATA_DRIFT_REASON
                if _write(sink, verdict, args.once, watcher, perf):
                    previous = verdict
                    _observe(metrics, verdict, args.revision, sink)
        elif args.once or watcher.has_new_rows() or watcher.partial_due():
            windows = watcher.windows()
            if args.once and not windows and not watcher.has_verdict(previous):
                verdict = watcher.waiting()  # nothing to say yet; a verdict already written is left as it is
                verdict.reason = d.DATA_DRIFT_REASON
                if _write(sink, verdict, True, watcher, perf):
                    _observe(metrics, verdict, args.revision, sink)
            for window in windows:
                verdict = watcher.verdict(window)
                verdict.reason = d.DATA_DRIFT_REASON
                if not _write(sink, verdict, args.once, watcher, perf):
                    break  # not committed: the same window is tested again next time
                watcher.commit(window, verdict)
                previous = verdict
                _observe(metrics, verdict, args.revision, sink)
        while perf is not None and (verdict := perf.check()) is not None:  # every window completed since
            data = previous.consecutive if previous is not None else 0  # the data checks' count
            if not _write(sink, verdict, args.once, watcher, shadowed_by=data):
                break  # not committed: the same window is judged again next time
            perf.commit(verdict)
            _observe(None, verdict, args.revision, sink)  # logged; the watcher's gauges are the data checks'
        if args.once:
            return 0
        time.sleep(spec.check_interval_seconds)


def _prediction_test(cm: CompressedModel, args):
    """prediction.PredictionTest for window mode with --artifact on a classifier, else None. Prediction drift is
    informational: when its reference cannot be computed the watcher goes on without it."""
    from kompressor_jobs.drift.prediction import reference_test

    try:
        return reference_test(cm, args)
    except Exception as err:  # noqa: BLE001 - the input test goes on without it
        log("prediction drift off: could not compute the reference predictions", level="warning", error=str(err))
        return None


def _performance_watch(cm: CompressedModel, args, previous: DriftVerdict | None):
    """spec.drift.performance's checks of the serving process' online accuracy (None when unset)."""
    url = getattr(args, "serving_metrics_url", None)
    if cm.spec.drift.performance is None:
        return None
    if not url:
        raise UserError("spec.drift.performance is set: give --serving-metrics-url (the serving process' /metrics)")
    from kompressor_jobs.drift.performance import PerformanceWatch

    return PerformanceWatch(cm.spec.drift.performance, url, cm.name, args.revision, args.state, previous)


def _write(sink, verdict: DriftVerdict, once: bool, watcher: Watcher, perf=None, shadowed_by: int = 0) -> bool:
    """Write ``verdict`` to the sink. Data and performance verdicts share the one slot (status.drift): a verdict
    whose stream has fewer drifting windows in a row than the other stream's latest is not written (it would hide
    the other's count from the hysteresis); its evidence is spent all the same (True)."""
    other = perf.consecutive if perf is not None else shadowed_by
    if other > verdict.consecutive:
        log("drift verdict not published: the other check has more drifting windows in a row", level="debug",
            reason=verdict.reason, consecutive=verdict.consecutive, other=other)
        return True
    try:
        sink.write(verdict)
        return True
    except Exception as err:  # e.g. the API server briefly unreachable: keep watching, retry next time
        if once:
            raise
        log("could not write the drift verdict", level="warning", sink=str(sink), error=str(err))
        watcher.forget_mark()  # check again next time; the count goes on from the last verdict written
        return False


def _observe(metrics, verdict: DriftVerdict, revision: int | None, sink) -> None:
    if metrics:
        metrics.observe(verdict)
    log("drift check", outcome=verdict.outcome, p_value=verdict.p_value, distance=verdict.distance,
        samples=verdict.samples, consecutive=verdict.consecutive, revision=revision, signal=verdict.signal,
        first_sequence=verdict.first_sequence, last_sequence=verdict.last_sequence, windows=verdict.windows,
        dropped_rows=verdict.dropped_rows, reason=verdict.reason, accuracy=verdict.accuracy, labels=verdict.labels,
        sink=str(sink))
    pred = verdict.prediction
    if pred is not None:
        log("prediction drift check", outcome=pred.outcome, class_p_value=pred.class_p_value,
            score_p_value=pred.score_p_value, samples=pred.samples, revision=revision,
            first_sequence=verdict.first_sequence, last_sequence=verdict.last_sequence)
