"""Several named inputs of any dtype: .npz files checked against the declared inputs, the validation hold-out,
ONNX Runtime feeds, and source formats refused before anything heavy runs."""

from __future__ import annotations

import numpy as np
import pytest

from kompressor.api.spec import InputSpec
from kompressor.errors import UserError
from kompressor_jobs.data import load_dataset, split_validation

TOKENS = [InputSpec(name="input_ids", dtype="int64", shape=[6]), InputSpec(name="attention_mask", dtype="int64",
                                                                           shape=[6])]


def token_file(tmp_path, name="tokens.npz", rows=20, **override):
    rng = np.random.default_rng(0)
    arrays = {"input_ids": rng.integers(0, 1000, size=(rows, 6)), "attention_mask": np.ones((rows, 6), np.int64),
              "y": np.arange(rows) % 2}
    arrays.update(override)
    arrays = {k: v for k, v in arrays.items() if v is not None}
    path = tmp_path / name
    np.savez(path, **arrays)
    return path


def test_token_inputs_keep_their_dtype_and_order(tmp_path):
    path = token_file(tmp_path, input_ids=np.arange(120, dtype=np.int32).reshape(20, 6))
    data = load_dataset(f"file://{path}", TOKENS, "classification", num_classes=2)
    assert list(data.inputs) == ["input_ids", "attention_mask"]
    assert all(a.dtype == np.int64 and a.shape == (20, 6) for a in data.inputs.values())
    assert data.inputs["input_ids"][3].tolist() == list(range(18, 24))
    feed = data.feed(2, 5)
    assert list(feed) == ["input_ids", "attention_mask"] and feed["input_ids"].shape == (3, 6)
    with pytest.raises(UserError, match="the model has 2 inputs"):
        data.X
    sub = data.subset([4, 1])
    assert sub.inputs["input_ids"][0].tolist() == data.inputs["input_ids"][4].tolist()
    assert sub.y.tolist() == [0, 1] and sub.digest != data.digest


@pytest.mark.parametrize("case,override,inputs,expected", [
    ("missing input", {"attention_mask": None}, TOKENS, ["attention_mask", "int64"]),
    ("float token ids", {"input_ids": np.zeros((20, 6), np.float32)}, TOKENS, ["input_ids", "float32", "int64"]),
    ("wrong shape", {"attention_mask": np.ones((20, 5), np.int64)}, TOKENS, ["attention_mask", "[5]", "[6]"]),
    ("ids beyond int32", {"input_ids": np.full((20, 6), 2**40)},
     [InputSpec(name="input_ids", dtype="int32", shape=[6]), TOKENS[1]], ["input_ids", "int32"]),
    ("bool from 0..2", {"attention_mask": np.full((20, 6), 2)},
     [TOKENS[0], InputSpec(name="attention_mask", dtype="bool", shape=[6])], ["attention_mask", "bool"]),
    ("NaN in a float input", {"x": np.full((20, 3), np.nan, np.float32)},
     [InputSpec(name="x", dtype="float32", shape=[3])], ["x", "NaN"]),
    ("rows differ", {"attention_mask": np.ones((19, 6), np.int64)}, TOKENS, ["attention_mask", "19 rows"]),
])
def test_data_not_matching_the_declared_inputs_names_input_dtype_and_file(tmp_path, case, override, inputs,
                                                                           expected):
    path = token_file(tmp_path, **override)
    with pytest.raises(UserError) as err:
        load_dataset(f"file://{path}", inputs, "classification")
    for part in [*expected, str(path)]:
        assert part in str(err.value), (case, str(err.value))


def test_bool_inputs_accept_zero_one_integers_and_tasks_shape_targets(tmp_path):
    mask = InputSpec(name="attention_mask", dtype="bool", shape=[6])
    path = token_file(tmp_path, y=np.linspace(0, 1, 20))
    data = load_dataset(f"file://{path}", [TOKENS[0], mask], "regression")
    assert data.inputs["attention_mask"].dtype == np.bool_ and data.y.dtype == np.float32
    unlabelled = token_file(tmp_path, "unlabelled.npz", y=None)
    assert load_dataset(f"file://{unlabelled}", TOKENS, "embedding").y is None
    with pytest.raises(UserError, match="no y"):
        load_dataset(f"file://{unlabelled}", TOKENS, "classification")


def test_one_declared_input_reads_X_whatever_its_name(tmp_path):
    path = tmp_path / "x.npz"
    np.savez(path, X=np.ones((4, 2, 3)), y=np.zeros(4, int))
    data = load_dataset(f"file://{path}", [InputSpec(name="pixels", dtype="float16", shape=[2, 3])])
    assert list(data.inputs) == ["pixels"] and data.inputs["pixels"].dtype == np.float16
    assert data.X.shape == (4, 2, 3)


def test_validation_split_is_seeded_stratified_and_disjoint():
    train = load_dataset("builtin://digits?split=train")
    rest, validation = split_validation(train, 0.2, seed=3)
    again_rest, again_val = split_validation(train, 0.2, seed=3)
    assert np.array_equal(validation.X, again_val.X) and validation.digest == again_val.digest
    assert len(rest) + len(validation) == len(train)
    assert abs(len(validation) - 0.2 * len(train)) <= 1
    # stratified: each class's share of the validation rows is its share of train, to within one row
    for label in range(10):
        expected = (train.y == label).mean() * len(validation)
        assert abs((validation.y == label).sum() - expected) <= 1
    seen = {r.tobytes() for r in rest.X}
    assert not any(r.tobytes() in seen for r in validation.X)
    other = split_validation(train, 0.2, seed=4)[1]
    assert not np.array_equal(other.X, validation.X)


def _two_input_onnx(path):
    """ids (int64) and scale (float32) -> float32 logits = cast(ids) * scale, built with onnx.helper."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Cast", ["ids"], ["f"], to=TensorProto.FLOAT), helper.make_node("Mul", ["f", "scale"],
                                                                                          ["logits"])],
        "two", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", 3]),
                helper.make_tensor_value_info("scale", TensorProto.FLOAT, ["batch", 3])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_runtime_feeds_by_name_and_casts_to_the_graph_types(tmp_path):
    from kompressor_jobs.runtime import io_signature, run, session

    path = _two_input_onnx(tmp_path / "two.onnx")
    sess = session(path, threads=1)
    out = run(sess, {"scale": np.full((2, 3), 2.0), "ids": np.array([[1, 2, 3], [4, 5, 6]], dtype=np.int32)})
    assert out.dtype == np.float32 and out.tolist() == [[2, 4, 6], [8, 10, 12]]
    with pytest.raises(UserError, match="2 inputs"):
        run(sess, np.zeros((1, 3)))
    with pytest.raises(UserError, match="no array for the model's input scale"):
        run(sess, {"ids": np.zeros((1, 3), np.int64)})
    signature = io_signature(path)
    assert [(i["name"], i["dtype"], i["shape"]) for i in signature["inputs"]] == [
        ("ids", "int64", [-1, 3]), ("scale", "float32", [-1, 3])]
    assert signature["input"] == signature["inputs"][0] and signature["outputs"][0]["name"] == "logits"


def test_onnx_source_inputs_come_from_the_graph_and_must_match_the_spec(tmp_path):
    from kompressor_jobs.models import load_source

    path = _two_input_onnx(tmp_path / "two.onnx")
    source = load_source(f"file://{path}", None)
    assert source.format == "onnx" and source.module is None and source.onnx_path == path
    assert [(i.name, i.dtype, i.shape) for i in source.inputs] == [("ids", "int64", [3]), ("scale", "float32", [3])]
    assert source.output_dim == 3
    declared = [InputSpec(name="scale", dtype="float32", shape=[3]), InputSpec(name="ids", dtype="int64", shape=[3])]
    assert [i.name for i in load_source(f"file://{path}", declared).inputs] == ["ids", "scale"]  # graph order
    for inputs, expected in [
        ([InputSpec(name="ids", dtype="int64", shape=[3]), InputSpec(name="mask", dtype="int64", shape=[3])],
         ["mask", "scale"]),
        ([InputSpec(name="ids", dtype="int32", shape=[3]), declared[0]], ["ids", "int64", "int32"]),
        ([InputSpec(name="ids", dtype="int64", shape=[4]), declared[0]], ["ids", "[4]"]),
    ]:
        with pytest.raises(UserError) as err:
            load_source(f"file://{path}", inputs)
        assert all(e in str(err.value) for e in expected), str(err.value)


def test_hugging_face_folders_without_safe_weights_are_refused_unread(tmp_path):
    import pickle

    from kompressor_jobs.models import load_source

    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "bert"}')
    (folder / "tokenizer.json").write_text("{}")
    with pytest.raises(UserError, match="has no weights: no model.safetensors") as err:
        load_source(f"file://{folder}", None)
    assert str(folder) in str(err.value)

    marker = tmp_path / "unpickled"

    class Payload:  # unpickling this would create the marker file
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(UserError, match=r"only pickled weights \(pytorch_model.bin\)"):
        load_source(f"file://{folder}", None, format="huggingface")
    assert not marker.exists()


def test_formats_are_told_apart_by_the_file(tmp_path):
    from kompressor_jobs.models import load_source

    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="folder without config.json"):
        load_source(f"file://{tmp_path}/empty", None)
    (tmp_path / "model.bin").write_bytes(b"\x00" * 16)
    with pytest.raises(UserError, match="cannot tell the model's format"):
        load_source(f"file://{tmp_path}/model.bin", [4])
    with pytest.raises(UserError, match="not a readable ONNX model"):
        load_source(f"file://{tmp_path}/model.bin", [4], format="onnx")
    with pytest.raises(UserError, match="model file not found"):
        load_source(f"file://{tmp_path}/missing.onnx", [4])
