"""`kompressor serve` as a real process: OIP v2 endpoints, outputs vs a direct ONNX Runtime run, metrics,
capture, a bad-input corpus, and hot swaps under concurrent load."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from kompressor_jobs import capture
from support.polling import wait
from serving_support import N_FEATURES, Server, http, infer_body, load_body, metric_value, ort_run, swaps_under_load

pytestmark = pytest.mark.slow


def captured(folder, revision=None) -> np.ndarray:
    rows, _ = capture.read_since(folder, capture.Position(), revision)
    return np.zeros((0, N_FEATURES), np.float32) if rows is None else rows


def settled(server) -> int:
    """Wait until every row served so far is on disk (the writer batches for a few ms); the row count."""
    def done():
        text = server.metrics()
        served = metric_value(text, "kompressor_inference_batch_size_sum", model=server.name)
        return metric_value(text, "kompressor_capture_rows_total", model=server.name) == served

    wait(done, 20, "capture to catch up", interval=0.02)
    return len(captured(server.capture))


def at_least(folder, n: int, revision=None) -> list[np.ndarray] | None:
    """The captured rows once there are ``n`` (a list, so that polling can test it for truth), else None."""
    rows = captured(folder, revision)
    return list(rows) if len(rows) >= n else None


def test_server_and_model_metadata(server, artifacts):
    import onnxruntime as ort

    assert http("GET", f"{server.url}/v2/health/live") == (200, {"live": True})
    assert http("GET", f"{server.url}/v2/health/ready") == (200, {"ready": True})
    status, meta = http("GET", f"{server.url}/v2")
    assert status == 200 and meta["name"] == "kompressor" and "model_repository" in meta["extensions"]
    session = ort.InferenceSession(str(artifacts[1] / "model.onnx"))
    for path in ("", "/versions/1"):
        status, model = http("GET", f"{server.url}/v2/models/mlp{path}")
        assert status == 200
        assert model["name"] == "mlp" and model["versions"] == ["1"] and model["platform"] == "onnxruntime_onnx"
        assert [i["name"] for i in model["inputs"]] == [i.name for i in session.get_inputs()]
        assert model["inputs"][0]["shape"] == [-1, N_FEATURES] and model["inputs"][0]["datatype"] == "FP32"
        assert [o["name"] for o in model["outputs"]] == [o.name for o in session.get_outputs()]
        assert http("GET", f"{server.url}/v2/models/mlp{path}/ready") == (200, {"name": "mlp", "ready": True})
    assert http("GET", f"{server.url}/v2/models/mlp/versions/7")[0] == 404
    assert http("GET", f"{server.url}/v2/models/other/ready")[0] == 404
    assert http("POST", f"{server.url}/v2/repository/index", {})[1] == [{"name": "mlp", "version": "1",
                                                                          "state": "READY"}]


@pytest.mark.parametrize("batch", [1, 64])
@pytest.mark.parametrize("datatype,nested", [("FP32", False), ("FP32", True), ("FP64", False), ("INT32", True)])
def test_infer_matches_direct_onnxruntime(server, artifacts, batch, datatype, nested):
    rng = np.random.default_rng(batch)
    x = rng.normal(size=(batch, N_FEATURES)).astype(np.float32)
    if datatype == "INT32":
        x = rng.integers(-50, 50, size=(batch, N_FEATURES)).astype(np.int32)
    request_id = f"req-{batch}-{datatype}"
    for version in (None, "1"):
        status, out = http("POST", server.infer_url(version), infer_body(x, datatype, nested, request_id))
        assert status == 200, out
        assert out["id"] == request_id and out["model_name"] == "mlp" and out["model_version"] == "1"
        (logits,) = out["outputs"]
        expected = ort_run(artifacts[1], x.astype(np.float32))
        assert logits["name"] == "logits" and logits["datatype"] == "FP32" and logits["shape"] == list(expected.shape)
        # JSON carries float32 values exactly as float64 numbers, so the comparison is exact
        np.testing.assert_array_equal(np.asarray(logits["data"], np.float32).reshape(expected.shape), expected)


def test_requested_outputs_and_fp64_narrowing(server, artifacts):
    x = np.linspace(-1, 1, N_FEATURES, dtype=np.float64)[None, :] + 1e-12  # not representable in FP32
    body = infer_body(x, "FP64")
    body["outputs"] = [{"name": "logits"}]
    status, out = http("POST", server.infer_url(), body)
    assert status == 200, out
    expected = ort_run(artifacts[1], x.astype(np.float32))
    np.testing.assert_array_equal(np.asarray(out["outputs"][0]["data"], np.float32).reshape(expected.shape), expected)


def test_successful_inputs_are_captured_in_order(server):
    before = settled(server)
    rng = np.random.default_rng(7)
    batches = [rng.normal(size=(n, N_FEATURES)).astype(np.float32) for n in (1, 5, 3)]
    for x in batches:
        assert http("POST", server.infer_url(), infer_body(x))[0] == 200
    rows = wait(lambda: at_least(server.capture, before + 9), 20, "captured rows", interval=0.02)
    np.testing.assert_array_equal(rows[before:before + 9], np.concatenate(batches))
    assert metric_value(server.metrics(), "kompressor_capture_rows_total", model="mlp") >= before + 9


def _bad(x=None, **tensor_changes):
    tensor = {"name": "input", "datatype": "FP32", "shape": [1, N_FEATURES], "data": [0.5] * N_FEATURES}
    tensor.update(tensor_changes)
    return {"inputs": [tensor]}


GOOD = [0.25] * N_FEATURES
# (kind, url suffix, body (dict) or raw bytes, expected status)
BAD_INPUTS = [
    ("not JSON", "", b"{not json", 400),
    ("JSON that is not an object", "", b"[1, 2, 3]", 400),
    ("no inputs", "", {"id": "x"}, 400),
    ("empty inputs", "", {"inputs": []}, 400),
    ("unknown input name", "", {"inputs": [{**_bad()["inputs"][0], "name": "pixels"}]}, 400),
    ("same input twice", "", {"inputs": _bad()["inputs"] * 2}, 400),
    ("too few features", "", _bad(shape=[1, N_FEATURES - 1], data=GOOD[:-1]), 400),
    ("wrong rank", "", _bad(shape=[N_FEATURES], data=GOOD), 400),
    ("zero batch", "", _bad(shape=[0, N_FEATURES], data=[]), 400),
    ("negative dimension", "", _bad(shape=[-1, N_FEATURES]), 400),
    ("data shorter than shape", "", _bad(shape=[2, N_FEATURES]), 400),
    ("nested data disagrees with shape", "", _bad(shape=[2, N_FEATURES // 2],
                                                  data=[[0.1] * N_FEATURES]), 400),
    ("ragged nested data", "", _bad(shape=[2, N_FEATURES], data=[GOOD, GOOD[:-1]]), 400),
    ("NaN", "", json.dumps(_bad(data=[float("nan")] + GOOD[1:])).encode(), 400),
    ("Infinity", "", json.dumps(_bad(data=[float("inf")] + GOOD[1:])).encode(), 400),
    ("overflow to inf", "", b'{"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 8], '
                            b'"data": [1e400, 0, 0, 0, 0, 0, 0, 0]}]}', 400),
    ("FP64 overflowing FP32", "", _bad(datatype="FP64", data=[1e300] + GOOD[1:]), 400),
    ("strings in data", "", _bad(data=["a"] * N_FEATURES), 400),
    ("BYTES datatype", "", _bad(datatype="BYTES", data=["a"] * N_FEATURES), 400),
    ("unknown datatype", "", _bad(datatype="FLOAT"), 400),
    ("booleans for FP32", "", _bad(data=[True] * N_FEATURES), 400),
    ("fractions for INT32", "", _bad(datatype="INT32"), 400),
    ("INT8 out of range", "", _bad(datatype="INT8", data=[300] + [0] * (N_FEATURES - 1)), 400),
    ("INT64 not exact in FP32", "", _bad(datatype="INT64", data=[2 ** 24 + 1] + [0] * (N_FEATURES - 1)), 400),
    ("integer beyond INT64", "", _bad(datatype="INT64", data=[2 ** 70] + [0] * (N_FEATURES - 1)), 400),
    ("id not a string", "", {**_bad(), "id": 12}, 400),
    ("unknown requested output", "", {**_bad(), "outputs": [{"name": "probabilities"}]}, 400),
    ("binary_data_size without binary data", "", {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 8],
                                                               "parameters": {"binary_data_size": 32}}]}, 400),
    ("unknown model", "/v2/models/other/infer", _bad(), 404),
    ("wrong version", "/v2/models/mlp/versions/9/infer", _bad(), 404),
    ("body over --max-body-bytes", "", b" " * (9 * 1024 * 1024), 413),
]


def test_bad_input_corpus_gets_4xx_and_is_never_captured(server):
    assert len(BAD_INPUTS) >= 15
    before_rows = settled(server)
    before_errors = metric_value(server.metrics(), "kompressor_inference_errors_total", model="mlp")
    for kind, suffix, body, expected in BAD_INPUTS:
        url = f"{server.url}{suffix}" if suffix else server.infer_url()
        if isinstance(body, bytes):
            status, out = http("POST", url, raw=body)
        else:
            status, out = http("POST", url, body)
        assert status == expected, f"{kind}: HTTP {status} {out}"
        assert isinstance(out, dict) and isinstance(out.get("error"), str) and out["error"], kind
        assert http("GET", f"{server.url}/v2/health/ready")[0] == 200, f"server stopped answering after {kind}"
    errors = metric_value(server.metrics(), "kompressor_inference_errors_total", model="mlp")
    assert errors - before_errors == len(BAD_INPUTS)
    # a good request still works, and only its row is captured
    x = np.full((1, N_FEATURES), 0.125, np.float32)
    assert http("POST", server.infer_url(), infer_body(x))[0] == 200
    rows = wait(lambda: at_least(server.capture, before_rows + 1), 20, "the good row", interval=0.02)
    assert len(rows) == before_rows + 1
    np.testing.assert_array_equal(rows[-1], x[0])


def test_metrics_count_requests_batches_and_latency(server):
    before = server.metrics()
    x = np.zeros((64, N_FEATURES), np.float32)
    for _ in range(3):
        assert http("POST", server.infer_url(), infer_body(x))[0] == 200
    after = server.metrics()
    labels = {"model": "mlp", "revision": "1"}
    delta = lambda name: metric_value(after, name, **labels) - metric_value(before, name, **labels)  # noqa: E731
    assert delta("kompressor_inference_requests_total") == 3
    assert delta("kompressor_inference_batch_size_sum") == 3 * 64
    assert delta("kompressor_inference_latency_seconds_count") == 3
    assert delta("kompressor_inference_latency_seconds_sum") > 0
    assert metric_value(after, "kompressor_serving_revision", model="mlp") == 1


def test_refuses_to_start_on_a_tampered_artifact(artifacts, tmp_path):
    import shutil

    bad = tmp_path / "tampered"
    shutil.copytree(artifacts[1], bad)
    with open(bad / "model.onnx", "ab") as fh:
        fh.write(b"\0")
    result = subprocess.run([sys.executable, "-m", "kompressor.cli", "--json-logs", "serve", "--artifact", str(bad),
                             "--name", "mlp", "--port", "0"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "does not match the manifest" in result.stderr


def test_capture_folder_stays_under_its_cap_and_drops_are_counted(artifacts, tmp_path):
    cap = 16 * 1024
    srv = Server(artifacts[1], "mlp", capture=tmp_path / "capture", log=tmp_path / "server.log",
                 extra=["--capture-max-bytes", str(cap)])
    try:
        x = np.ones((32, N_FEATURES), np.float32)  # ~1.1 KB per captured record
        for _ in range(60):
            assert http("POST", srv.infer_url(), infer_body(x))[0] == 200
        def consistent():  # every row handled, and what is on disk is exactly what was not dropped
            text = srv.metrics()
            written = metric_value(text, "kompressor_capture_rows_total", model="mlp")
            dropped = metric_value(text, "kompressor_capture_dropped_rows_total", model="mlp", reason="size_cap")
            return written == 60 * 32 and dropped > 0 and len(captured(tmp_path / "capture")) == written - dropped

        wait(consistent, 20, "capture to settle with drops counted", interval=0.02)
        size = sum(p.stat().st_size for p in (tmp_path / "capture").iterdir())
        assert size <= cap + cap // 8 + 2048  # the cap, plus the segment being written
    finally:
        srv.stop()


def test_hot_swap_under_concurrent_load_drops_nothing(artifacts, tmp_path):
    srv = Server(artifacts[1], "mlp", capture=tmp_path / "capture", log=tmp_path / "server.log")
    x = np.random.default_rng(3).normal(size=(4, N_FEATURES)).astype(np.float32)
    expected = {str(r): ort_run(artifacts[r], x) for r in (1, 2)}
    # revision 1 is loaded back without a sha256 (optional), revision 2 with its manifest's
    loads = [load_body(artifacts[2]), load_body(artifacts[1], sha256=None), load_body(artifacts[2])]

    try:
        answers, swaps, _ = swaps_under_load(srv, loads, x, clients=6, per_step=10, timeout=30.0)
        results = [(status, body) for status, _, body in answers]
        assert [s for s, _ in swaps] == [200, 200, 200], swaps
        assert [b["version"] for _, b in swaps] == ["2", "1", "2"]
        assert len(results) > 50
        failed = [r for r in results if r[0] != 200]
        assert not failed, failed[:3]
        versions = {body["model_version"] for _, body in results}
        assert versions == {"1", "2"}
        for _, body in results:  # every answer is exactly the output of the version it names
            out = np.asarray(body["outputs"][0]["data"], np.float32).reshape(expected[body["model_version"]].shape)
            np.testing.assert_array_equal(out, expected[body["model_version"]])
        assert http("GET", f"{srv.url}/v2/models/mlp")[1]["versions"] == ["2"]
        text = srv.metrics()
        assert metric_value(text, "kompressor_model_swaps_total", model="mlp", outcome="loaded") == 3
        assert metric_value(text, "kompressor_serving_revision", model="mlp") == 2
        # captured rows remember which revision served them
        wait(lambda: len(captured(tmp_path / "capture", revision=2)) > 0, 20, "revision-2 rows", interval=0.02)
        assert len(captured(tmp_path / "capture", revision=1)) > 0
    finally:
        srv.stop()


def test_failed_swaps_keep_the_old_model_serving(server, artifacts, tmp_path):
    import shutil

    load_url = f"{server.url}/v2/repository/models/mlp/load"
    tampered = tmp_path / "tampered"
    shutil.copytree(artifacts[2], tampered)
    (tampered / "model.onnx").write_bytes(b"not a model")
    cases = [
        ({"parameters": {"artifact": str(tampered)}}, 400, "does not match"),
        ({"parameters": {"artifact": str(artifacts[2]), "sha256": "0" * 64}}, 400, "is not the expected"),
        ({"parameters": {"artifact": str(tmp_path / "missing")}}, 400, "not an artifact folder"),
        ({"parameters": {"artifact": "relative/dir"}}, 400, "absolute path"),
        ({"parameters": {}}, 400, "parameters.artifact"),
    ]
    for body, status, message in cases:
        got, out = http("POST", load_url, body)
        assert got == status and message in out["error"], (body, got, out)
    assert http("POST", f"{server.url}/v2/repository/models/other/load",
                {"parameters": {"artifact": str(artifacts[2])}})[0] == 404
    assert http("GET", f"{server.url}/v2/models/mlp")[1]["versions"] == ["1"]
    status, out = http("POST", server.infer_url(), infer_body(np.zeros((1, N_FEATURES), np.float32)))
    assert status == 200 and out["model_version"] == "1"


def test_requests_in_flight_gauge_counts_a_request_being_answered(server):
    """kompressor_inference_requests_in_flight (what spec.serving.autoscaling.targetConcurrency scales on) is 1
    while a request's body is still arriving, and back to 0 once it is answered."""
    import socket

    body = json.dumps(infer_body(np.zeros((1, N_FEATURES), np.float32))).encode()
    head = (f"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    gauge = lambda: metric_value(server.metrics(), "kompressor_inference_requests_in_flight", model="mlp")  # noqa: E731
    assert gauge() == 0
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(head + body[:10])
        wait(lambda: gauge() == 1, 20, "the request in flight", interval=0.02)
        sock.sendall(body[10:])
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200")
    wait(lambda: gauge() == 0, 20, "the gauge back at 0", interval=0.02)
