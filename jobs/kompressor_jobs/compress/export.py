"""ONNX export of a PyTorch module, with a parity check against ONNX Runtime."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from kompressor.errors import UserError
from kompressor_jobs.runtime import run, session

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
OPSET = 17
PARITY_ATOL = 1e-4
PARITY_RTOL = 1e-3


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
