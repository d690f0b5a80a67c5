"""ONNX export of a PyTorch module (several named inputs of any dtype, dynamic batch), with a parity check
against ONNX Runtime on held-out rows."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from kompressor.errors import UserError
from kompressor_jobs.data import as_inputs
from kompressor_jobs.runtime import feed_for, session

INPUT_NAME = "input"  # the single input of the inputShape shorthand
OUTPUT_NAME = "logits"  # classification; other tasks' output is "outputs"
OUTPUTS_NAME = "outputs"
OPSET = 17
PARITY_ATOL = 1e-4
PARITY_RTOL = 1e-3


class ExportError(UserError):
    """The exported graph does not compute what the PyTorch model computes."""


def output_name(task: str = "classification") -> str:
    return OUTPUT_NAME if task == "classification" else OUTPUTS_NAME


class _Plain(nn.Module):
    # The legacy exporter fails on an fx.GraphModule with dynamic axes; a plain wrapper works.
    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        return self.inner(*xs)


def _example(inputs, example: dict[str, np.ndarray] | None) -> tuple[torch.Tensor, ...]:
    from kompressor_jobs.models.torch_export import NUMPY_OF

    tensors = []
    for i in inputs:
        if example is not None and i.name in example and len(example[i.name]) >= 2:
            tensors.append(torch.from_numpy(np.ascontiguousarray(example[i.name][:2])).to(NUMPY_OF[i.dtype]))
        else:  # a batch of 2 keeps the batch dimension dynamic; ones are valid token ids and a full mask
            fill = 0 if i.dtype.startswith("float") else 1
            tensors.append(torch.full((2, *i.shape), fill, dtype=NUMPY_OF[i.dtype]))
    return tuple(tensors)


def export_onnx(module: nn.Module, inputs, path: Path, *, task: str = "classification",
                example: dict[str, np.ndarray] | None = None) -> None:
    """Export ``module`` (taking ``inputs`` positionally: InputSpecs, or a shape for one float32 input named
    "input") to ONNX with those input names, a dynamic batch dimension and one output ("logits" for
    classification, "outputs" otherwise). ``example``: rows to trace with (default: zeros / ones)."""
    inputs = as_inputs(inputs)
    module = module.cpu().eval()
    names = [i.name for i in inputs]
    out = output_name(task)
    with warnings.catch_warnings():  # the legacy exporter's deprecation notices are not actionable here
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(
            _Plain(module), _example(inputs, example), str(path), dynamo=False, opset_version=OPSET,
            input_names=names, output_names=[out],
            dynamic_axes={**{n: {0: "batch"} for n in names}, out: {0: "batch"}},
        )


@torch.no_grad()
def check_parity(module: nn.Module, onnx_path: Path, batch) -> float:
    """ORT vs PyTorch on a held-out batch (a feed: input name -> rows, or one array for a single-input model);
    raises ExportError beyond the tolerance. Returns the max abs diff."""
    sess = session(onnx_path, threads=1)
    feed = feed_for(sess, batch)
    ordered = [torch.from_numpy(np.ascontiguousarray(feed[i.name])) for i in sess.get_inputs()]
    expected = module.cpu().eval()(*ordered).numpy()
    actual = sess.run(None, feed)[0]
    rows = len(ordered[0]) if ordered else 0
    diff = float(np.abs(actual - expected).max()) if expected.size and actual.shape == expected.shape else float("inf")
    if actual.shape != expected.shape or not np.allclose(actual, expected, atol=PARITY_ATOL, rtol=PARITY_RTOL):
        raise ExportError(f"ONNX parity check failed: ONNX Runtime and PyTorch outputs differ by up to {diff:.3g} "
                          f"(tolerance atol={PARITY_ATOL}, rtol={PARITY_RTOL}) on {rows} held-out rows")
    return diff if expected.size else 0.0
