"""`kompressor watch-drift` on traffic captured by a real `kompressor serve`: verdicts per detector with and
without a shift, consecutive counting of disjoint windows, Inconclusive, online state resume, and both verdict
sinks. test_drift_windows.py has the window-mode rules (bursts, trickles, restarts, rollbacks)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from drift_support import ROWS_PER_REVISION, tabular_rows, write_spec
from kompressor.cli import main as kompressor
from kompressor_jobs.capture import CaptureWriter
from serving_support import free_port, http, metric_value

pytestmark = pytest.mark.slow


def watch(spec, capture, verdict, revision, *extra) -> dict:
    """One `kompressor watch-drift --once`, in this process (the CLI's own entry point)."""
    code = kompressor(["--json-logs", "watch-drift", "--spec", str(spec), "--capture", str(capture),
                       "--verdict", str(verdict), "--revision", str(revision), "--once", *map(str, extra)])
    assert code == 0
    return json.loads(verdict.read_text())


def watch_process(spec, capture, verdict, revision, *extra, env=None) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "kompressor.cli", "--json-logs", "watch-drift", "--spec", str(spec), "--capture",
            str(capture), "--verdict", str(verdict), "--revision", str(revision), *map(str, extra)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


@pytest.mark.parametrize("detector", ["ks", "cvm", "chisquare", "tabular", "mmd", "lsdd"])
def test_each_detector_flags_the_shift_and_not_the_unshifted_traffic(traffic, tmp_path, detector):
    spec = write_spec(tmp_path, traffic["reference"], detector=detector, windowSize=ROWS_PER_REVISION)
    calm = watch(spec, traffic["capture"], tmp_path / "calm.json", 1)
    shifted = watch(spec, traffic["capture"], tmp_path / "shifted.json", 2)
    for verdict, revision, drift in ((calm, 1, False), (shifted, 2, True)):
        assert verdict["isDrift"] is drift and verdict["outcome"] == ("Drift" if drift else "NoDrift"), verdict
        assert verdict["revision"] == revision and verdict["detector"] == detector
        assert verdict["samples"] == ROWS_PER_REVISION and verdict["threshold"] == 0.05
        assert (verdict["pValue"] < verdict["threshold"]) is drift
        assert verdict["consecutive"] == (1 if drift else 0)
        assert verdict["checkedAt"].endswith("Z")
        if detector in ("mmd", "lsdd"):
            assert "featurePValues" not in verdict and verdict["distance"] is not None
        else:  # the reported p-value is the Bonferroni-corrected smallest feature p-value
            p = np.asarray(verdict["featurePValues"])
            assert verdict["pValue"] == pytest.approx(min(1.0, p.min() * len(p)))
    if detector == "chisquare":  # only the declared categorical features are tested
        assert len(shifted["featurePValues"]) == 2


def test_fdr_correction_reports_the_benjamini_hochberg_adjusted_p_value(traffic, tmp_path):
    spec = write_spec(tmp_path, traffic["reference"], detector="ks", correction="fdr", windowSize=ROWS_PER_REVISION)
    verdict = watch(spec, traffic["capture"], tmp_path / "v.json", 2)
    p = np.sort(np.asarray(verdict["featurePValues"]))
    assert verdict["pValue"] == pytest.approx(min(1.0, (p * len(p) / np.arange(1, len(p) + 1)).min()))
    assert verdict["isDrift"] is True


def test_consecutive_counts_disjoint_drifting_windows_of_one_revision_in_the_file_sink(traffic, tmp_path):
    spec = write_spec(tmp_path, traffic["reference"], detector="ks", windowSize=100)
    sink, state = tmp_path / "out" / "verdict.json", tmp_path / "state"
    # the real command, as a process: revision 2's 200 shifted rows are two windows, two drifting verdicts
    result = watch_process(spec, traffic["capture"], sink, 2, "--once", "--state", state)
    assert result.returncode == 0, result.stderr
    shifted = json.loads(sink.read_text())
    assert (shifted["consecutive"], shifted["windows"], shifted["samples"]) == (2, 2, 100)
    assert (shifted["firstSequence"], shifted["lastSequence"]) == (ROWS_PER_REVISION + 100, 2 * ROWS_PER_REVISION - 1)
    assert not list(sink.parent.glob(".*.tmp"))  # replaced atomically, nothing half-written left
    # the same rows are never tested again: more checks do not raise the count
    assert watch(spec, traffic["capture"], sink, 2, "--state", state) == shifted
    calm = watch(spec, traffic["capture"], sink, 1, "--state", state)
    assert calm["outcome"] == "NoDrift" and calm["consecutive"] == 0 and calm["windows"] == 2
    assert (calm["firstSequence"], calm["lastSequence"]) == (100, ROWS_PER_REVISION - 1)


def test_too_few_rows_is_inconclusive(traffic, tmp_path):
    spec = write_spec(tmp_path, traffic["reference"], detector="ks", windowSize=ROWS_PER_REVISION + 50)
    verdict = watch(spec, traffic["capture"], tmp_path / "v.json", 2)
    assert verdict["outcome"] == "Inconclusive" and verdict["isDrift"] is False
    assert verdict["samples"] == ROWS_PER_REVISION and verdict["consecutive"] == 0
    nothing = watch(spec, traffic["capture"], tmp_path / "none.json", 7)  # a revision that got no traffic
    assert nothing["outcome"] == "Inconclusive" and nothing["samples"] == 0


def test_captured_rows_must_match_the_reference_width(traffic, tmp_path, capsys):
    other = tmp_path / "wide.npz"
    np.savez(other, X=np.zeros((50, 12), np.float32), y=np.zeros(50, np.int64))
    spec = write_spec(tmp_path, f"file://{other}", detector="ks", windowSize=50, categoricalFeatures=[])
    code = kompressor(["--json-logs", "watch-drift", "--spec", str(spec), "--capture", str(traffic["capture"]),
                       "--verdict", str(tmp_path / "v.json"), "--revision", "1", "--once"])
    err = capsys.readouterr().err
    assert code == 2 and "12" in err and "8 features" in err
    assert not (tmp_path / "v.json").exists()


@pytest.mark.parametrize("detector", ["lsdd", "cvm"])
def test_online_detector_resumes_from_its_saved_state(traffic, tmp_path, detector):
    rng = np.random.default_rng(5)
    reference = tmp_path / "reference.npz"  # small: online detectors calibrate by simulation on every start
    np.savez(reference, X=tabular_rows(rng, 100), y=np.zeros(100, np.int64))
    spec = write_spec(tmp_path, f"file://{reference}", detector=detector, mode="online", windowSize=20, ert=200)
    capture, state, sink = tmp_path / "capture", tmp_path / "state", tmp_path / "v.json"
    writer = CaptureWriter(capture, 1 << 20)
    writer.submit(tabular_rows(rng, 15), revision=1)
    writer.flush()
    first = watch(spec, capture, sink, 1, "--state", state)
    assert first["outcome"] == "Inconclusive" and first["samples"] == 15  # fewer rows than one window
    writer.submit(tabular_rows(rng, 15), revision=1)
    writer.flush()
    second = watch(spec, capture, sink, 1, "--state", state)
    # resumed: 30 rows seen in all (not 15 again, and the first 15 were not fed twice)
    assert second["samples"] == 30 and second["outcome"] == "NoDrift", second
    writer.submit(tabular_rows(rng, 40, shifted=True), revision=1)
    writer.flush()
    third = watch(spec, capture, sink, 1, "--state", state)
    assert third["samples"] == 70 and third["outcome"] == "Drift" and third["consecutive"] == 1
    assert third["distance"] > third["threshold"] and "pValue" not in third
    # one uninterrupted run over the same 70 rows ends in exactly the same state
    fresh = watch(spec, capture, tmp_path / "fresh.json", 1, "--state", tmp_path / "fresh-state")
    assert fresh["samples"] == 70 and fresh["distance"] == pytest.approx(third["distance"], rel=1e-5)
    writer.close()


def test_watch_loop_serves_metrics_and_checks_only_new_traffic(traffic, tmp_path):
    spec = write_spec(tmp_path, traffic["reference"], detector="ks", windowSize=100, checkIntervalSeconds=1)
    capture = tmp_path / "capture"
    writer = CaptureWriter(capture, 1 << 20)
    rng = np.random.default_rng(9)
    writer.submit(tabular_rows(rng, 120, shifted=True), revision=3)
    writer.flush()
    port = free_port()
    argv = [sys.executable, "-m", "kompressor.cli", "--json-logs", "watch-drift", "--spec", str(spec), "--capture",
            str(capture), "--verdict", str(tmp_path / "v.json"), "--revision", "3", "--metrics-port", str(port)]
    log = open(tmp_path / "watcher.log", "wb")
    process = subprocess.Popen(argv, stdout=log, stderr=log, env={**os.environ, "OMP_NUM_THREADS": "1"})

    def gauge(name):
        try:
            status, text = http("GET", f"http://127.0.0.1:{port}/metrics", timeout=2)
        except OSError:
            return None
        value = metric_value(text, name, model="tab") if status == 200 and name in text else None
        return value

    def wait(predicate, timeout=120):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert process.poll() is None, (tmp_path / "watcher.log").read_text()
            if predicate():
                return
            time.sleep(0.1)
        raise AssertionError((tmp_path / "watcher.log").read_text())

    try:
        wait(lambda: gauge("kompressor_drift_is_drift") == 1)
        assert gauge("kompressor_drift_consecutive") == 1 and gauge("kompressor_drift_windows") == 1
        assert 0 < gauge("kompressor_drift_p_value") < 0.05
        assert gauge("kompressor_drift_last_sequence") == 99 and gauge("kompressor_drift_dropped_rows") == 0
        # 20 rows wait for their window; 10 more fill none: the count does not climb on the same rows
        writer.submit(tabular_rows(rng, 10, shifted=True), revision=3)
        writer.flush()
        writer.submit(tabular_rows(rng, 70, shifted=True), revision=3)  # 100 fresh rows: the second window
        writer.flush()
        wait(lambda: gauge("kompressor_drift_consecutive") == 2)
        verdict = json.loads((tmp_path / "v.json").read_text())
        assert (verdict["consecutive"], verdict["firstSequence"], verdict["lastSequence"]) == (2, 100, 199)
        assert (tmp_path / "watcher.log").read_bytes().count(b'"drift check"') == 2
    finally:
        process.terminate()
        process.wait(timeout=20)
        log.close()
        writer.close()


async def test_verdict_lands_in_the_custom_resource_status(traffic, tmp_path, monkeypatch):
    import asyncio

    from support.emulator import Emulator, write_kubeconfig

    spec = write_spec(tmp_path, traffic["reference"], detector="ks", windowSize=100)
    async with Emulator() as api:
        url = str(api.url).rstrip("/")
        kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", url)
        body = {"apiVersion": "kompressor.io/v1alpha1", "kind": "CompressedModel",
                "metadata": {"name": "tab", "namespace": "default"},
                "spec": {"model": {"uri": "builtin://wine-mlp"}}, "status": {"phase": "Serving"}}
        status, out = await asyncio.to_thread(
            http, "POST", f"{url}/apis/kompressor.io/v1alpha1/namespaces/default/compressedmodels", body)
        assert status < 300, out
        monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
        for _ in range(2):  # the second run finds its place in the status: nothing is tested again
            code = await asyncio.to_thread(kompressor, ["--json-logs", "watch-drift", "--spec", str(spec), "--capture",
                                                        str(traffic["capture"]), "--verdict", "k8s://default/tab",
                                                        "--revision", "2", "--once"])
            assert code == 0
            obj = api.get("kompressor.io/v1alpha1/compressedmodels", "default", "tab")
            drift = obj["status"]["drift"]
            assert drift["isDrift"] is True and drift["consecutive"] == 2 and drift["revision"] == 2
            assert (drift["windows"], drift["lastSequence"]) == (2, 2 * ROWS_PER_REVISION - 1)
            assert obj["status"]["phase"] == "Serving"  # a merge patch: the rest of the status is kept
