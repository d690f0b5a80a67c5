"""`kompressor serve --workers 2` as a real process tree: both workers answer on the shared ports (REST and gRPC),
/metrics sums them, the capture keeps every served row, a hot swap under load over many connections fails no
request and reaches every worker, a failed swap changes none, and a killed worker comes back on the revision
being served."""

from __future__ import annotations

import json
import os
import signal

import numpy as np
import pytest

from kompressor_jobs import capture
from support.polling import wait
from serving_support import N_FEATURES, Server, http, infer_body, load_body, metric_value, ort_run, swaps_under_load

pytestmark = pytest.mark.slow
WORKERS = 2
HEADER = "Kompressor-Worker"


def worker_pids(server: Server) -> dict[int, int]:
    """Worker index -> pid of its newest process, from the server's log."""
    pids = {}
    for line in server.log.read_text().splitlines():
        if line.startswith("{") and '"serving worker"' in line:
            event = json.loads(line)
            pids[event["worker"]] = event["pid"]
    return pids


def answered_by(server: Server, x: np.ndarray, tries: int = 200) -> dict[str, set]:
    """Worker index -> versions it answered with, over fresh connections (the kernel picks a worker per connection)."""
    import urllib.request

    seen: dict[str, set] = {}
    for _ in range(tries):
        request = urllib.request.Request(server.infer_url(), data=json.dumps(infer_body(x)).encode(), method="POST",
                                         headers={"Content-Type": "application/json", "Connection": "close"})
        with urllib.request.urlopen(request, timeout=30) as response:
            seen.setdefault(response.headers[HEADER], set()).add(json.loads(response.read())["model_version"])
        if len(seen) == WORKERS and tries > WORKERS and all(seen.values()):
            break
    return seen


def both_answer(server: Server, x: np.ndarray) -> dict[str, set] | None:
    seen = answered_by(server, x)
    return seen if len(seen) == WORKERS else None


@pytest.fixture
def workers(artifacts, tmp_path):
    server = Server(artifacts[1], "mlp", capture=tmp_path / "capture", log=tmp_path / "server.log", grpc=True,
                    extra=["--workers", str(WORKERS)])
    server.capture = tmp_path / "capture"
    wait(lambda: '"serving workers ready"' in server.log.read_text(), 60, "the supervisor's workers ready",
         interval=0.05)
    yield server
    server.stop()


def test_both_workers_answer_metrics_sum_and_every_row_is_captured(workers, artifacts):
    import tritonclient.grpc as tg

    server = workers
    x = np.random.default_rng(0).normal(size=(3, N_FEATURES)).astype(np.float32)
    seen = wait(lambda: both_answer(server, x), 60, "both workers", interval=0.05)
    assert set(seen) == {"0", "1"} and all(v == {"1"} for v in seen.values())
    client = tg.InferenceServerClient(server.grpc_target)
    tensor = tg.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    for _ in range(5):  # gRPC on the shared port too
        np.testing.assert_array_equal(client.infer("mlp", [tensor]).as_numpy("logits"), ort_run(artifacts[1], x))
    client.close()

    def settled():
        text = server.metrics()
        served = metric_value(text, "kompressor_inference_batch_size_sum", model="mlp")
        return served if served and metric_value(text, "kompressor_capture_rows_total", model="mlp") == served \
            else None

    served = wait(settled, 60, "the capture to catch up", interval=0.05)
    text = server.metrics()  # whichever worker answers, the sums over both
    rest = metric_value(text, "kompressor_inference_requests_total", model="mlp", protocol="rest")
    assert metric_value(text, "kompressor_inference_requests_total", model="mlp", protocol="grpc") == 5
    assert served == 3 * (rest + 5)
    rows, _ = capture.read_since(server.capture, capture.Position())
    assert len(rows) == served
    np.testing.assert_array_equal(np.unique(rows, axis=0), np.unique(x, axis=0))
    pids = worker_pids(server)
    server.stop()  # SIGTERM: the supervisor stops its workers
    for pid in pids.values():
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_a_swap_under_load_reaches_every_worker_and_fails_no_request(workers, artifacts):
    server = workers
    x = np.random.default_rng(5).normal(size=(3, N_FEATURES)).astype(np.float32)
    expected = {str(r): ort_run(artifacts[r], x) for r in (1, 2)}
    loads = [load_body(artifacts[2]), load_body(artifacts[1], sha256="0" * 64), load_body(artifacts[1]),
             load_body(artifacts[2])]
    answers, swaps, outcomes = swaps_under_load(server, loads, x, fresh_connections=True)
    results = [(status, headers.get(HEADER), body) for status, headers, body in answers]
    assert [s for s, _ in swaps] == [200, 400, 200, 200], swaps
    assert "is not the expected" in swaps[1][1]["error"]
    assert not [o for o in outcomes if o is not None], outcomes
    assert not [r for r in results if r[0] != 200], [r for r in results if r[0] != 200][:3]
    assert {b["model_version"] for _, _, b in results} == {"1", "2"} and {w for _, w, _ in results} == {"0", "1"}
    for _, _, body in results:  # every answer is exactly the output of the version it names
        out = np.asarray(body["outputs"][0]["data"], np.float32).reshape(expected[body["model_version"]].shape)
        np.testing.assert_array_equal(out, expected[body["model_version"]])
    seen = answered_by(server, x)
    assert set(seen) == {"0", "1"} and all(v == {"2"} for v in seen.values()), seen
    text = server.metrics()
    assert metric_value(text, "kompressor_model_swaps_total", model="mlp", outcome="loaded") == 3
    assert metric_value(text, "kompressor_model_swaps_total", model="mlp", outcome="failed") == 1
    assert metric_value(text, "kompressor_serving_revision", model="mlp") == 2
    # the capture marks the newest serving stint of revision 2, and every revision-2 row comes after it
    wait(lambda: len(capture.read_rows(server.capture, 2, capture.serving_start(server.capture, 2))) > 0,
         60, "revision-2 rows in the newest stint", interval=0.05)
    start = capture.serving_start(server.capture, 2)
    assert start > 0
    newest = capture.read_rows(server.capture, 2, start)
    assert newest.sequences.min() >= start


def test_a_killed_worker_comes_back_on_the_revision_being_served(workers, artifacts):
    server = workers
    sha = json.loads((artifacts[2] / "manifest.json").read_text())["files"]["model.onnx"]
    status, out = http("POST", f"{server.url}/v2/repository/models/mlp/load",
                       {"parameters": {"artifact": str(artifacts[2]), "sha256": sha}})
    assert status == 200, out
    before = worker_pids(server)
    os.kill(before[0], signal.SIGKILL)
    wait(lambda: worker_pids(server)[0] != before[0], 60, "worker 0 restarted", interval=0.05)
    x = np.zeros((1, N_FEATURES), np.float32)
    seen = wait(lambda: both_answer(server, x), 60, "both workers", interval=0.05)
    assert all(v == {"2"} for v in seen.values()), seen  # the new process started on revision 2, not the CLI's 1


def test_workers_share_the_cpus_ort_threads_are_divided(monkeypatch, tmp_path):
    """--workers 0 is one worker per CPU of the cgroup limit (one without a limit), and the threads one server would
    use are shared out over the workers, at least one each."""
    from kompressor_jobs import runtime
    from kompressor_jobs.serve.workers import auto_workers, worker_threads

    monkeypatch.setenv("KOMPRESSOR_ORT_THREADS", "4")
    assert [worker_threads(n) for n in (1, 2, 3, 4, 8)] == [4, 2, 1, 1, 1]
    monkeypatch.delenv("KOMPRESSOR_ORT_THREADS")
    cpu_max = tmp_path / "cpu.max"
    monkeypatch.setattr(runtime, "CGROUP_CPU_MAX", cpu_max)
    monkeypatch.setattr(runtime, "CGROUP_V1_CPU", tmp_path / "no-v1")
    cpu_max.write_text("350000 100000\n")  # a 3.5-CPU limit
    assert auto_workers() == 3 and worker_threads(3) == 1 and worker_threads(1) == 3
    cpu_max.write_text("max 100000\n")  # no limit: one worker, every core for ONNX Runtime
    assert auto_workers() == 1 and worker_threads(1) == (os.cpu_count() or 1)


def test_workers_on_a_port_in_use_fail_to_start_with_a_message(artifacts):
    import socket
    import subprocess
    import sys

    with socket.socket() as taken:  # an ordinary listener, without SO_REUSEPORT: the workers cannot share it
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        done = subprocess.run(
            [sys.executable, "-m", "kompressor.cli", "serve", "--artifact", str(artifacts[1]), "--name", "mlp",
             "--host", "127.0.0.1", "--port", str(taken.getsockname()[1]), "--workers", "2"],
            capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "cannot listen on 127.0.0.1" in done.stderr + done.stdout
