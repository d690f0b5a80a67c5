"""The binary tensor extension on REST (Triton's: ``Inference-Header-Content-Length``, ``binary_data_size``,
``binary_data``, ``binary_data_output``), served by a real `kompressor serve` process and called with Triton's own
HTTP client (``tritonclient.http``, ``binary_data=True``) and with hand-made bodies: outputs against a direct ONNX
Runtime run for every datatype REST serves, binary and JSON tensors mixed in one request, capture of binary
inputs, and 400 with a message for every malformed binary request."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import tritonclient.http as th
from tritonclient.utils import InferenceServerException

from kompressor_jobs import capture
from serving_support import N_FEATURES, Server, http, ort_run
from test_serve_inputs import INPUTS, arrays, build, direct

pytestmark = pytest.mark.slow
HEADER = "Inference-Header-Content-Length"


@pytest.fixture(scope="module")
def mlp(artifacts, tmp_path_factory):
    root = tmp_path_factory.mktemp("binary")
    server = Server(artifacts[1], "mlp", capture=root / "capture", log=root / "server.log")
    server.capture = root / "capture"
    client = th.InferenceServerClient(f"127.0.0.1:{server.port}")
    yield server, client
    client.close()
    server.stop()


@pytest.fixture(scope="module")
def multi(tmp_path_factory):
    root = tmp_path_factory.mktemp("binary-multi")
    artifact = build(root / "artifact")
    server = Server(artifact, "multi", log=root / "server.log")
    client = th.InferenceServerClient(f"127.0.0.1:{server.port}")
    yield server, artifact, client
    client.close()
    server.stop()


def triton_inputs(feeds: dict[str, np.ndarray], binary=True) -> list:
    tensors = []
    for name, a in feeds.items():
        tensor = th.InferInput(name, list(a.shape), INPUTS[name][1] if name in INPUTS else "FP32")
        tensor.set_data_from_numpy(a, binary_data=binary if isinstance(binary, bool) else name in binary)
        tensors.append(tensor)
    return tensors


def post(url: str, header: dict, chunks: list[bytes], length: str | None = None) -> tuple[int, dict, dict, bytes]:
    """(status, response headers, the JSON part, the binary part) of a hand-made binary request."""
    head = json.dumps(header).encode()
    request = urllib.request.Request(url, data=head + b"".join(chunks), method="POST", headers={
        "Content-Type": "application/octet-stream", HEADER: length if length is not None else str(len(head))})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            status, headers, body = response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as err:
        status, headers, body = err.code, dict(err.headers), err.read()
    split = int(headers.get(HEADER, len(body)))
    return status, headers, json.loads(body[:split]), body[split:]


def test_server_metadata_advertises_the_binary_extension(mlp):
    server, client = mlp
    assert "binary_tensor_data" in client.get_server_metadata()["extensions"]
    assert client.is_server_live() and client.is_model_ready("mlp")


@pytest.mark.parametrize("batch", [1, 64])
def test_triton_http_client_binary_in_and_out_matches_onnxruntime(mlp, artifacts, batch):
    server, client = mlp
    x = np.random.default_rng(batch).normal(size=(batch, N_FEATURES)).astype(np.float32)
    expected = ort_run(artifacts[1], x)
    for binary_out in (True, False):
        result = client.infer("mlp", triton_inputs({"input": x}), request_id=f"b{batch}",
                              outputs=[th.InferRequestedOutput("logits", binary_data=binary_out)])
        np.testing.assert_array_equal(result.as_numpy("logits"), expected)
        response = result.get_response()
        assert response["id"] == f"b{batch}" and response["model_version"] == "1"
        (out,) = response["outputs"]
        assert out["datatype"] == "FP32" and out["shape"] == list(expected.shape)
        assert ("data" not in out) == binary_out
        if binary_out:
            assert out["parameters"] == {"binary_data_size": expected.nbytes}
    # no outputs named: the Triton client asks for binary_data_output, and gets every output binary
    result = client.infer("mlp", triton_inputs({"input": x}))
    np.testing.assert_array_equal(result.as_numpy("logits"), expected)
    assert "data" not in result.get_response()["outputs"][0]


def test_binary_inputs_are_captured_like_json_ones(mlp):
    server, client = mlp
    x = np.random.default_rng(3).normal(size=(7, N_FEATURES)).astype(np.float32)
    client.infer("mlp", triton_inputs({"input": x}))
    deadline = time.monotonic() + 20
    while True:
        rows = capture.read_newest(server.capture, 7)
        if rows is not None and np.array_equal(rows, x):
            break
        assert time.monotonic() < deadline, "binary rows not captured"
        time.sleep(0.02)


@pytest.mark.parametrize("batch", [1, 5])
def test_five_datatypes_binary_and_mixed_with_json(multi, batch):
    server, artifact, client = multi
    feeds = arrays(batch, seed=batch)
    expected = direct(artifact, feeds)
    for binary in (True, {"scale", "flag"}, {"input_ids", "dense"}):  # all binary, or mixed with JSON data
        result = client.infer("multi", triton_inputs(feeds, binary), outputs=[
            th.InferRequestedOutput("outputs", binary_data=True), th.InferRequestedOutput("tokens", binary_data=False)])
        np.testing.assert_array_equal(result.as_numpy("outputs"), expected["outputs"])
        np.testing.assert_array_equal(result.as_numpy("tokens"), expected["tokens"])
        outs = {o["name"]: o for o in result.get_response()["outputs"]}
        assert "data" not in outs["outputs"] and outs["tokens"]["data"] == expected["tokens"].reshape(-1).tolist()


def test_request_level_binary_data_output_with_a_per_output_override(multi):
    server, artifact, _ = multi
    feeds = arrays(2, seed=4)
    expected = direct(artifact, feeds)
    header = {"parameters": {"binary_data_output": True},
              "inputs": [{"name": n, "datatype": INPUTS[n][1], "shape": list(a.shape),
                          "parameters": {"binary_data_size": a.nbytes}} for n, a in feeds.items()],
              "outputs": [{"name": "outputs"}, {"name": "tokens", "parameters": {"binary_data": False}}]}
    status, headers, head, tail = post(server.infer_url(), header, [a.tobytes() for a in feeds.values()])
    assert status == 200, head
    assert headers["Content-Type"].startswith("application/octet-stream")
    outs = {o["name"]: o for o in head["outputs"]}
    assert outs["outputs"]["parameters"]["binary_data_size"] == len(tail) == expected["outputs"].nbytes
    np.testing.assert_array_equal(np.frombuffer(tail, np.float32).reshape(2, 1), expected["outputs"])
    assert outs["tokens"]["data"] == expected["tokens"].reshape(-1).tolist()
    # no binary output asked for: a plain JSON answer without the header
    header.pop("parameters")
    header["outputs"] = [{"name": "tokens"}]
    status, headers, head, tail = post(server.infer_url(), header, [a.tobytes() for a in feeds.values()])
    assert status == 200 and HEADER not in headers and tail == b"" and "data" in head["outputs"][0]


def _dense_only(multi_feeds, dense: bytes | None = None, **tensor):
    """A header and chunks for the multi model, every input binary; ``dense`` replaces the dense bytes."""
    header = {"inputs": [{"name": n, "datatype": INPUTS[n][1], "shape": list(a.shape),
                          "parameters": {"binary_data_size": a.nbytes}} for n, a in multi_feeds.items()]}
    chunks = [a.tobytes() for a in multi_feeds.values()]
    if dense is not None:
        chunks[-1] = dense
        header["inputs"][-1]["parameters"]["binary_data_size"] = len(dense)
    header["inputs"][-1].update(tensor)
    return header, chunks


ONE = arrays(1)
BAD = [  # (what, header, chunks, Inference-Header-Content-Length or None, expected message)
    ("NaN", *_dense_only(ONE, np.array([[np.inf, 0, 0]], np.float32).tobytes()), None,
     "input 'dense': NaN or infinite values are not accepted"),
    ("size off the shape", *_dense_only(ONE, b"\0" * 8), None,
     "input 'dense': 8 bytes of binary data given, shape [1, 3] of FP32 needs 12"),
    ("size past the end", _dense_only(ONE)[0], _dense_only(ONE)[1][:-1], None,
     "input 'dense': binary_data_size 12 goes past the end of the binary data"),
    ("bytes left over", _dense_only(ONE)[0], [*_dense_only(ONE)[1], b"\0\0"], None,
     "2 bytes of binary data are not claimed by any input's binary_data_size"),
    ("data and binary_data_size", *_dense_only(ONE, data=[0.0, 0.0, 0.0]), None,
     "input 'dense': both 'data' and binary_data_size are given"),
    ("negative size", *_dense_only(ONE, parameters={"binary_data_size": -1}), None,
     "input 'dense': binary_data_size must be a non-negative integer"),
    ("BOOL byte 7", _dense_only(ONE)[0], [b"\x07" if n == "flag" else c for n, c in zip(ONE, _dense_only(ONE)[1])],
     None,
     "input 'flag': BOOL binary data must hold only the bytes 0 and 1"),
    ("header length not a number", *_dense_only(ONE), "abc", "Inference-Header-Content-Length must be an integer"),
    ("header length past the body", *_dense_only(ONE), "999999", "Inference-Header-Content-Length must be"),
    ("header length cuts the JSON", *_dense_only(ONE), "10", "request body is not valid JSON"),
    ("binary_data not a flag", {**_dense_only(ONE)[0], "outputs": [{"name": "tokens", "parameters": {
        "binary_data": "yes"}}]}, _dense_only(ONE)[1], None, "output 'tokens': parameter binary_data must be true"),
    ("classification", {**_dense_only(ONE)[0], "outputs": [{"name": "tokens", "parameters": {
        "classification": 2}}]}, _dense_only(ONE)[1], None, "the classification extension is not supported"),
]


@pytest.mark.parametrize("what, header, chunks, length, message", BAD, ids=[b[0] for b in BAD])
def test_malformed_binary_requests_get_400_with_a_message(multi, what, header, chunks, length, message):
    server, _, _ = multi
    status, _, head, _ = post(server.infer_url(), header, chunks, length)
    assert status == 400, (what, head)
    assert message in head["error"], head["error"]
    assert http("GET", f"{server.url}/v2/health/ready")[0] == 200


def test_the_triton_client_sees_the_error_message(multi):
    _, _, client = multi
    feeds = arrays(1)
    feeds["dense"] = np.array([[np.nan, 0, 0]], np.float32)
    with pytest.raises(InferenceServerException, match="input 'dense': NaN or infinite values are not accepted"):
        client.infer("multi", triton_inputs(feeds))
