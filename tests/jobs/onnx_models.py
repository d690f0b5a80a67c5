"""Small ONNX models built op by op (no torch, no exporter), and artifact folders around them, so that the
evaluation can be tested on architectures and tasks it was not written for, with outputs known exactly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from kompressor.store import MODEL_FILE, write_manifest

OPSET = 17
FLOAT, INT64 = TensorProto.FLOAT, TensorProto.INT64


def save(nodes, inputs, outputs, initializers: dict[str, np.ndarray], path: Path) -> Path:
    graph = helper.make_graph(nodes, "test", inputs, outputs,
                              [numpy_helper.from_array(v, k) for k, v in initializers.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def linear(path: Path, weight: np.ndarray, bias: np.ndarray, output: str = "logits") -> Path:
    """outputs = input @ weight + bias (one float input "input")."""
    x = helper.make_tensor_value_info("input", FLOAT, ["batch", weight.shape[0]])
    y = helper.make_tensor_value_info(output, FLOAT, ["batch", weight.shape[1]])
    nodes = [helper.make_node("MatMul", ["input", "w"], ["h"]), helper.make_node("Add", ["h", "b"], [output])]
    return save(nodes, [x], [y], {"w": weight.astype(np.float32), "b": bias.astype(np.float32)}, path)


def two_input_regressor(path: Path, weight: np.ndarray, per_bucket: np.ndarray) -> Path:
    """A regressor with a float input and an int64 input: outputs = features @ weight + per_bucket[bucket]
    (the int64 input indexes a learned offset table, as a categorical embedding does)."""
    features = helper.make_tensor_value_info("features", FLOAT, ["batch", weight.shape[0]])
    bucket = helper.make_tensor_value_info("bucket", INT64, ["batch", 1])
    out = helper.make_tensor_value_info("outputs", FLOAT, ["batch", weight.shape[1]])
    nodes = [helper.make_node("MatMul", ["features", "w"], ["h"]),
             helper.make_node("Gather", ["table", "bucket"], ["rows"], axis=0),  # [batch, 1, outputs]
             helper.make_node("ReduceMean", ["rows"], ["offset"], axes=[1], keepdims=0),
             helper.make_node("Add", ["h", "offset"], ["outputs"])]
    return save(nodes, [features, bucket], [out],
                {"w": weight.astype(np.float32), "table": per_bucket.astype(np.float32)}, path)


def bag_of_tokens_embedder(path: Path, table: np.ndarray, projection: np.ndarray) -> Path:
    """A sentence embedder on int64 token ids: mean of the token embeddings, projected (no labels)."""
    ids = helper.make_tensor_value_info("input_ids", INT64, ["batch", "tokens"])
    out = helper.make_tensor_value_info("outputs", FLOAT, ["batch", projection.shape[1]])
    nodes = [helper.make_node("Gather", ["table", "input_ids"], ["emb"], axis=0),
             helper.make_node("ReduceMean", ["emb"], ["pooled"], axes=[1], keepdims=0),
             helper.make_node("MatMul", ["pooled", "proj"], ["outputs"])]
    return save(nodes, [ids], [out], {"table": table.astype(np.float32), "proj": projection.astype(np.float32)},
                path)


def matmul_chain(path: Path, width: int, depth: int, classes: int = 2, seed: int = 0) -> Path:
    """``depth`` width x width MatMul+Relu layers then a classifier: depth * width² + width * classes MACs."""
    rng = np.random.default_rng(seed)
    x = helper.make_tensor_value_info("input", FLOAT, ["batch", width])
    y = helper.make_tensor_value_info("logits", FLOAT, ["batch", classes])
    nodes, inits, prev = [], {}, "input"
    for i in range(depth):
        inits[f"w{i}"] = (rng.normal(size=(width, width)) / np.sqrt(width)).astype(np.float32)
        nodes += [helper.make_node("MatMul", [prev, f"w{i}"], [f"m{i}"]), helper.make_node("Relu", [f"m{i}"], [f"r{i}"])]
        prev = f"r{i}"
    inits["head"] = rng.normal(size=(width, classes)).astype(np.float32)
    nodes.append(helper.make_node("MatMul", [prev, "head"], ["logits"]))
    return save(nodes, [x], [y], inits, path)


def artifact(folder: Path, build, *, revision: int, inputs: list[dict], baseline: dict | None = None,
             achieved: dict | None = None, compression: dict | None = None) -> dict:
    """An artifact folder as `kompressor prune` writes one (model.onnx + a manifest with digests)."""
    folder.mkdir(parents=True, exist_ok=True)
    build(folder / MODEL_FILE)
    manifest = {"revision": revision, "role": "baseline" if revision == 0 else "candidate",
                "model": {"uri": f"file://{folder}/{MODEL_FILE}", "inputs": inputs}}
    if baseline is not None:
        manifest["baseline"] = baseline
    if achieved is not None:
        manifest["achieved"] = achieved
    if compression is not None:
        manifest["compression"] = compression
    return write_manifest(folder, manifest)


def baseline_and_candidate(tmp: Path, build_baseline, build_candidate, inputs: list[dict], **candidate_kw) -> Path:
    """Both artifacts; returns the candidate folder (its manifest names the baseline)."""
    base = artifact(tmp / "baseline", build_baseline, revision=0, inputs=inputs)
    artifact(tmp / "candidate", build_candidate, revision=1, inputs=inputs,
             baseline={"uri": (tmp / "baseline").as_uri(), "sha256": base["files"][MODEL_FILE]}, **candidate_kw)
    return tmp / "candidate"
