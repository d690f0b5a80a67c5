"""Post-training quantization with onnxruntime.quantization."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from kompressor_jobs.compress.export import INPUT_NAME

CALIBRATION_ROWS = 256
CALIBRATION_BATCH = 32


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
