"""Jobs under `kompressor run`: bad input fails at once, other failures get backoffLimit retries, removal from
the manifest, bad edits, SIGTERM mid-job."""

import json

import pytest
import yaml

from runner_process import DIGITS, RunnerProcess, alive, children_of, wait_for, write_manifest
from support.net import free_port

pytestmark = pytest.mark.slow


def digits(**spec_changes) -> dict:
    doc = yaml.safe_load(yaml.safe_dump(DIGITS))
    doc["spec"]["drift"]["enabled"] = False
    for path, value in spec_changes.items():
        node = doc["spec"]
        *parents, leaf = path.split("__")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return doc


def slow_prune() -> dict:
    """A prune that runs until stopped: many epochs of one-row steps, no early stopping (a prune that ends
    early would race the checks that want it running)."""
    return digits(compression__pruning__fineTuneEpochs=100, compression__pruning__schedule="gradual",
                  compression__pruning__steps=20, compression__fineTuning__batchSize=1,
                  compression__fineTuning__earlyStoppingPatience=0)


def prune_pids(runner: RunnerProcess) -> dict[int, str]:
    """The running prune jobs, once they run the job itself: a child starts as the runner's parent-death launcher
    (``python -I -S -c ... prune ...``), which then execs the job, so its command line changes."""
    return {pid: cmd for pid, cmd in children_of(runner.proc.pid).items()
            if " prune " in cmd and " -I -S -c " not in cmd}


def test_bad_input_fails_the_job_at_once_with_its_message(tmp_path, job_env):
    """Exit 2 (the model file is missing) is final, as the Job's podFailurePolicy makes it in a cluster:
    backoffLimit 2 is not spent on the same mistake."""
    manifest = tmp_path / "cm.yaml"
    missing = tmp_path / "no-such-model.pt2"
    write_manifest(manifest, digits(model={"uri": missing.as_uri(), "inputShape": [64]}, jobs__backoffLimit=2))
    runner = RunnerProcess(manifest, tmp_path / "work", free_port(), job_env)
    try:
        status = runner.wait_status("phase Failed", lambda s: s.get("phase") == "Failed", 300)
        assert "digits-r1-g1-prune" in status["message"]
        assert "bad input, not retried" in status["message"] and str(missing) in status["message"]
        assert "kompressor.io/retry" in status["message"]
        log = (runner.model_dir() / "logs" / "digits-r1-g1-prune.log").read_text()
        assert log.count(str(missing)) >= 1
        jobs = json.loads((runner.model_dir() / "jobs.json").read_text())
        assert [(j["name"], j["phase"], j["attempts"], j["badInput"]) for j in jobs] == [
            ("digits-r1-g1-prune", "Failed", 1, True)]
        assert runner.proc.poll() is None  # a failed model does not stop the runner

        # A retry token in the manifest's annotations starts a new candidate (it fails the same way).
        doc = yaml.safe_load(manifest.read_text())
        doc["metadata"]["annotations"] = {"kompressor.io/retry": "try-2"}
        write_manifest(manifest, doc)
        status = runner.wait_status("the retry to fail again",
                                    lambda s: s.get("handledRetry") == "try-2" and s.get("phase") == "Failed"
                                    and "digits-r2-g1-prune" in (s.get("message") or ""), 300)
        assert status["observedGeneration"] == 1
    finally:
        assert runner.terminate() == 0


def test_a_job_failing_otherwise_is_retried_backoff_limit_times_then_failed(tmp_path, job_env):
    """Any exit but 2 is retried: here the model cache lies under a regular file (an OSError, exit 1)."""
    manifest = tmp_path / "cm.yaml"
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    write_manifest(manifest, digits(jobs__backoffLimit=1))
    runner = RunnerProcess(manifest, tmp_path / "work", free_port(),
                           {**job_env, "KOMPRESSOR_CACHE": str(blocker / "cache")})
    try:
        status = runner.wait_status("phase Failed", lambda s: s.get("phase") == "Failed", 400)
        assert "digits-r1-g1-prune" in status["message"] and "2 attempt(s)" in status["message"]
        assert "after its retries" in status["message"] and "bad input" not in status["message"]
        assert "Not a directory" in status["message"]
        log = (runner.model_dir() / "logs" / "digits-r1-g1-prune.log").read_text()
        assert log.count("NotADirectoryError") >= 2  # both attempts ran
        jobs = json.loads((runner.model_dir() / "jobs.json").read_text())
        assert [(j["name"], j["phase"], j["attempts"], j["badInput"]) for j in jobs] == [
            ("digits-r1-g1-prune", "Failed", 2, False)]
    finally:
        assert runner.terminate() == 0


def test_removed_model_is_deleted_and_sigterm_leaves_no_orphans(tmp_path, job_env):
    manifest = tmp_path / "cm.yaml"
    slow = slow_prune()
    other = yaml.safe_load(yaml.safe_dump(slow))
    other["metadata"]["name"] = "other"
    write_manifest(manifest, slow, other)
    port = free_port()
    runner = RunnerProcess(manifest, tmp_path / "work", port, job_env)
    try:
        first = wait_for("both prune jobs to run", lambda: len(prune_pids(runner)) == 2 and prune_pids(runner), 60)
        mine = {pid: cmd for pid, cmd in first.items() if "/default/digits/" in cmd}
        theirs = {pid: cmd for pid, cmd in first.items() if "/default/other/" in cmd}
        assert len(mine) == len(theirs) == 1
        added = [json.loads(line) for line in runner.log_text().splitlines() if '"model added"' in line]
        assert sorted(a["url"] for a in added) == [f"http://127.0.0.1:{port}", f"http://127.0.0.1:{port + 1}"]
        model_dir = runner.model_dir()
        assert (model_dir / "status.json").exists()

        # A bad edit is refused; the running models are left alone.
        manifest.write_text(manifest.read_text().replace("fineTuneEpochs: 100", "fineTuneEpochs: -1", 1))
        wait_for("the bad edit to be refused", lambda: "manifest rejected" in runner.log_text(), 10)
        assert "spec.compression.pruning.fineTuneEpochs" in runner.log_text()
        assert all(alive(pid, cmd) for pid, cmd in first.items())

        # Removing a model from the file deletes it: its job stops, its files go; the other one runs on.
        write_manifest(manifest, other)
        wait_for("the model to be deleted", lambda: not model_dir.exists(), 30)
        wait_for("its prune job to stop", lambda: not any(alive(pid, cmd) for pid, cmd in mine.items()), 15)
        assert all(alive(pid, cmd) for pid, cmd in theirs.items())
        assert runner.proc.poll() is None

        # Applied again, it starts from scratch (generation 1, a new prune); SIGTERM stops everything.
        write_manifest(manifest, slow, other)
        wait_for("the prune job to run again", lambda: len(prune_pids(runner)) == 2, 60)
        assert json.loads((model_dir / "object.json").read_text())["generation"] == 1
        everything = children_of(runner.proc.pid)
    finally:
        code = runner.terminate()
    assert code == 0
    wait_for("every child to be gone", lambda: not any(alive(pid, cmd) for pid, cmd in everything.items()), 15)


def test_approval_annotation_in_the_manifest_promotes(tmp_path, job_env):
    manifest = tmp_path / "cm.yaml"
    doc = digits(promotion={"requireApproval": True})
    write_manifest(manifest, doc)
    runner = RunnerProcess(manifest, tmp_path / "work", free_port(), job_env)
    try:
        status = runner.wait_status("AwaitingApproval", lambda s: s.get("phase") == "AwaitingApproval", 120)
        assert status.get("currentRevision") is None
        assert not (runner.model_dir() / "serving.jsonl").exists()  # nothing served before the approval

        doc["metadata"]["annotations"] = {"kompressor.io/approve": "1"}
        write_manifest(manifest, doc)
        status = runner.wait_status("Serving r1", lambda s: s.get("phase") == "Serving", 60)
        assert status["currentRevision"] == 1 and status["observedGeneration"] == 1  # annotations are not spec
        served = [json.loads(line) for line in (runner.model_dir() / "serving.jsonl").read_text().splitlines()]
        assert [s["revision"] for s in served] == [1]
    finally:
        assert runner.terminate() == 0


def test_children_go_even_when_the_runner_is_killed(tmp_path, job_env):
    manifest = tmp_path / "cm.yaml"
    write_manifest(manifest, slow_prune())
    runner = RunnerProcess(manifest, tmp_path / "work", free_port(), job_env)
    try:
        jobs = wait_for("the prune job to run", lambda: prune_pids(runner), 60)
    finally:
        runner.kill()  # SIGKILL: the runner cannot clean up; the kernel's parent-death signal does
    wait_for("the orphaned job to stop", lambda: not any(alive(pid, cmd) for pid, cmd in jobs.items()), 15)


def test_job_past_its_active_deadline_is_stopped_and_failed(tmp_path, job_env):
    manifest = tmp_path / "cm.yaml"
    doc = slow_prune()
    doc["spec"]["jobs"].update(activeDeadlineSeconds=4, backoffLimit=3)
    write_manifest(manifest, doc)
    runner = RunnerProcess(manifest, tmp_path / "work", free_port(), job_env)
    try:
        jobs = wait_for("the prune job to run", lambda: prune_pids(runner), 60)
        status = runner.wait_status("phase Failed", lambda s: s.get("phase") == "Failed", 60)
        assert "DeadlineExceeded" in status["message"] and "1 attempt(s)" in status["message"]  # no retry
        assert not any(alive(pid, cmd) for pid, cmd in jobs.items())
    finally:
        assert runner.terminate() == 0
