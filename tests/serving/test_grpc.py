"""OIP v2 over gRPC, served by a real `kompressor serve --grpc-port` process and called with Triton's own client
(``tritonclient.grpc``, and its generated ``service_pb2`` messages for typed contents and malformed requests):
health and metadata, raw and typed inputs of every datatype REST serves against a direct ONNX Runtime run,
INVALID_ARGUMENT with REST's messages, the capture and the metrics shared with REST, and a hot swap under
concurrent gRPC load."""

from __future__ import annotations

import asyncio
import json
import time

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tg
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc
from tritonclient.utils import InferenceServerException

from kompressor_jobs import capture
from serving_support import N_FEATURES, Server, http, metric_value, ort_run
from test_serve_inputs import INPUTS, arrays, build, direct

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def mlp(artifacts, tmp_path_factory):
    root = tmp_path_factory.mktemp("grpc")
    server = Server(artifacts[1], "mlp", capture=root / "capture", log=root / "server.log", grpc=True)
    server.capture = root / "capture"
    client = tg.InferenceServerClient(server.grpc_target)
    yield server, client
    client.close()
    server.stop()


@pytest.fixture(scope="module")
def multi(tmp_path_factory):
    root = tmp_path_factory.mktemp("grpc-multi")
    artifact = build(root / "artifact")
    server = Server(artifact, "multi", log=root / "server.log", grpc=True)
    channel = grpc.insecure_channel(server.grpc_target)
    client = tg.InferenceServerClient(server.grpc_target)
    yield server, artifact, client, pb_grpc.GRPCInferenceServiceStub(channel)
    client.close()
    channel.close()
    server.stop()


def triton_inputs(feeds: dict[str, np.ndarray]) -> list:
    tensors = []
    for name, a in feeds.items():
        tensor = tg.InferInput(name, list(a.shape), INPUTS[name][1] if name in INPUTS else "FP32")
        tensor.set_data_from_numpy(a)
        tensors.append(tensor)
    return tensors


def test_the_schema_matches_tritons_own_messages_field_by_field():
    """Every message and field this server declares has the name, number, type and label of Triton's
    grpc_service.proto (as tritonclient ships it), so the two are one protocol on the wire."""
    from kompressor_jobs.serve import oip_proto

    def fields(descriptor) -> dict:
        out = {}
        for f in descriptor.fields:
            kind = f.message_type.full_name.rpartition(".")[2] if f.message_type else f.type
            out[f.name] = (f.number, kind, f.label if hasattr(f, "label") else None,
                           f.containing_oneof.name if f.containing_oneof else None)
        return out

    ours = oip_proto.DESCRIPTOR
    assert ours.package == "inference"
    for path in oip_proto.MESSAGES:
        mine = ours.pool.FindMessageTypeByName(f"inference.{path}")
        theirs = pb.DESCRIPTOR.pool.FindMessageTypeByName(f"inference.{path}")
        assert fields(mine) == fields(theirs), path
    service, triton = ours.services_by_name["GRPCInferenceService"], pb.DESCRIPTOR.services_by_name[
        "GRPCInferenceService"]
    for method in service.methods:
        other = triton.methods_by_name[method.name]
        assert (method.input_type.full_name, method.output_type.full_name) == (
            other.input_type.full_name, other.output_type.full_name)
    assert "service GRPCInferenceService" in oip_proto.proto_text()


def test_health_and_metadata(mlp):
    server, client = mlp
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("mlp") and client.is_model_ready("mlp", "1")
    assert not client.is_model_ready("mlp", "7") and not client.is_model_ready("other")
    meta = client.get_server_metadata(as_json=True)
    assert meta["name"] == "kompressor" and {"model_repository", "binary_tensor_data"} <= set(meta["extensions"])
    assert meta == http("GET", f"{server.url}/v2")[1]
    model = client.get_model_metadata("mlp", as_json=True)
    rest = http("GET", f"{server.url}/v2/models/mlp")[1]
    assert model["name"] == "mlp" and model["versions"] == ["1"] and model["platform"] == rest["platform"]
    for side in ("inputs", "outputs"):  # int64 shapes come back as strings in protobuf's JSON form
        assert [{**t, "shape": [int(d) for d in t["shape"]]} for t in model[side]] == rest[side]
    with pytest.raises(InferenceServerException, match="has no version '9'") as err:
        client.get_model_metadata("mlp", "9")
    assert err.value.status() == "StatusCode.NOT_FOUND"


@pytest.mark.parametrize("batch", [1, 64])
def test_raw_inputs_match_direct_onnxruntime_and_are_captured(mlp, artifacts, batch):
    server, client = mlp
    x = np.random.default_rng(batch).normal(size=(batch, N_FEATURES)).astype(np.float32)
    result = client.infer("mlp", triton_inputs({"input": x}), request_id=f"g{batch}")
    expected = ort_run(artifacts[1], x)
    np.testing.assert_array_equal(result.as_numpy("logits"), expected)
    response = result.get_response()
    assert response.id == f"g{batch}" and response.model_name == "mlp" and response.model_version == "1"
    assert response.outputs[0].datatype == "FP32" and list(response.outputs[0].shape) == list(expected.shape)
    # the same capture as REST: these rows are on disk, in order, as the newest ones
    def newest():
        rows = capture.read_newest(server.capture, batch)
        return rows is not None and len(rows) == batch and np.array_equal(rows, x)

    deadline = time.monotonic() + 20
    while not newest():
        assert time.monotonic() < deadline, "gRPC rows not captured"
        time.sleep(0.02)


def test_metrics_count_grpc_requests_and_errors_by_protocol(mlp):
    server, client = mlp
    before = server.metrics()
    x = np.zeros((4, N_FEATURES), np.float32)
    for _ in range(3):
        client.infer("mlp", triton_inputs({"input": x}))
    with pytest.raises(InferenceServerException):
        client.infer("mlp", triton_inputs({"input": np.zeros((1, N_FEATURES - 1), np.float32)}))
    after = server.metrics()

    def delta(name, **labels):
        return metric_value(after, name, model="mlp", **labels) - metric_value(before, name, model="mlp", **labels)

    assert delta("kompressor_inference_requests_total", protocol="grpc") == 3
    assert delta("kompressor_inference_requests_total", protocol="rest") == 0
    assert delta("kompressor_inference_batch_size_sum") == 12
    assert delta("kompressor_inference_errors_total", protocol="grpc", code="INVALID_ARGUMENT") == 1


@pytest.mark.parametrize("batch", [1, 5])
def test_five_datatypes_raw_and_typed_match_onnxruntime(multi, batch):
    server, artifact, client, stub = multi
    feeds = arrays(batch, seed=batch)
    expected = direct(artifact, feeds)
    result = client.infer("multi", triton_inputs(feeds))
    np.testing.assert_array_equal(result.as_numpy("outputs"), expected["outputs"])
    np.testing.assert_array_equal(result.as_numpy("tokens"), expected["tokens"])
    assert result.as_numpy("tokens").dtype == np.int64
    # typed contents (FP16 has no typed field: raw for it alone is not allowed, so FP16 -> FP32 numbers)
    request = pb.ModelInferRequest(model_name="multi", id="typed")
    fields = {"INT64": "int64_contents", "INT32": "int_contents", "BOOL": "bool_contents", "FP32": "fp32_contents"}
    for name, a in feeds.items():
        datatype = INPUTS[name][1] if INPUTS[name][1] != "FP16" else "FP32"
        tensor = request.inputs.add(name=name, datatype=datatype, shape=list(a.shape))
        getattr(tensor.contents, fields[datatype]).extend(a.reshape(-1).tolist())
    response = stub.ModelInfer(request)
    typed = tg.InferResult(response)
    assert response.id == "typed"
    np.testing.assert_array_equal(typed.as_numpy("outputs"), expected["outputs"])
    np.testing.assert_array_equal(typed.as_numpy("tokens"), expected["tokens"])
    # one requested output only
    result = client.infer("multi", triton_inputs(feeds), outputs=[tg.InferRequestedOutput("tokens")])
    assert [o.name for o in result.get_response().outputs] == ["tokens"]


def _typed(feeds, **changes) -> pb.ModelInferRequest:
    """A raw ModelInferRequest for the multi model; ``changes``: per input, fields to set on the tensor."""
    request = pb.ModelInferRequest(model_name="multi")
    for name, a in feeds.items():
        tensor = request.inputs.add(name=name, datatype=INPUTS[name][1], shape=list(a.shape))
        request.raw_input_contents.append(a.tobytes())
        for key, value in changes.get(name, {}).items():
            if key == "raw":
                request.raw_input_contents[-1] = value
            elif key == "shape":
                del tensor.shape[:]
                tensor.shape.extend(value)
            else:
                setattr(tensor, key, value)
    return request


ONE = arrays(1)
BAD = [  # (what, request, expected message)
    ("no inputs", pb.ModelInferRequest(model_name="multi"), "'inputs' must be a non-empty list"),
    ("NaN in raw FP32", _typed(ONE, dense={"raw": np.array([[np.nan, 0, 0]], np.float32).tobytes()}),
     "input 'dense': NaN or infinite values are not accepted"),
    ("raw too short", _typed(ONE, dense={"raw": b"\0" * 8}),
     "input 'dense': 8 bytes of binary data given, shape [1, 3] of FP32 needs 12"),
    ("BOOL byte 2", _typed(ONE, flag={"raw": b"\x02"}), "input 'flag': BOOL binary data must hold only the bytes 0"),
    ("shape off the model", _typed(ONE, dense={"shape": [1, 4], "raw": b"\0" * 16}),
     "input 'dense': shape [1, 4] does not fit the model's [-1, 3]"),
    ("BYTES", _typed(ONE, dense={"datatype": "BYTES"}), "datatype BYTES is not accepted; the model takes FP32"),
    ("unknown datatype", _typed(ONE, dense={"datatype": "FP8"}), "input 'dense': unknown datatype 'FP8'"),
    ("INT64 not exact in the model's type", _typed(ONE, flag={"datatype": "INT64", "raw": b"\1" + b"\0" * 7}),
     "input 'flag': datatype INT64 cannot be converted to the model's BOOL"),
]


def _more_bad():
    missing = _typed({k: v for k, v in ONE.items() if k != "flag"})
    unknown = _typed(ONE)
    unknown.inputs.add(name="token_type_ids", datatype="INT64", shape=[1, 4])
    unknown.raw_input_contents.append(b"\0" * 32)
    too_few_raw = _typed(ONE)
    del too_few_raw.raw_input_contents[-1]
    both = _typed(ONE)
    both.inputs[4].contents.fp32_contents.extend([0, 0, 0])
    typed = pb.ModelInferRequest(model_name="multi")
    for name, a in ONE.items():
        typed.inputs.add(name=name, datatype=INPUTS[name][1], shape=list(a.shape))
    typed.inputs[0].contents.int64_contents.extend(ONE["input_ids"].reshape(-1).tolist())
    typed.inputs[1].contents.int64_contents.extend([1, 1, 1, 1])  # INT32 values belong in int_contents
    outputs = _typed(ONE)
    outputs.outputs.add(name="probabilities")
    return [
        ("missing input", missing, "missing input(s): flag"),
        ("unknown input", unknown, "input 'token_type_ids' is not an input of the model"),
        ("raw count", too_few_raw, "raw_input_contents has 4 entries for 5 inputs"),
        ("raw and contents", both, "input 'dense': 'contents' given with raw_input_contents"),
        ("wrong typed field", typed, "input 'attention_mask': INT32 values go in contents.int_contents"),
        ("unknown output", outputs, "unknown output(s): probabilities"),
    ]


@pytest.mark.parametrize("what, request_, message", BAD + _more_bad(), ids=[b[0] for b in BAD + _more_bad()])
def test_bad_requests_get_invalid_argument_with_the_rest_message(multi, what, request_, message):
    server, _, _, stub = multi
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(request_)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (what, err.value.details())
    assert message in err.value.details(), err.value.details()
    assert stub.ServerLive(pb.ServerLiveRequest()).live


def test_typed_fp16_and_unknown_models_and_oversized_messages(multi):
    server, _, client, stub = multi
    fields = {"INT64": "int64_contents", "INT32": "int_contents", "BOOL": "bool_contents", "FP32": "fp32_contents",
              "FP16": "fp32_contents"}
    for empty, message in ((None, "input 'scale': FP16 has no typed contents field; send it in raw_input_contents"),
                           ("input_ids", "input 'input_ids': no data: set contents.int64_contents")):
        request = pb.ModelInferRequest(model_name="multi")
        for name, a in ONE.items():
            tensor = request.inputs.add(name=name, datatype=INPUTS[name][1], shape=list(a.shape))
            if name != empty:
                getattr(tensor.contents, fields[INPUTS[name][1]]).extend(a.reshape(-1).tolist())
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(request)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert message in err.value.details(), err.value.details()
    unknown_model, unknown_version = _typed(ONE), _typed(ONE)
    unknown_model.model_name, unknown_version.model_version = "other", "9"
    for request, text in ((unknown_model, "model 'other' not found"), (unknown_version, "has no version '9'")):
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(request)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND and text in err.value.details()
    big = _typed(ONE)
    big.raw_input_contents[0] = b"\0" * (9 << 20)  # over the default --max-body-bytes (8 MiB)
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(big)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert client.is_server_ready()


def test_a_hot_swap_under_grpc_load_fails_no_request(artifacts, tmp_path):
    """Swaps (over REST) reach the gRPC side at once: concurrent gRPC clients see every answer come exactly from
    the revision it names, both revisions answer, and no request fails."""
    import tritonclient.grpc.aio as tga

    server = Server(artifacts[1], "mlp", capture=tmp_path / "capture", log=tmp_path / "server.log", grpc=True)
    x = np.random.default_rng(5).normal(size=(3, N_FEATURES)).astype(np.float32)
    expected = {str(r): ort_run(artifacts[r], x) for r in (1, 2)}

    async def scenario():
        results, stop = [], asyncio.Event()
        client = tga.InferenceServerClient(server.grpc_target)

        async def worker():
            while not stop.is_set():
                tensor = tga.InferInput("input", list(x.shape), "FP32")
                tensor.set_data_from_numpy(x)
                result = await client.infer("mlp", [tensor])
                results.append((result.get_response().model_version, result.as_numpy("logits")))

        async def served_by(version: str, count: int = 10) -> None:
            start, deadline = len(results), time.monotonic() + 30
            while sum(1 for v, _ in results[start:] if v == version) < count:
                assert time.monotonic() < deadline and not any(w.done() for w in workers), f"no answers by {version}"
                await asyncio.sleep(0.01)

        workers = [asyncio.create_task(worker()) for _ in range(4)]
        swaps, current = [], "1"
        loop = asyncio.get_running_loop()
        for revision in (2, 1, 2):
            await served_by(current)
            sha = json.loads((artifacts[revision] / "manifest.json").read_text())["files"]["model.onnx"]
            body = {"parameters": {"artifact": str(artifacts[revision]), "sha256": sha}}
            swaps.append(await loop.run_in_executor(
                None, http, "POST", f"{server.url}/v2/repository/models/mlp/load", body))
            current = str(revision)
        await served_by(current)
        stop.set()
        outcomes = await asyncio.gather(*workers, return_exceptions=True)
        await client.close()
        return results, swaps, outcomes

    try:
        results, swaps, outcomes = asyncio.run(scenario())
        assert [s for s, _ in swaps] == [200, 200, 200], swaps
        assert not [o for o in outcomes if o is not None], outcomes  # no worker saw a failed request
        assert {v for v, _ in results} == {"1", "2"} and len(results) > 40
        for version, logits in results:
            np.testing.assert_array_equal(logits, expected[version])
        assert tg.InferenceServerClient(server.grpc_target).get_model_metadata("mlp").versions == ["2"]
    finally:
        server.stop()


def test_grpc_port_in_use_or_equal_to_the_rest_port_is_refused(artifacts, tmp_path):
    import socket
    import subprocess
    import sys

    from support.net import free_port

    port = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        for grpc_port, message in ((busy, "--grpc-port"), (port, "--grpc-port must be a port other than --port")):
            done = subprocess.run(
                [sys.executable, "-m", "kompressor.cli", "serve", "--artifact", str(artifacts[1]), "--name", "mlp",
                 "--host", "127.0.0.1", "--port", str(port), "--grpc-port", str(grpc_port)],
                capture_output=True, text=True, timeout=60)
            assert done.returncode != 0 and message in done.stderr + done.stdout, done.stderr[-2000:]


def test_the_embedded_runner_serves_grpc_when_the_spec_sets_grpc_port(artifacts, tmp_path):
    """`kompressor run` (embedded mode) starts its server with --grpc-port when spec.serving.grpcPort is set."""
    from kompressor.api.status import Artifact
    from kompressor.core.actions import Serve
    from kompressor.embedded.layout import ModelDir
    from kompressor.embedded.serving import LocalServing
    from support.net import free_port

    files = ModelDir.of(tmp_path, "default", "mlp")
    for folder in (files.root, files.logs):
        folder.mkdir(parents=True, exist_ok=True)
    sha = json.loads((artifacts[1] / "manifest.json").read_text())["files"]["model.onnx"]
    grpc_port = free_port()

    async def scenario():
        serving = LocalServing("mlp", free_port(), files, lambda: None, grpc_port=grpc_port)
        try:
            await serving.apply(Serve(1, Artifact(uri=artifacts[1].as_uri(), sha256=sha), drift_reference=None),
                                tmp_path / "spec.yaml")
            deadline = time.monotonic() + 60
            while not (serving.state() and serving.state().ready):
                assert time.monotonic() < deadline, (files.logs / "serving.log").read_text()
                await asyncio.sleep(0.05)
            client = tg.InferenceServerClient(f"127.0.0.1:{grpc_port}")
            try:
                return client.is_model_ready("mlp", "1")
            finally:
                client.close()
        finally:
            await serving.stop()

    assert asyncio.run(scenario())
