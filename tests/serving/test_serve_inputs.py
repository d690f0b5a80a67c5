"""OIP v2 with several named inputs of the INT64, INT32, FP16, BOOL and FP32 datatypes (a text model's
token ids and mask, a half-precision feature, a flag, dense features), served by a real `kompressor serve`
process; the model is built op by op in the test, so the expected outputs come from a direct ONNX Runtime run
on the same arrays. Bad requests get 400 with a message naming the input and the datatype."""

from __future__ import annotations

import asyncio

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from kompressor.store import MODEL_FILE, write_manifest
from serving_support import Server, http

TOKENS = 4
INPUTS = {  # name: (ONNX type, OIP datatype, numpy dtype, shape without the batch)
    "input_ids": (TensorProto.INT64, "INT64", np.int64, [TOKENS]),
    "attention_mask": (TensorProto.INT32, "INT32", np.int32, [TOKENS]),
    "scale": (TensorProto.FLOAT16, "FP16", np.float16, [1]),
    "flag": (TensorProto.BOOL, "BOOL", np.bool_, [1]),
    "dense": (TensorProto.FLOAT, "FP32", np.float32, [3]),
}


def build(folder):
    """outputs = sum(ids * mask) * scale + flag + sum(dense); tokens = sum(mask) as INT64."""
    f = TensorProto.FLOAT
    nodes = [
        helper.make_node("Cast", ["input_ids"], ["ids_f"], to=f),
        helper.make_node("Cast", ["attention_mask"], ["mask_f"], to=f),
        helper.make_node("Cast", ["scale"], ["scale_f"], to=f),
        helper.make_node("Cast", ["flag"], ["flag_f"], to=f),
        helper.make_node("Mul", ["ids_f", "mask_f"], ["masked"]),
        helper.make_node("ReduceSum", ["masked", "axis1"], ["token_sum"], keepdims=1),
        helper.make_node("Mul", ["token_sum", "scale_f"], ["scaled"]),
        helper.make_node("ReduceSum", ["dense", "axis1"], ["dense_sum"], keepdims=1),
        helper.make_node("Add", ["scaled", "flag_f"], ["partial"]),
        helper.make_node("Add", ["partial", "dense_sum"], ["outputs"]),
        helper.make_node("Cast", ["attention_mask"], ["mask_i"], to=TensorProto.INT64),
        helper.make_node("ReduceSum", ["mask_i", "axis1"], ["tokens"], keepdims=1),
    ]
    inputs = [helper.make_tensor_value_info(n, t, ["batch", *shape]) for n, (t, _, _, shape) in INPUTS.items()]
    outputs = [helper.make_tensor_value_info("outputs", f, ["batch", 1]),
               helper.make_tensor_value_info("tokens", TensorProto.INT64, ["batch", 1])]
    graph = helper.make_graph(nodes, "multi", inputs, outputs,
                              [helper.make_tensor("axis1", TensorProto.INT64, [1], [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(folder / "model.onnx"))
    write_manifest(folder, {"revision": 3})
    return folder


@pytest.fixture(scope="module")
def multi(tmp_path_factory):
    root = tmp_path_factory.mktemp("multi")
    artifact = build(root / "artifact")
    server = Server(artifact, "multi", log=root / "server.log")
    yield server, artifact
    server.stop()


def arrays(batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"input_ids": rng.integers(0, 30000, size=(batch, TOKENS)).astype(np.int64),
            "attention_mask": (rng.random((batch, TOKENS)) < 0.7).astype(np.int32),
            "scale": rng.uniform(0.5, 2, size=(batch, 1)).astype(np.float16),
            "flag": rng.random((batch, 1)) < 0.5,
            "dense": rng.normal(size=(batch, 3)).astype(np.float32)}


def body(feeds: dict[str, np.ndarray], **override) -> dict:
    tensors = []
    for name, a in feeds.items():
        tensor = {"name": name, "datatype": INPUTS[name][1], "shape": list(a.shape), "data": a.reshape(-1).tolist()}
        tensor.update(override.get(name, {}))
        tensors.append(tensor)
    return {"inputs": tensors}


def direct(artifact, feeds):
    import onnxruntime as ort

    session = ort.InferenceSession(str(artifact / "model.onnx"), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))


def test_metadata_lists_every_input_with_its_datatype(multi):
    server, _ = multi
    status, meta = http("GET", f"{server.url}/v2/models/multi")
    assert status == 200
    assert [(i["name"], i["datatype"], i["shape"]) for i in meta["inputs"]] == [
        (n, dt, [-1, *shape]) for n, (_, dt, _, shape) in INPUTS.items()]
    assert [(o["name"], o["datatype"]) for o in meta["outputs"]] == [("outputs", "FP32"), ("tokens", "INT64")]


@pytest.mark.parametrize("batch", [1, 5])
def test_several_inputs_of_five_datatypes_match_onnxruntime(multi, batch):
    server, artifact = multi
    feeds = arrays(batch, seed=batch)
    status, out = http("POST", server.infer_url(), body(feeds))
    assert status == 200, out
    expected = direct(artifact, feeds)
    got = {o["name"]: o for o in out["outputs"]}
    assert got["outputs"]["datatype"] == "FP32" and got["tokens"]["datatype"] == "INT64"
    np.testing.assert_array_equal(np.asarray(got["outputs"]["data"], np.float32).reshape(batch, 1),
                                  expected["outputs"])
    np.testing.assert_array_equal(np.asarray(got["tokens"]["data"], np.int64).reshape(batch, 1), expected["tokens"])
    # inputs may come in any order (they are matched by name), and exact conversions are accepted:
    # token ids as INT32, the FP16 scale as FP32 numbers
    reordered = body(dict(reversed(list(feeds.items()))),
                     input_ids={"datatype": "INT32"}, scale={"datatype": "FP32"})
    status, again = http("POST", server.infer_url(), reordered)
    assert status == 200, again
    assert again["outputs"] == out["outputs"]


def bad(multi, feeds, **override):
    server, _ = multi
    return http("POST", server.infer_url(), body(feeds, **override))


@pytest.mark.parametrize("override, message", [
    ({"flag": {"datatype": "INT64", "data": [1]}}, "input 'flag': datatype INT64 cannot be converted to the "
                                                    "model's BOOL"),
    ({"flag": {"data": [1]}}, "input 'flag': datatype BOOL needs true/false values"),
    ({"attention_mask": {"data": [True, False, True, True]}}, "input 'attention_mask': booleans given for "
                                                               "datatype INT32"),
    ({"input_ids": {"data": [1.5, 2, 3, 4]}}, "input 'input_ids': non-integer values given for datatype INT64"),
    ({"attention_mask": {"data": [2 ** 31, 0, 0, 0]}}, "input 'attention_mask': values outside the range of INT32"),
    ({"input_ids": {"datatype": "INT32", "data": [2 ** 40, 0, 0, 0]}}, "input 'input_ids': values outside the "
                                                                         "range of INT32"),
    ({"scale": {"data": [70000.0]}}, "input 'scale': values overflow FP16"),
    ({"scale": {"datatype": "FP32", "data": [1e30]}}, "input 'scale': FP32 values cannot be converted to the "
                                                       "model's FP16"),
    ({"dense": {"datatype": "BYTES"}}, "input 'dense': datatype BYTES is not accepted; the model takes FP32"),
    ({"dense": {"datatype": "FP8"}}, "input 'dense': unknown datatype 'FP8'"),
    ({"attention_mask": {"shape": [1, TOKENS + 1], "data": [1] * (TOKENS + 1)}},
     "input 'attention_mask': shape [1, 5] does not fit the model's [-1, 4]"),
    ({"dense": {"shape": [2, 3], "data": [0.0] * 6}}, "inputs disagree on the batch size: [1, 2]"),
])
def test_bad_inputs_get_400_naming_the_input_and_datatype(multi, override, message):
    status, out = bad(multi, arrays(1), **override)
    assert status == 400, out
    assert message in out["error"], out["error"]


def test_missing_and_unknown_inputs_are_named(multi):
    server, _ = multi
    feeds = arrays(1)
    del feeds["flag"]
    status, out = http("POST", server.infer_url(), body(feeds))
    assert status == 400 and out["error"] == "missing input(s): flag"
    extra = body(arrays(1))
    extra["inputs"].append({"name": "token_type_ids", "datatype": "INT64", "shape": [1, TOKENS], "data": [0] * 4})
    status, out = http("POST", server.infer_url(), extra)
    assert status == 400 and "input 'token_type_ids' is not an input of the model" in out["error"]
    assert "input_ids, attention_mask, scale, flag, dense" in out["error"]


def test_the_embedded_oip_client_sends_several_inputs_in_their_datatypes(multi):
    import aiohttp

    from kompressor.embedded.oip_client import OIPClient, OIPError

    server, artifact = multi
    feeds = arrays(3, seed=9)
    expected = direct(artifact, feeds)

    async def main():
        async with aiohttp.ClientSession() as http_session:
            client = OIPClient(server.url, "multi", http_session)
            result = await client.infer_tensors({k: v.tolist() for k, v in feeds.items()}, request_id="c1")
            with pytest.raises(OIPError, match="input 'flag': datatype BOOL needs true/false values"):
                await client.infer_tensors({**{k: v.tolist() for k, v in feeds.items()},
                                            "flag": [[1], [0], [1]]})
            return result

    result = asyncio.run(main())
    assert result.model_version == "3"
    assert result.datatypes == {"outputs": "FP32", "tokens": "INT64"}
    np.testing.assert_array_equal(np.asarray(result.tensors["outputs"], np.float32), expected["outputs"])
    np.testing.assert_array_equal(np.asarray(result.tensors["tokens"], np.int64), expected["tokens"])


def test_the_server_pins_threads_by_the_same_rule_as_the_evaluation(multi, tmp_path, monkeypatch):
    """The server's ONNX Runtime threads follow its Pod's CPU limit (cgroup), as the evaluation Job's latency
    measurement does for spec.serving.resources.limits.cpu: one rule (kompressor_jobs.runtime.ort_threads)."""
    from kompressor_jobs import runtime
    from kompressor_jobs.serve.model import LoadedModel

    _, artifact = multi
    monkeypatch.delenv("KOMPRESSOR_ORT_THREADS", raising=False)
    cpu_max = tmp_path / "cpu.max"
    cpu_max.write_text("250000 100000\n")  # a 2.5-CPU limit
    monkeypatch.setattr(runtime, "CGROUP_CPU_MAX", cpu_max)
    model = LoadedModel(artifact)
    assert model.threads == 2 == model.session.get_session_options().intra_op_num_threads
    assert runtime.ort_threads("2500m", env={}, own_cgroup=False) == model.threads
    # and its threads wait without spinning, as the evaluation's sessions do (runtime.session_options)
    served = model.session.get_session_options()
    measured = runtime.session(artifact / MODEL_FILE, 2).get_session_options()
    for key in runtime.NO_SPINNING:
        assert served.get_session_config_entry(key) == "0" == measured.get_session_config_entry(key)
    monkeypatch.setenv("KOMPRESSOR_ORT_THREADS", "1")
    assert LoadedModel(artifact).session.get_session_options().intra_op_num_threads == 1
