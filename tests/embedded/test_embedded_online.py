"""`kompressor run` with spec.promotion.strategy shadow and canary, end to end on builtin digits: the baseline
serves while the first candidate is judged on live traffic; a candidate that passes its offline gates but
disagrees with the serving revision on the live requests (here: inputs unlike the eval data, where a 90 %
sparse net and the baseline part ways) is rejected, and never answers more than its canary share; one that
agrees is promoted."""

from __future__ import annotations

import copy
import json
import urllib.error
import urllib.request

import numpy as np
import pytest

from kompressor.embedded.layout import read_jsonl
from kompressor.embedded.report import write_report
from runner_process import DIGITS, RunnerProcess, write_manifest
from support.net import free_port

pytestmark = pytest.mark.slow
MIN_REQUESTS = 60
BATCH = 20  # requests sent between two looks at the status


def manifest_doc(strategy: str, sparsity: float, epochs: int, **promotion) -> dict:
    doc = copy.deepcopy(DIGITS)
    doc["spec"]["drift"]["enabled"] = False
    doc["spec"]["compression"]["pruning"] = {"sparsity": sparsity, "fineTuneEpochs": epochs}
    doc["spec"]["gates"] = {"maxAccuracyDrop": 0.1}
    doc["spec"]["promotion"] = {"strategy": strategy,
                                "onlineGates": {"minRequests": MIN_REQUESTS, "minAgreement": 0.85}, **promotion}
    return doc


class Traffic:
    """Live requests, one row each, and which revision answered each."""

    def __init__(self, url: str, rows: np.ndarray):
        self.url, self.rows, self.sent, self.versions = url, rows, 0, []

    def send(self, n: int = BATCH) -> None:
        for _ in range(n):
            row = self.rows[self.sent % len(self.rows)]
            body = {"inputs": [{"name": "input", "shape": [1, row.size], "datatype": "FP32",
                                "data": row.ravel().tolist()}]}
            request = urllib.request.Request(self.url, data=json.dumps(body).encode(),
                                             headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=10) as response:
                    self.versions.append(json.loads(response.read())["model_version"])
            except urllib.error.URLError:  # the server is (re)starting: the status already says Shadowing
                return
            self.sent += 1

    def until(self, runner: RunnerProcess, what: str, check, deadline: float = 240) -> dict:
        def probe(status):
            if check(status):
                return True
            if status.get("phase") in ("Shadowing", "Canary"):
                self.send()
            return False

        return runner.wait_status(what, probe, deadline)


def eval_rows() -> np.ndarray:
    from kompressor_jobs.data import load_dataset

    X = load_dataset("builtin://digits?split=eval").X.astype(np.float32)
    return X.reshape(len(X), -1)


def unlike_eval_rows(n: int = 400) -> np.ndarray:
    X = eval_rows()
    return np.random.default_rng(7).uniform(X.min(), X.max(), size=(n, X.shape[1])).astype(np.float32)


def start(tmp_path, job_env, doc: dict) -> RunnerProcess:
    manifest = tmp_path / "cm.yaml"
    write_manifest(manifest, doc)
    return RunnerProcess(manifest, tmp_path / "work", free_port(), job_env)


def events_of(runner: RunnerProcess) -> list[dict]:
    return read_jsonl(runner.model_dir() / "events.jsonl")


@pytest.mark.parametrize("strategy", ["shadow", "canary"])
def test_a_candidate_that_disagrees_on_live_traffic_is_rejected(tmp_path, job_env, strategy):
    runner = start(tmp_path, job_env, manifest_doc(strategy, 0.9, 3, canary={"steps": [20, 60]}))
    try:
        staged = runner.wait_status("the online stage", lambda s: s.get("phase") in ("Shadowing", "Canary"), 300)
        assert staged["currentRevision"] == 0 and staged["online"]["revision"] == 1  # the baseline serves
        traffic = Traffic(f"http://127.0.0.1:{runner.port}/v2/models/digits/infer", unlike_eval_rows())
        done = traffic.until(runner, "the online rejection", lambda s: s.get("phase") == "Rejected")
        assert done["currentRevision"] == 0 and "online.minAgreement" in done["message"]
        verdict = done["revisions"][-1]["online"]
        assert verdict["outcome"] == "Failed" and verdict["requests"] >= MIN_REQUESTS
        agreement = next(r for r in verdict["results"] if r["gate"] == "online.minAgreement")
        assert agreement["value"] < 0.85
        answered_by_candidate = traffic.versions.count("1") / len(traffic.versions)
        if strategy == "shadow":
            assert set(traffic.versions) == {"0"}  # clients only ever heard the serving revision
        else:
            assert 0 < answered_by_candidate <= 0.2 + 1 / len(traffic.versions)  # never beyond its first step
        traffic.send()  # rejected: every answer from the baseline again
        assert set(traffic.versions[-BATCH:]) == {"0"}
        assert "OnlineGatesFailed" in [e["reason"] for e in events_of(runner)]
    finally:
        assert runner.terminate() == 0
    page = write_report(runner.workdir).read_text()
    online = page.split("Online stage: candidates on live traffic", 1)[1].split("<h3>", 1)[0]
    assert "data:image/png;base64," in online  # the agreement-over-time plot
    assert f"<td>{strategy}</td><td>Failed</td>" in online and "online.minAgreement" in online


def test_a_candidate_that_agrees_is_promoted_through_every_canary_step(tmp_path, job_env):
    runner = start(tmp_path, job_env, manifest_doc("canary", 0.3, 0, canary={"steps": [20, 60]}))
    try:
        runner.wait_status("the canary", lambda s: s.get("phase") == "Canary", 300)
        traffic = Traffic(f"http://127.0.0.1:{runner.port}/v2/models/digits/infer", eval_rows())
        done = traffic.until(runner, "the promotion", lambda s: s.get("phase") == "Serving"
                             and s.get("currentRevision") == 1)
        verdict = done["revisions"][-1]["online"]
        assert (verdict["outcome"], verdict["stepsPassed"]) == ("Successful", 2)
        assert verdict["requests"] >= 2 * MIN_REQUESTS
        reasons = [e["reason"] for e in events_of(runner)]
        assert reasons.count("CanaryStepPassed") == 1 and "OnlineGatesPassed" in reasons
        last_promoted = len(reasons) - 1 - reasons[::-1].index("Promoted")  # the first Promoted is the baseline's
        assert reasons.index("OnlineStageStarted") < reasons.index("OnlineGatesPassed") < last_promoted
        traffic.send()
        assert set(traffic.versions[-BATCH:]) == {"1"}
    finally:
        assert runner.terminate() == 0


def test_a_runner_restart_mid_stage_keeps_the_counts_judged_so_far(tmp_path, job_env):
    doc = manifest_doc("shadow", 0.3, 0)
    doc["spec"]["promotion"]["onlineGates"]["minRequests"] = 3 * BATCH
    runner = start(tmp_path, job_env, doc)
    traffic = None
    try:
        runner.wait_status("shadowing", lambda s: s.get("phase") == "Shadowing", 300)
        traffic = Traffic(f"http://127.0.0.1:{runner.port}/v2/models/digits/infer", eval_rows())
        traffic.send()
        counted = runner.wait_status("the first requests counted", lambda s: (s.get("online") or {}).get(
            "totals", {}).get("requests", 0) >= BATCH, 60)["online"]["totals"]["requests"]
    finally:
        assert runner.terminate() == 0
    again = RunnerProcess(runner.manifest, runner.workdir, runner.port, job_env)
    try:
        status = again.wait_status("shadowing again", lambda s: s.get("phase") == "Shadowing", 120)
        assert status["online"]["totals"]["requests"] == counted  # kept, not reset, not doubled
        traffic.until(again, "the promotion", lambda s: s.get("currentRevision") == 1)
        verdict = again.status()["revisions"][-1]["online"]
        assert verdict["outcome"] == "Successful" and verdict["requests"] <= traffic.sent
    finally:
        assert again.terminate() == 0
