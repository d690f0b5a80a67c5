"""Window mode consumes the capture in disjoint windows of fresh traffic (issue 15): whether a drift is
confirmed depends on how much traffic drifted, not on how it was spread over time. Bursts, trickles, restarts,
rollbacks, partial windows, rows the size cap dropped, and the false-confirmation rate on clean data."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys

import numpy as np
import pytest

from drift_support import tabular_rows, write_spec
from kompressor.cli import main as kompressor
from kompressor_jobs import capture
from kompressor_jobs.capture import CaptureWriter
from serving_support import Server, http, infer_body, make_artifact, metric_value

pytestmark = pytest.mark.slow

WINDOW = 100
P = 0.05


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    folder = tmp_path_factory.mktemp("reference")
    path = folder / "reference.npz"
    rows = tabular_rows(np.random.default_rng(100), 2000)
    np.savez(path, X=rows, y=np.zeros(len(rows), np.int64))
    return f"file://{path}"


class Watch:
    """`kompressor watch-drift --once` runs on one capture folder, sink and state folder."""

    def __init__(self, folder, reference, revision=1, state=True, **drift):
        drift = {"detector": "ks", "windowSize": WINDOW, "consecutiveWindows": 2, **drift}
        self.spec = write_spec(folder, reference, **drift)
        self.capture, self.sink, self.state = folder / "capture", folder / "verdict.json", folder / "state"
        self.revision, self.use_state = revision, state
        self.writer = CaptureWriter(self.capture, 1 << 26)
        self.writer.start_serving(revision)

    def send(self, rows, revision=None):
        self.writer.submit(rows, self.revision if revision is None else revision)
        self.writer.flush()

    def once(self, revision=None) -> dict:
        argv = ["--json-logs", "watch-drift", "--spec", str(self.spec), "--capture", str(self.capture),
                "--verdict", str(self.sink), "--revision", str(self.revision if revision is None else revision),
                "--once"]
        assert kompressor(argv + (["--state", str(self.state)] if self.use_state else [])) == 0
        return json.loads(self.sink.read_text())

    def history(self) -> list[dict]:
        return [json.loads(line) for line in self.sink.with_name("verdict.history.jsonl").read_text().splitlines()]

    def close(self):
        self.writer.close()


@pytest.fixture
def watch(tmp_path, reference):
    made = []

    def make(**kw):
        w = Watch(tmp_path / f"w{len(made)}", reference, **kw)
        made.append(w)
        return w

    yield make
    for w in made:
        w.close()


def test_a_burst_of_two_windows_of_drifted_rows_confirms_drift(watch):
    w = watch()
    rng = np.random.default_rng(1)
    w.send(tabular_rows(rng, 2 * WINDOW, shifted=True))  # one burst between two checks
    verdict = w.once()
    assert (verdict["outcome"], verdict["consecutive"], verdict["windows"]) == ("Drift", 2, 2)
    # what was tested: the second window, rows WINDOW..2*WINDOW-1 of the capture, made of two windows
    assert (verdict["firstSequence"], verdict["lastSequence"], verdict["samples"]) == (WINDOW, 2 * WINDOW - 1, WINDOW)
    assert verdict["servingSinceSequence"] == 0 and verdict["droppedRows"] == 0
    assert [(v["firstSequence"], v["lastSequence"], v["consecutive"]) for v in w.history()] == [
        (0, WINDOW - 1, 1), (WINDOW, 2 * WINDOW - 1, 2)]
    # nothing new: nothing is tested again, the count does not climb
    again = w.once()
    assert again == verdict and len(w.history()) == 2


def test_a_trickle_confirms_after_exactly_two_windows_of_drifted_rows(watch):
    w = watch()
    rng = np.random.default_rng(2)
    step, sent, counts = WINDOW // 4, 0, []
    while sent < 2 * WINDOW:
        w.send(tabular_rows(rng, step, shifted=True))
        sent += step
        verdict = w.once()
        counts.append((sent, verdict["consecutive"], verdict.get("windows")))
    # a check every 25 rows: no verdict counts before a window is full, each window counts once
    assert [c for _, c, _ in counts] == [0, 0, 0, 1, 1, 1, 1, 2]
    assert counts[-1] == (2 * WINDOW, 2, 2)
    assert [(v["firstSequence"], v["lastSequence"]) for v in w.history() if v.get("firstSequence") is not None] == [
        (0, WINDOW - 1), (WINDOW, 2 * WINDOW - 1)]
    early = w.history()[0]
    assert early["outcome"] == "Inconclusive" and early["samples"] == step  # rows waiting for the window to fill


def test_a_restart_between_windows_keeps_the_count_without_re_testing(watch):
    w = watch()
    rng = np.random.default_rng(3)
    w.send(tabular_rows(rng, WINDOW + 30, shifted=True))
    first = w.once()
    assert (first["consecutive"], first["windows"], first["lastSequence"]) == (1, 1, WINDOW - 1)
    # Each --once is a new watcher: restarts with no new traffic re-test nothing and keep the count.
    for _ in range(2):
        assert w.once() == first
    w.send(tabular_rows(rng, WINDOW - 30, shifted=True))
    second = w.once()
    assert (second["consecutive"], second["windows"]) == (2, 2)
    assert (second["firstSequence"], second["lastSequence"]) == (WINDOW, 2 * WINDOW - 1)  # none skipped

    # The state folder alone (the sink emptied) and the sink alone (the state lost) each resume exactly.
    saved_sink = w.sink.read_text()
    w.sink.unlink()
    w.send(tabular_rows(rng, WINDOW, shifted=True))
    third = w.once()
    assert (third["consecutive"], third["windows"], third["firstSequence"]) == (3, 3, 2 * WINDOW)
    shutil.rmtree(w.state)
    w.send(tabular_rows(rng, WINDOW, shifted=True))
    fourth = w.once()
    assert (fourth["consecutive"], fourth["windows"], fourth["firstSequence"]) == (4, 4, 3 * WINDOW)
    assert json.loads(saved_sink)["lastSequence"] == 2 * WINDOW - 1


def test_a_crash_between_the_verdict_and_the_saved_state_does_not_inflate_the_count(watch):
    """The verdict is written first, the state after it: a watcher killed in between finds the newer place in
    the verdict and does not test that window again."""
    w = watch()
    rng = np.random.default_rng(4)
    w.send(tabular_rows(rng, WINDOW, shifted=True))
    w.once()
    before = {p.name: p.read_bytes() for p in w.state.iterdir()}
    w.send(tabular_rows(rng, WINDOW, shifted=True))
    assert w.once()["consecutive"] == 2
    for name, data in before.items():  # the state as it was before the second window's verdict
        (w.state / name).write_bytes(data)
    w.send(tabular_rows(rng, WINDOW // 2, shifted=True))
    verdict = w.once()
    assert (verdict["consecutive"], verdict["windows"], verdict["lastSequence"]) == (2, 2, 2 * WINDOW - 1)


def test_a_revision_switch_in_one_sink_keeps_each_revision_s_place(watch):
    w = watch()
    rng = np.random.default_rng(5)
    w.send(tabular_rows(rng, 2 * WINDOW, shifted=True))
    assert w.once()["consecutive"] == 2
    w.writer.start_serving(2)
    w.send(tabular_rows(rng, 2 * WINDOW), revision=2)
    calm = w.once(revision=2)
    assert (calm["outcome"], calm["consecutive"], calm["revision"], calm["windows"]) == ("NoDrift", 0, 2, 2)
    assert calm["servingSinceSequence"] == 2 * WINDOW
    # revision 1 again, without a new serving stint (the sink holds revision 2's verdict meanwhile): its rows
    # were tested already (its place is in the state folder), so nothing is tested again and its count is kept
    windows_before = sum(v.get("firstSequence") is not None for v in w.history())
    back = w.once(revision=1)
    assert (back["revision"], back["outcome"], back["consecutive"], back["windows"]) == (1, "Inconclusive", 2, 2)
    assert back["lastSequence"] == 2 * WINDOW - 1 and back["samples"] == 0
    assert sum(v.get("firstSequence") is not None for v in w.history()) == windows_before


def test_after_a_rollback_the_first_window_holds_only_rows_served_after_it(tmp_path, reference):
    """A real `kompressor serve`: revision 1 serves shifted traffic, revision 2 is promoted, then revision 1
    comes back (a rollback). Its first window is the clean traffic sent after the rollback, never the old
    shifted rows (some of which were never tested)."""
    artifacts = {r: make_artifact(tmp_path / f"r{r}", seed=r, revision=r) for r in (1, 2)}
    folder = tmp_path / "capture"
    server = Server(artifacts[1], "tab", capture=folder, log=tmp_path / "server.log")
    rng = np.random.default_rng(6)
    clean = tabular_rows(rng, WINDOW)
    try:
        def send(rows):
            for batch in np.array_split(rows, 4):
                status, out = http("POST", server.infer_url(), infer_body(batch))
                assert status == 200, out

        def swap(revision):
            status, out = http("POST", f"{server.url}/v2/repository/models/tab/load",
                               {"parameters": {"artifact": str(artifacts[revision])}})
            assert status == 200, out

        send(tabular_rows(rng, WINDOW // 2, shifted=True))  # served by r1 before the promotion, never tested
        swap(2)
        swap(1)  # rolled back before r2 got any traffic: only the capture's stint marks tell the two apart
        send(clean)
        served = 3 * WINDOW // 2

        def settled():
            return metric_value(server.metrics(), "kompressor_capture_rows_total", model="tab") == served
        _wait(settled)
    finally:
        server.stop()
    spec = write_spec(tmp_path, reference, detector="ks", windowSize=WINDOW)
    sink = tmp_path / "verdict.json"
    assert kompressor(["--json-logs", "watch-drift", "--spec", str(spec), "--capture", str(folder), "--verdict",
                       str(sink), "--revision", "1", "--once", "--state", str(tmp_path / "state")]) == 0
    verdict = json.loads(sink.read_text())
    since = capture.serving_start(folder, 1)
    assert since == WINDOW // 2  # the rollback's stint starts after the old rows
    assert (verdict["servingSinceSequence"], verdict["firstSequence"], verdict["lastSequence"]) == (
        since, since, since + WINDOW - 1)
    tested = capture.read_rows(folder, 1, verdict["firstSequence"])
    np.testing.assert_array_equal(tested.values, clean)  # exactly the rows served after the rollback
    assert verdict["outcome"] == "NoDrift" and verdict["consecutive"] == 0


def test_a_partial_window_is_tested_once_it_is_max_window_age_old(tmp_path, reference):
    """maxWindowAgeSeconds: rows that would wait for their window to fill are tested once their oldest row is
    that old, marked with their size; below the detector's minimum the verdict is Inconclusive."""
    from kompressor.api.manifest import load_manifests
    from kompressor_jobs.drift.detectors import MIN_WINDOW_ROWS, build_detector
    from kompressor_jobs.drift.watcher import Watcher

    spec_path = write_spec(tmp_path, reference, detector="ks", windowSize=WINDOW, maxWindowAgeSeconds=60)
    [cm] = load_manifests(str(spec_path))
    ref = tabular_rows(np.random.default_rng(100), 2000)
    writer = CaptureWriter(tmp_path / "capture", 1 << 24)
    writer.start_serving(1)
    rng = np.random.default_rng(7)
    writer.submit(tabular_rows(rng, WINDOW // 2, shifted=True), 1)
    writer.flush()
    watcher = Watcher(build_detector(cm.spec.drift, ref), tmp_path / "capture", 1, tmp_path / "state",
                      max_window_age_seconds=60)
    watcher.resume(None)
    assert watcher.windows(now=1000.0) == [] and not watcher.partial_due(now=1059.0)
    assert watcher.partial_due(now=1060.0)
    [window] = watcher.windows(now=1060.0)
    verdict = watcher.verdict(window)
    assert (verdict.samples, verdict.first_sequence, verdict.last_sequence) == (WINDOW // 2, 0, WINDOW // 2 - 1)
    assert verdict.outcome == "Drift" and verdict.consecutive == 1
    watcher.commit(window, verdict)
    assert watcher.windows(now=2000.0) == []  # tested once
    writer.submit(tabular_rows(rng, MIN_WINDOW_ROWS - 1, shifted=True), 1)
    writer.flush()
    watcher.windows(now=3000.0)
    [small] = watcher.windows(now=3060.0)
    tiny = watcher.verdict(small)
    assert (tiny.outcome, tiny.samples, tiny.consecutive) == ("Inconclusive", MIN_WINDOW_ROWS - 1, 1)  # count kept
    writer.close()


def test_rows_the_size_cap_dropped_before_they_were_read_are_counted(tmp_path, reference):
    dropped = []
    folder = tmp_path / "capture"
    writer = CaptureWriter(folder, 64 << 10, on_drop=lambda rows, reason: dropped.append((rows, reason)))
    writer.start_serving(1)
    rng = np.random.default_rng(8)
    for _ in range(40):  # ~128 KiB of rows into a 64 KiB cap, with no watcher reading
        writer.submit(tabular_rows(rng, 100), 1)
        writer.flush()
    writer.close()
    lost = sum(rows for rows, reason in dropped if reason == "size_cap")
    assert lost > 0
    spec = write_spec(tmp_path, reference, detector="ks", windowSize=WINDOW)
    assert kompressor(["--json-logs", "watch-drift", "--spec", str(spec), "--capture", str(folder), "--verdict",
                       str(tmp_path / "v.json"), "--revision", "1", "--once"]) == 0
    verdict = json.loads((tmp_path / "v.json").read_text())
    first = json.loads((tmp_path / "v.history.jsonl").read_text().splitlines()[0])
    assert first["droppedRows"] == verdict["droppedRows"] == lost  # counted once, in every verdict after
    assert first["firstSequence"] == lost  # the oldest row left
    assert verdict["windows"] == (4000 - lost) // WINDOW and verdict["lastSequence"] == 4000 - 1


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval of a binomial rate k/n."""
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def test_false_confirmations_on_clean_data_are_at_most_p_squared(tmp_path, reference):
    """Clean traffic from the reference's distribution, 6,000 disjoint windows, consecutiveWindows 2: a
    confirmation needs two false alarms in a row on independent traffic, so at most p^2 per window
    (the detector's false-alarm rate is at most p). Re-tested, overlapping windows would confirm at about p."""
    windows, window = 6000, 50
    folder = tmp_path / "capture"
    writer = CaptureWriter(folder, 1 << 28)
    writer.start_serving(1)
    rng = np.random.default_rng(9)
    for _ in range(windows * window // 5000):
        writer.submit(tabular_rows(rng, 5000), 1)
    writer.close()
    spec = write_spec(tmp_path, reference, detector="ks", windowSize=window, consecutiveWindows=2)
    proc = subprocess.run([sys.executable, "-m", "kompressor.cli", "--json-logs", "watch-drift", "--spec", str(spec),
                           "--capture", str(folder), "--verdict", str(tmp_path / "v.json"), "--revision", "1",
                           "--once"], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    verdicts = [json.loads(line) for line in (tmp_path / "v.history.jsonl").read_text().splitlines()]
    assert len(verdicts) == windows
    assert [v["firstSequence"] for v in verdicts] == list(range(0, windows * window, window))  # disjoint, in order
    alarms = sum(v["isDrift"] for v in verdicts)
    confirmations = sum(v["consecutive"] == 2 for v in verdicts)  # the window that confirms a drift
    alarm_rate, rate = alarms / windows, confirmations / windows
    low, high = wilson(confirmations, windows)
    print(f"false alarms {alarm_rate:.4f}; false confirmations {rate:.5f} (95 % interval {low:.5f}-{high:.5f}) "
          f"vs p^2 = {P * P}")
    assert 0.005 < alarm_rate <= P  # the detector does fire on clean data (the test is not vacuous) ...
    assert rate <= P * P, (rate, low, high)  # ... but two in a row only at about its square
    assert high - low < P * P  # enough windows that the interval is narrower than the target itself


def _wait(predicate, timeout: float = 30.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)
