"""Dynamic batching (`kompressor serve --max-batch-size N --max-batch-delay-ms D`) on a real server process:
concurrent REST and gRPC requests are merged into shared ONNX Runtime runs, and every answer is what the request
gets unbatched (a direct ONNX Runtime run of that request alone); requests of other shapes are not merged; a run
never holds more than N rows; a request the model rejects fails alone; the capture and the request metrics stay per
request; and a hot swap while batching fails no request.

Exact or not: the MLP's answers (MatMul/Gemm) are compared bit for bit, and the integer outputs too. ONNX Runtime's
float ReduceSum sums a row in an order that depends on where the row lies in memory (its alignment: the same row
at another address differs by an ulp, batched or not), so float outputs of the reduction models are compared within
``REDUCTION_RTOL`` (a few float32 ulps)."""

from __future__ import annotations

import asyncio
import json
import time

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from kompressor.store import write_manifest
from kompressor_jobs import capture
from serving_support import N_FEATURES, Server, http, infer_body, load_body, metric_value, ort_run, swaps_under_load
from support.polling import wait
from test_serve_inputs import arrays, body, build, direct

pytestmark = pytest.mark.slow
MAX_BATCH = 8
# long enough on a loaded 2-core machine for concurrent requests to meet; each test still takes seconds
DELAY_MS = 40
REDUCTION_RTOL = 1e-6  # float32 epsilon is 1.19e-7: about 8 ulps


def same_floats(got: np.ndarray, expected: np.ndarray) -> None:
    np.testing.assert_allclose(got, expected, rtol=REDUCTION_RTOL, atol=1e-6)


def batching_flags(max_batch: int = MAX_BATCH, delay_ms: float = DELAY_MS) -> list[str]:
    return ["--max-batch-size", str(max_batch), "--max-batch-delay-ms", str(delay_ms)]


def run_histograms(server: Server, name: str) -> dict[str, float]:
    text = server.metrics()
    return {"runs": metric_value(text, "kompressor_inference_run_requests_count", model=name),
            "requests": metric_value(text, "kompressor_inference_run_requests_sum", model=name),
            "rows": metric_value(text, "kompressor_inference_run_batch_size_sum", model=name),
            "runs_within_max": metric_value(text, "kompressor_inference_run_batch_size_bucket", model=name,
                                            le=f"{float(MAX_BATCH)}"),
            "served_requests": metric_value(text, "kompressor_inference_requests_total", model=name),
            "served_rows": metric_value(text, "kompressor_inference_batch_size_sum", model=name),
            "captured": metric_value(text, "kompressor_capture_rows_total", model=name)}


def test_concurrent_rest_and_grpc_requests_are_merged_and_every_answer_is_unchanged(artifacts, tmp_path):
    import aiohttp
    import tritonclient.grpc.aio as tga

    server = Server(artifacts[1], "mlp", capture=tmp_path / "capture", log=tmp_path / "server.log", grpc=True,
                    extra=batching_flags())
    rng = np.random.default_rng(11)
    # rows 1..3, three request datatypes (converted exactly to the model's FP32), and two requests too big to
    # share a run (>= MAX_BATCH rows): they run alone
    requests = []
    for i in range(48):
        rows = 10 if i in (5, 30) else int(rng.integers(1, 4))
        datatype = ("FP32", "FP64", "INT32")[i % 3]
        x = rng.normal(size=(rows, N_FEATURES)).astype(np.float32)
        if datatype == "INT32":
            x = rng.integers(-20, 20, size=(rows, N_FEATURES)).astype(np.int32)
        requests.append((x, datatype, "grpc" if i % 4 == 0 else "rest"))

    async def one(http_client, grpc_client, x, datatype, protocol):
        if protocol == "rest":
            async with http_client.post(server.infer_url(), json=infer_body(x, datatype)) as response:
                out = await response.json()
                assert response.status == 200, out
                return np.asarray(out["outputs"][0]["data"], np.float32).reshape(out["outputs"][0]["shape"])
        tensor = tga.InferInput("input", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x.astype(np.float32))
        return (await grpc_client.infer("mlp", [tensor])).as_numpy("logits")

    async def scenario():
        grpc_client = tga.InferenceServerClient(server.grpc_target)
        try:
            async with aiohttp.ClientSession() as http_client:
                for _ in range(3):  # three waves of concurrent requests
                    got = await asyncio.gather(*(one(http_client, grpc_client, *r) for r in requests))
        finally:
            await grpc_client.close()
        return got

    try:
        got = asyncio.run(scenario())
        for (x, _, _), answer in zip(requests, got):
            np.testing.assert_array_equal(answer, ort_run(artifacts[1], x.astype(np.float32)))
        rows = sum(len(x) for x, _, _ in requests) * 3
        h = run_histograms(server, "mlp")
        assert h["requests"] == h["served_requests"] == 3 * len(requests)
        assert h["rows"] == h["served_rows"] == rows
        assert h["runs"] < h["requests"] / 2, h  # merged: far fewer runs than requests
        assert h["runs_within_max"] == h["runs"] - 6, h  # only the 10-row requests ran over MAX_BATCH, alone
        # the capture keeps every request's rows, exactly once
        wait(lambda: run_histograms(server, "mlp")["captured"] == rows, 20, "the capture to catch up")
        kept, _ = capture.read_since(tmp_path / "capture", capture.Position())
        sent = np.concatenate([x.astype(np.float32) for x, _, _ in requests] * 3)
        np.testing.assert_array_equal(np.unique(kept, axis=0), np.unique(sent, axis=0))
        assert len(kept) == rows
    finally:
        server.stop()


def test_several_inputs_of_five_datatypes_merge_and_answer_as_unbatched(tmp_path):
    import aiohttp

    artifact = build(tmp_path / "multi")
    server = Server(artifact, "multi", log=tmp_path / "server.log", extra=batching_flags())
    feeds = [arrays(int(b), seed=i) for i, b in enumerate(np.random.default_rng(3).integers(1, 4, size=32))]

    async def scenario():
        async with aiohttp.ClientSession() as client:
            async def one(f):
                async with client.post(server.infer_url(), json=body(f)) as response:
                    assert response.status == 200, await response.text()
                    return {o["name"]: o for o in (await response.json())["outputs"]}
            return await asyncio.gather(*(one(f) for f in feeds))

    try:
        for f, out in zip(feeds, asyncio.run(scenario())):
            expected = direct(artifact, f)
            assert out["outputs"]["datatype"] == "FP32" and out["tokens"]["datatype"] == "INT64"
            same_floats(np.asarray(out["outputs"]["data"], np.float32).reshape(-1, 1), expected["outputs"])
            np.testing.assert_array_equal(np.asarray(out["tokens"]["data"], np.int64).reshape(-1, 1),
                                          expected["tokens"])
        h = run_histograms(server, "multi")
        assert h["requests"] == len(feeds) and h["runs"] < len(feeds), h
    finally:
        server.stop()


def _save(graph, folder, revision: int = 1):
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(folder / "model.onnx"))
    write_manifest(folder, {"revision": revision})
    return folder


def sequence_model(folder):
    """outputs = sum over a sequence of any length of x, times 2: inputs [batch, seq] with seq dynamic too."""
    f = TensorProto.FLOAT
    nodes = [helper.make_node("ReduceSum", ["x", "axis1"], ["s"], keepdims=1),
             helper.make_node("Mul", ["s", "two"], ["y"])]
    graph = helper.make_graph(nodes, "seq", [helper.make_tensor_value_info("x", f, ["batch", "seq"])],
                              [helper.make_tensor_value_info("y", f, ["batch", 1])],
                              [helper.make_tensor("axis1", TensorProto.INT64, [1], [1]),
                               helper.make_tensor("two", f, [1], [2.0])])
    return _save(graph, folder)


def lookup_model(folder):
    """y = table[ids] summed over the ids: ORT refuses an id outside the table when it runs (the schema cannot)."""
    f = TensorProto.FLOAT
    table = np.arange(30, dtype=np.float32).reshape(10, 3)
    nodes = [helper.make_node("Gather", ["table", "ids"], ["rows"], axis=0),
             helper.make_node("ReduceSum", ["rows", "axis1"], ["y"], keepdims=0)]
    graph = helper.make_graph(nodes, "lookup", [helper.make_tensor_value_info("ids", TensorProto.INT64,
                                                                              ["batch", 2])],
                              [helper.make_tensor_value_info("y", f, ["batch", 3])],
                              [helper.make_tensor("table", f, [10, 3], table.reshape(-1).tolist()),
                               helper.make_tensor("axis1", TensorProto.INT64, [1], [1])])
    return _save(graph, folder), table


def test_requests_of_other_non_batch_shapes_are_not_merged_together(tmp_path):
    import aiohttp

    artifact = sequence_model(tmp_path / "seq")
    server = Server(artifact, "seq", log=tmp_path / "server.log", extra=batching_flags())
    rng = np.random.default_rng(5)
    xs = [rng.normal(size=(1, (2, 5, 9)[i % 3])).astype(np.float32) for i in range(24)]

    async def scenario():
        async with aiohttp.ClientSession() as client:
            async def one(x):
                tensor = {"name": "x", "datatype": "FP32", "shape": list(x.shape), "data": x.reshape(-1).tolist()}
                async with client.post(server.infer_url(), json={"inputs": [tensor]}) as response:
                    assert response.status == 200, await response.text()
                    return np.asarray((await response.json())["outputs"][0]["data"], np.float32)
            return await asyncio.gather(*(one(x) for x in xs))

    try:
        import onnxruntime as ort

        session = ort.InferenceSession(str(artifact / "model.onnx"), providers=["CPUExecutionProvider"])
        for x, got in zip(xs, asyncio.run(scenario())):
            same_floats(got.reshape(1, 1), session.run(None, {"x": x})[0])
        h = run_histograms(server, "seq")
        # three shapes: at least three runs, and merging within each (24 requests in fewer runs)
        assert h["requests"] == 24 and 3 <= h["runs"] < 24, h
    finally:
        server.stop()


def test_a_request_the_model_rejects_fails_alone_and_the_others_of_its_run_succeed(tmp_path):
    import aiohttp

    artifact, table = lookup_model(tmp_path / "lookup")
    server = Server(artifact, "lookup", log=tmp_path / "server.log", grpc=True, extra=batching_flags())
    ids = [np.array([[i % 10, (3 * i) % 10]], np.int64) for i in range(14)]
    bad = {4, 9}  # an id past the table: valid for the schema, refused by ONNX Runtime's Gather
    for i in bad:
        ids[i] = np.array([[1, 99]], np.int64)

    async def scenario():
        async with aiohttp.ClientSession() as client:
            async def one(x):
                tensor = {"name": "ids", "datatype": "INT64", "shape": [1, 2], "data": x.reshape(-1).tolist()}
                async with client.post(server.infer_url(), json={"inputs": [tensor]}) as response:
                    return response.status, await response.json()
            return await asyncio.gather(*(one(x) for x in ids))

    try:
        answers = asyncio.run(scenario())
        for i, (status, out) in enumerate(answers):
            if i in bad:
                assert status == 400 and "the model rejected the input" in out["error"], out
            else:
                assert status == 200, out
                same_floats(np.asarray(out["outputs"][0]["data"], np.float32), table[ids[i][0]].sum(axis=0))
        text = server.metrics()
        assert metric_value(text, "kompressor_inference_errors_total", model="lookup", code="400") == len(bad)
        assert metric_value(text, "kompressor_inference_requests_total", model="lookup") == len(ids) - len(bad)
        assert http("GET", f"{server.url}/v2/health/ready")[0] == 200
    finally:
        server.stop()


def test_a_hot_swap_while_batching_fails_no_request_and_changes_no_answer(artifacts, tmp_path):
    server = Server(artifacts[1], "mlp", capture=tmp_path / "capture", log=tmp_path / "server.log",
                    extra=batching_flags(delay_ms=5))
    x = np.random.default_rng(9).normal(size=(2, N_FEATURES)).astype(np.float32)
    expected = {str(r): ort_run(artifacts[r], x) for r in (1, 2)}

    try:
        answers, swaps, _ = swaps_under_load(server, [load_body(artifacts[r]) for r in (2, 1, 2)], x, clients=12,
                                             timeout=30.0)
        results = [(status, body) for status, _, body in answers]
        assert [status for status, _ in swaps] == [200, 200, 200], swaps
        assert not [r for r in results if r[0] != 200], [r for r in results if r[0] != 200][:3]
        assert {b["model_version"] for _, b in results} == {"1", "2"}
        for _, b in results:  # exactly the output of the revision the answer names
            np.testing.assert_array_equal(np.asarray(b["outputs"][0]["data"], np.float32).reshape(2, 3),
                                          expected[b["model_version"]])
        h = run_histograms(server, "mlp")
        assert h["requests"] == len(results) and h["runs"] < len(results), h
        wait(lambda: run_histograms(server, "mlp")["captured"] == 2 * len(results), 20, "the capture")
        assert len(capture.read_since(tmp_path / "capture", capture.Position(), 2)[0]) > 0
    finally:
        server.stop()


def test_a_lone_request_is_not_held_for_the_batch_delay_and_the_last_of_a_wave_neither(artifacts, tmp_path):
    """With nothing else in the server, a request runs at once: with a batch delay of a minute, one client's
    requests one after another are answered while the first delay would still run; and a concurrent wave is
    answered whole within it too (the last requests of the wave run once nothing else is coming)."""
    import aiohttp

    delay_s = 60
    server = Server(artifacts[1], "mlp", log=tmp_path / "server.log", extra=batching_flags(delay_ms=delay_s * 1000))
    x = np.random.default_rng(3).normal(size=(1, N_FEATURES)).astype(np.float32)
    expected = ort_run(artifacts[1], x)

    async def wave():
        async with aiohttp.ClientSession() as client:
            async def one():
                async with client.post(server.infer_url(), json=infer_body(x)) as response:
                    assert response.status == 200
                    return np.asarray((await response.json())["outputs"][0]["data"], np.float32)
            return await asyncio.gather(*(one() for _ in range(3 * MAX_BATCH + 3)))

    try:
        started = time.monotonic()
        for _ in range(3):
            status, out = http("POST", server.infer_url(), infer_body(x), timeout=delay_s)
            assert status == 200, out
            np.testing.assert_array_equal(np.asarray(out["outputs"][0]["data"], np.float32).reshape(1, -1), expected)
        assert run_histograms(server, "mlp")["runs"] == 3  # each alone: no one else was there
        for got in asyncio.run(asyncio.wait_for(wave(), delay_s)):
            np.testing.assert_array_equal(got.reshape(1, -1), expected)
        # three lone requests and a wave, all within one batch delay (waiting for it would take 4 of them)
        assert time.monotonic() - started < delay_s
        assert run_histograms(server, "mlp")["requests"] == 3 + 3 * MAX_BATCH + 3
    finally:
        server.stop()


def test_batching_flags_are_checked():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "kompressor.cli", "serve", "--artifact", "/nonexistent",
                           "--name", "m", "--max-batch-size", "-1"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "--max-batch-size" in done.stderr + done.stdout


def test_the_embedded_runner_serves_with_the_specs_workers_and_batching(artifacts, tmp_path):
    """`kompressor run` (embedded mode) starts its server with spec.serving.workers and spec.serving.batching: two
    worker processes, each batching, and the answers unchanged."""
    import aiohttp

    from kompressor.api.spec import BatchingSpec
    from kompressor.api.status import Artifact
    from kompressor.core.actions import Serve
    from kompressor.embedded.layout import ModelDir
    from kompressor.embedded.serving import LocalServing
    from support.net import free_port

    files = ModelDir.of(tmp_path, "default", "mlp")
    for folder in (files.root, files.logs):
        folder.mkdir(parents=True, exist_ok=True)
    sha = json.loads((artifacts[1] / "manifest.json").read_text())["files"]["model.onnx"]
    xs = [np.random.default_rng(i).normal(size=(1, N_FEATURES)).astype(np.float32) for i in range(40)]

    async def scenario():
        serving = LocalServing("mlp", free_port(), files, lambda: None, workers=2,
                               batching=BatchingSpec(max_batch_size=MAX_BATCH, max_delay_ms=DELAY_MS))
        try:
            await serving.apply(Serve(1, Artifact(uri=artifacts[1].as_uri(), sha256=sha), drift_reference=None),
                                tmp_path / "spec.yaml")
            deadline = time.monotonic() + 60
            while not (serving.state() and serving.state().ready and
                       '"serving workers ready"' in (files.logs / "serving.log").read_text()):
                assert time.monotonic() < deadline, (files.logs / "serving.log").read_text()
                await asyncio.sleep(0.05)
            async with aiohttp.ClientSession() as client:
                async def one(x):
                    async with client.post(f"{serving.url}/v2/models/mlp/infer", json=infer_body(x)) as response:
                        assert response.status == 200, await response.text()
                        return np.asarray((await response.json())["outputs"][0]["data"], np.float32)
                answers = await asyncio.gather(*(one(x) for x in xs))
                async with client.get(f"{serving.url}/metrics") as response:
                    text = await response.text()
            return answers, text
        finally:
            await serving.stop()

    answers, text = asyncio.run(scenario())
    for x, got in zip(xs, answers):
        np.testing.assert_array_equal(got.reshape(1, 3), ort_run(artifacts[1], x))
    runs = metric_value(text, "kompressor_inference_run_requests_count", model="mlp")
    assert metric_value(text, "kompressor_inference_run_requests_sum", model="mlp") == len(xs) > runs
    log = (files.logs / "serving.log").read_text()
    assert '"workers": 2' in log, log[-2000:]
