"""ONNX Runtime sessions and facts read back from an ONNX graph. No torch: evaluation, serving and
quantization of an ONNX source run without it."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from kompressor.errors import UserError


def session(path: Path, threads: int | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    threads = threads if threads is not None else int(os.environ.get("KOMPRESSOR_ORT_THREADS") or 0)
    options.intra_op_num_threads = threads  # 0: ONNX Runtime's default (one per core)
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as err:  # noqa: BLE001 - a corrupt/foreign file fails in several ways
        raise UserError(f"{path}: ONNX Runtime cannot load the model: {str(err).splitlines()[0]}") from None


def run(sess, X: np.ndarray) -> np.ndarray:
    return sess.run(None, {sess.get_inputs()[0].name: X.astype(np.float32, copy=False)})[0]


def graph_sparsity(path: Path) -> tuple[float, int]:
    """Fraction of exact zeros among the weight tensors (initializers of rank >= 2) and their element
    count. Quantized weights are symmetric int8 (zero point 0), so their zeros are exact zeros too."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    zeros = total = 0
    for init in model.graph.initializer:
        if len(init.dims) < 2:
            continue
        values = numpy_helper.to_array(init)
        if values.dtype.kind not in "fiu":
            continue
        zeros += int((values == 0).sum())
        total += values.size
    return (zeros / total if total else 0.0), total


def io_signature(path: Path) -> dict:
    """Input/output names, shapes (batch as -1) and dtypes: what the server needs."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)

    def describe(value) -> dict:
        tensor = value.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name
        return {"name": value.name, "shape": shape, "dtype": dtype}

    return {"input": describe(model.graph.input[0]), "output": describe(model.graph.output[0])}
