"""`kompressor run` end to end on builtin digits: compress, gate, serve; status.json as the operator
writes it; manifest edits; SIGTERM stops every child. The tests share one runner and run in order."""

import json
import threading
import urllib.request
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import yaml

from kompressor.api.status import CompressedModelStatus
from kompressor.api.wire import from_wire, to_wire
from kompressor.store import resolve_local
from runner_process import DIGITS, RunnerProcess, alive, children_of, wait_for, write_manifest
from support.net import free_port, port_open

pytestmark = pytest.mark.slow
CRD = Path(__file__).resolve().parents[2] / "crds" / "compressedmodels.kompressor.io.yaml"


class StatusReader(threading.Thread):
    """Reads status.json as fast as it can, recording every read that was not a whole JSON document."""

    def __init__(self, path: Path):
        super().__init__(daemon=True)
        self.path, self.reads, self.torn, self.phases = path, 0, [], []
        self.done = threading.Event()

    def run(self):
        while not self.done.is_set():
            try:
                text = self.path.read_text()
            except FileNotFoundError:
                self.done.wait(0.005)
                continue
            self.reads += 1
            try:
                phase = json.loads(text)["phase"]
            except (ValueError, KeyError):
                self.torn.append(text[:200])
                continue
            if not self.phases or self.phases[-1] != phase:
                self.phases.append(phase)
            self.done.wait(0.002)


@pytest.fixture(scope="module")
def served(tmp_path_factory, job_env):
    tmp = tmp_path_factory.mktemp("served")
    manifest = tmp / "cm.yaml"
    write_manifest(manifest, DIGITS)
    runner = RunnerProcess(manifest, tmp / "work", free_port(), job_env)
    reader = StatusReader(runner.model_dir() / "status.json")
    reader.start()
    try:
        runner.wait_status("phase Serving", lambda s: s.get("phase") == "Serving", 240)
        yield runner, reader
    finally:
        reader.done.set()
        runner.kill()


def status_schema() -> dict:
    crd = yaml.safe_load(CRD.read_text())
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]


def test_status_json_is_a_valid_crd_status(served):
    runner, _ = served
    status = runner.status()
    jsonschema.Draft4Validator(status_schema()).validate(status)
    assert to_wire(from_wire(CompressedModelStatus, status, "status")) == status  # exactly to_wire's shape
    assert status["observedGeneration"] == 1
    assert status["currentRevision"] == 1
    assert {c["type"]: c["status"] for c in status["conditions"]}["Ready"] == "True"
    baseline, revision = status["revisions"][0], status["revisions"][-1]
    assert baseline["revision"] == 0 and revision["revision"] == 1
    assert revision["gates"]["passed"] is True
    assert revision["metrics"]["sparsity"] == pytest.approx(0.5, abs=0.02)


def test_status_json_is_replaced_atomically(served):
    runner, reader = served
    wait_for("a few hundred reads", lambda: reader.reads > 300, 30, interval=0.05)
    assert reader.torn == []
    assert reader.phases[-1] == "Serving"
    assert "Evaluating" in reader.phases  # seen while it changed, not just the end state
    assert not list(runner.model_dir().glob(".*.tmp"))


def test_served_model_answers_like_onnxruntime(served):
    import onnxruntime as ort

    from kompressor_jobs.data import load_dataset

    runner, _ = served
    rows = load_dataset("builtin://digits?split=eval").X[:16]
    body = {"id": "t1", "inputs": [{"name": "input", "shape": list(rows.shape), "datatype": "FP32",
                                    "data": rows.flatten().tolist()}]}
    request = urllib.request.Request(f"http://127.0.0.1:{runner.port}/v2/models/digits/infer",
                                     data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        answer = json.loads(response.read())
    artifact = next(r for r in runner.status()["revisions"] if r["revision"] == 1)["artifact"]
    session = ort.InferenceSession(str(resolve_local(artifact["uri"]) / "model.onnx"))
    expected = session.run(None, {session.get_inputs()[0].name: rows})[0]
    assert answer["id"] == "t1"
    got = np.array(answer["outputs"][0]["data"], dtype=np.float32).reshape(answer["outputs"][0]["shape"])
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_spec_edit_bumps_the_generation_and_takes_effect_without_recompressing(served):
    runner, _ = served
    before = runner.status()
    edited = yaml.safe_load(yaml.safe_dump(DIGITS))
    edited["spec"]["drift"]["windowSize"] = 60
    write_manifest(runner.manifest, edited)
    status = runner.wait_status("observedGeneration 2", lambda s: s.get("observedGeneration") == 2, 30)
    assert status["phase"] == "Serving"
    assert [r["revision"] for r in status["revisions"]] == [r["revision"] for r in before["revisions"]]
    spec_file = runner.model_dir() / "spec-g2.yaml"
    assert yaml.safe_load(spec_file.read_text())["spec"]["drift"]["windowSize"] == 60
    # the drift watcher now runs with the new spec
    wait_for("the watcher restarted with spec-g2.yaml",
             lambda: any("watch-drift" in c and str(spec_file) in c for c in children_of(runner.proc.pid).values()),
             30)

    edited["metadata"]["annotations"] = {"example.com/note": "annotations are not spec"}
    write_manifest(runner.manifest, edited)
    wait_for("the annotation edit to be read", lambda: '"event": "annotations changed"' in runner.log_text(), 10)
    assert json.loads((runner.model_dir() / "object.json").read_text())["generation"] == 2
    assert runner.log_text().count('"event": "spec changed"') == 1


def test_sigterm_stops_every_child(served):
    runner, _ = served
    children = children_of(runner.proc.pid)
    kinds = " ".join(children.values())
    assert " serve " in kinds and " watch-drift " in kinds, children
    assert runner.terminate() == 0
    wait_for("every child to be gone", lambda: not any(alive(pid, cmd) for pid, cmd in children.items()), 15)
    assert not port_open(runner.port)
    assert '"event": "stopped"' in runner.log_text()


def test_restarted_runner_resumes_serving_without_recompressing(served, job_env):
    stopped, _ = served
    assert stopped.proc.poll() is not None  # the previous test stopped it
    before = stopped.status()
    jobs_before = (stopped.model_dir() / "jobs.json").read_text()
    runner = RunnerProcess(stopped.manifest, stopped.workdir, stopped.port, job_env)
    try:
        served_again = stopped.model_dir() / "serving.jsonl"
        lines = len(served_again.read_text().splitlines())
        wait_for("the server to be started again",
                 lambda: len(served_again.read_text().splitlines()) > lines and port_open(runner.port), 60)
        status = runner.status()
        assert status["phase"] == "Serving" and status["currentRevision"] == before["currentRevision"]
        assert status["revisions"] == before["revisions"]
        assert (stopped.model_dir() / "jobs.json").read_text() == jobs_before  # no job ran again
        assert '"event": "job started"' not in runner.log_text()
    finally:
        assert runner.terminate() == 0
