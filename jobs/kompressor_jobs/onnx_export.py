"""ONNX export with a parity check, post-training quantization, and facts read back from the graph."""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from kompressor.errors import UserError

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
OPSET = 17
PARITY_ATOL = 1e-4
PARITY_RTOL = 1e-3
CALIBRATION_ROWS = 256
CALIBRATION_BATCH = 32


class ExportError(UserError):
    """The exported graph does not compute what the PyTorch model computes."""


class _Plain(nn.Module):
    # The legacy exporter fails on an fx.GraphModule with dynamic axes; a plain wrapper works.
    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


def export_onnx(module: nn.Module, input_shape: list[int], path: Path) -> None:
    module = module.cpu().eval()
    example = torch.zeros(2, *input_shape)
    with warnings.catch_warnings():  # the legacy exporter's deprecation notices are not actionable here
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            _Plain(module), (example,), str(path), dynamo=False, opset_version=OPSET,
            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
        )


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


@torch.no_grad()
def check_parity(module: nn.Module, onnx_path: Path, batch: np.ndarray) -> float:
    """ORT vs PyTorch on a held-out batch; raises ExportError beyond the tolerance. Returns the max abs diff."""
    expected = module.cpu().eval()(torch.from_numpy(batch)).numpy()
    actual = run(session(onnx_path, threads=1), batch)
    diff = float(np.abs(actual - expected).max()) if expected.size else 0.0
    if actual.shape != expected.shape or not np.allclose(actual, expected, atol=PARITY_ATOL, rtol=PARITY_RTOL):
        raise ExportError(f"ONNX parity check failed: ONNX Runtime and PyTorch outputs differ by up to {diff:.3g} "
                          f"(tolerance atol={PARITY_ATOL}, rtol={PARITY_RTOL}) on {len(batch)} held-out rows")
    return diff


def quantize(fp32_path: Path, out_path: Path, mode: str, calibration: np.ndarray) -> None:
    """dynamic-int8: int8 weights, activations quantized at run time. static-int8: QDQ, per-channel
    int8 weights, activation ranges calibrated on ``calibration`` (rows of the training data)."""
    from onnxruntime.quantization import (
        CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic, quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory(dir=out_path.parent) as tmp:
        pre = Path(tmp) / "preprocessed.onnx"
        quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=False)
        if mode == "dynamic-int8":
            quantize_dynamic(str(pre), str(out_path), weight_type=QuantType.QInt8)
            return
        if mode != "static-int8":
            raise ValueError(f"unknown quantization mode {mode!r}")

        class Reader(CalibrationDataReader):
            def __init__(self) -> None:
                rows = calibration[:CALIBRATION_ROWS]
                self.batches = iter([{INPUT_NAME: rows[i:i + CALIBRATION_BATCH]}
                                     for i in range(0, len(rows), CALIBRATION_BATCH)])

            def get_next(self):
                return next(self.batches, None)

        quantize_static(str(pre), str(out_path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)


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
