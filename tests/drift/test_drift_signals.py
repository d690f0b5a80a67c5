"""`spec.drift.signal`: the watcher tests the model's outputs (prediction drift: predicted classes with
chisquare, class probabilities with KS) or its output vectors (embeddings) instead of the inputs, against the
served model's outputs on the reference data (ONNX Runtime in the watcher). A text model (integer inputs)
defaults to outputs. The capture keeps several named inputs in their own dtypes (int64, float16, bool) and the
outputs beside them."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from kompressor.cli import main as kompressor
from kompressor.store import write_manifest
from kompressor_jobs import capture
from kompressor_jobs.capture import CaptureWriter
from serving_support import Server, http, metric_value

pytestmark = pytest.mark.slow

TOKENS, VOCAB, CLASSES = 6, 100, 3
INPUTS = [{"name": "input_ids", "dtype": "int64", "shape": [TOKENS]},
          {"name": "attention_mask", "dtype": "bool", "shape": [TOKENS]}]


def token_model(folder, revision=1):
    """A tiny 'text classifier' written with onnx.helper (no torch): logits = (ids * mask) @ W + b, so the
    predicted class follows the token ids."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = rng.normal(size=(TOKENS, CLASSES)).astype(np.float32) / VOCAB
    w[:, 0] += 2.0 / VOCAB  # high token ids favour class 0
    b = np.array([-6.0, 0.0, 0.0], np.float32)  # a mix of classes on the reference, class 0 on high ids
    nodes = [helper.make_node("Cast", ["input_ids"], ["ids_f"], to=TensorProto.FLOAT),
             helper.make_node("Cast", ["attention_mask"], ["mask_f"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["ids_f", "mask_f"], ["masked"]),
             helper.make_node("MatMul", ["masked", "W"], ["mm"]),
             helper.make_node("Add", ["mm", "B"], ["logits"])]
    graph = helper.make_graph(
        nodes, "tokens",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", TOKENS]),
         helper.make_tensor_value_info("attention_mask", TensorProto.BOOL, ["batch", TOKENS])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", CLASSES])],
        initializer=[numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(model, folder / "model.onnx")
    write_manifest(folder, {"revision": revision})
    return folder


def token_rows(rng, n, shifted=False):
    low = VOCAB // 2 if shifted else 0
    ids = rng.integers(low, VOCAB, size=(n, TOKENS)).astype(np.int64)
    mask = np.ones((n, TOKENS), bool)
    mask[:, -1] = rng.random(n) < 0.7
    return {"input_ids": ids, "attention_mask": mask}


def spec_file(folder, reference, **drift):
    doc = {"apiVersion": "kompressor.io/v1alpha1", "kind": "CompressedModel",
           "metadata": {"name": "text", "namespace": "default"},
           "spec": {"model": {"uri": "file:///models/text.onnx", "format": "onnx", "inputs": INPUTS},
                    "data": {"train": reference, "eval": reference},
                    "drift": {"windowSize": 100, **drift}}}
    path = folder / f"text-{abs(hash(str(drift)))}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A real `kompressor serve` of the token model: revision 1 gets token ids like the reference's,
    then (hot-swapped to revision 2, the same graph) shifted token ids. INT64 and BOOL over OIP v2."""
    root = tmp_path_factory.mktemp("signals")
    rng = np.random.default_rng(1)
    ref = token_rows(rng, 1000)
    np.savez(root / "reference.npz", **ref, y=np.zeros(1000, np.int64))
    artifacts = {r: token_model(root / f"r{r}", revision=r) for r in (1, 2)}
    folder = root / "capture"
    server = Server(artifacts[1], "text", capture=folder, log=root / "server.log")
    sent = {}
    try:
        for revision, shifted in ((1, False), (2, True)):
            if revision == 2:
                status, out = http("POST", f"{server.url}/v2/repository/models/text/load",
                                   {"parameters": {"artifact": str(artifacts[2])}})
                assert status == 200, out
            rows = token_rows(rng, 200, shifted)
            sent[revision] = rows
            for start in range(0, 200, 50):
                body = {"inputs": [
                    {"name": "input_ids", "datatype": "INT64", "shape": [50, TOKENS],
                     "data": rows["input_ids"][start:start + 50].reshape(-1).tolist()},
                    {"name": "attention_mask", "datatype": "BOOL", "shape": [50, TOKENS],
                     "data": rows["attention_mask"][start:start + 50].reshape(-1).tolist()}]}
                status, out = http("POST", server.infer_url(), body)
                assert status == 200, out
        _wait(lambda: metric_value(server.metrics(), "kompressor_capture_rows_total", model="text") == 400)
    finally:
        server.stop()
    return {"root": root, "capture": folder, "reference": f"file://{root / 'reference.npz'}",
            "artifacts": artifacts, "sent": sent}


def watch(spec, served, revision, sink, *extra) -> dict:
    argv = ["--json-logs", "watch-drift", "--spec", str(spec), "--capture", str(served["capture"]),
            "--verdict", str(sink), "--revision", str(revision), "--once",
            "--artifact", str(served["artifacts"][revision]), *extra]
    assert kompressor(argv) == 0
    return json.loads(sink.read_text())


def test_the_capture_keeps_named_inputs_in_their_dtypes_and_the_outputs(served):
    import onnxruntime as ort

    folder = served["capture"]
    records = [r for seg in capture.list_segments(folder) for r in capture.read_segment(seg.path)]
    assert records and all(r.dtype.names for r in records)
    joined = np.concatenate(records)
    assert joined.dtype["in:input_ids"].base == np.int64 and joined.dtype["in:input_ids"].shape == (TOKENS,)
    assert joined.dtype["in:attention_mask"].base == np.uint8  # bool, kept as 0/1
    sent = served["sent"]
    np.testing.assert_array_equal(joined["in:input_ids"],
                                  np.concatenate([sent[1]["input_ids"], sent[2]["input_ids"]]))
    np.testing.assert_array_equal(joined["in:attention_mask"].astype(bool),
                                  np.concatenate([sent[1]["attention_mask"], sent[2]["attention_mask"]]))
    session = ort.InferenceSession(str(served["artifacts"][2] / "model.onnx"), providers=["CPUExecutionProvider"])
    expected = session.run(None, sent[2])[0]
    outputs = capture.read_rows(folder, 2, 0, signal="outputs")
    np.testing.assert_allclose(outputs.values, expected, rtol=1e-6)
    assert list(outputs.sequences) == list(range(200, 400))
    inputs = capture.read_rows(folder, 1, 0)  # inputs as one float32 row each: ids then mask
    assert inputs.values.shape == (200, 2 * TOKENS) and inputs.values.dtype == np.float32


def test_float16_inputs_are_kept_as_float16(tmp_path):
    writer = CaptureWriter(tmp_path, 1 << 20)
    half = np.linspace(-2, 2, 12, dtype=np.float16).reshape(3, 4)
    writer.submit({"pixels": half, "flag": np.array([[True], [False], [True]])}, 1,
                  outputs={"scores": np.ones((3, 2), np.float32)})
    writer.close()
    [record] = capture.read_segment(capture.list_segments(tmp_path)[0].path)
    assert record.dtype["in:pixels"].base == np.float16
    np.testing.assert_array_equal(record["in:pixels"], half)
    np.testing.assert_array_equal(capture.read_rows(tmp_path, 1, 0).values[:, :4], half.astype(np.float32))


def test_a_text_model_defaults_to_prediction_drift(served, tmp_path):
    """Integer inputs: no KS test on token ids; the predicted classes are tested (chisquare)."""
    spec = spec_file(tmp_path, served["reference"], detector="chisquare")
    calm = watch(spec, served, 1, tmp_path / "calm.json")
    shifted = watch(spec, served, 2, tmp_path / "shifted.json")
    assert calm["signal"] == shifted["signal"] == "outputs"
    assert (calm["outcome"], shifted["outcome"]) == ("NoDrift", "Drift"), (calm, shifted)
    assert len(shifted["featurePValues"]) == 1  # one categorical feature: the predicted class
    assert shifted["samples"] == 100 and shifted["windows"] == 2 and shifted["consecutive"] == 2


def test_class_probabilities_with_ks_and_output_vectors_as_embeddings(served, tmp_path):
    for signal, features in (("outputs", CLASSES), ("embeddings", CLASSES)):
        spec = spec_file(tmp_path, served["reference"], detector="ks", signal=signal)
        calm = watch(spec, served, 1, tmp_path / f"{signal}-calm.json")
        shifted = watch(spec, served, 2, tmp_path / f"{signal}-shifted.json")
        assert calm["signal"] == shifted["signal"] == signal
        assert (calm["outcome"], shifted["outcome"]) == ("NoDrift", "Drift"), (signal, calm, shifted)
        assert len(shifted["featurePValues"]) == features


def test_inputs_can_still_be_chosen_and_outputs_need_the_artifact(served, tmp_path, capsys):
    spec = spec_file(tmp_path, served["reference"], detector="ks", signal="inputs")
    verdict = watch(spec, served, 2, tmp_path / "inputs.json")
    assert verdict["signal"] == "inputs" and len(verdict["featurePValues"]) == 2 * TOKENS
    outputs = spec_file(tmp_path, served["reference"], detector="ks", signal="outputs")
    code = kompressor(["--json-logs", "watch-drift", "--spec", str(outputs), "--capture", str(served["capture"]),
                       "--verdict", str(tmp_path / "none.json"), "--revision", "2", "--once"])
    assert code == 2 and "--artifact" in capsys.readouterr().err
    assert not (tmp_path / "none.json").exists()


def _wait(predicate, timeout: float = 30.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)
