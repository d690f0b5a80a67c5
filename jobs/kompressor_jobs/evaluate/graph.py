"""Facts read from an ONNX graph without running it: parameters, MACs at batch 1, and what a pull of the
artifact folder costs (its gzip-compressed tar, as an OCI layer or a `tar czf` copy ships it). No torch."""

from __future__ import annotations

import gzip
import math
import tarfile
from pathlib import Path

import numpy as np

# Inputs of quantized ops that hold scales and zero points, not weights.
_QUANT_PARAMS = {
    "QuantizeLinear": (1, 2), "DequantizeLinear": (1, 2), "MatMulInteger": (2, 3), "ConvInteger": (2, 3),
    "QLinearMatMul": (1, 2, 4, 5, 6, 7), "QLinearConv": (1, 2, 4, 5, 6, 7), "DynamicQuantizeMatMul": (2, 3),
    "MatMulIntegerToFloat": (2, 3, 4, 5), "QAttention": (3, 4, 6, 7), "QGemm": (1, 2, 4, 5, 7, 8),
}
_WEIGHT_KINDS = "fiu"  # float weights, int8/uint8 quantized weights (int64/int32 shapes are excluded below)


def parameter_count(model) -> int:
    """Elements of the weight initializers: float tensors and 8-bit quantized tensors, excluding the
    scales and zero points of quantized ops and integer constants (shapes, indices, axes)."""
    quant = set()
    for node in model.graph.node:
        for pos in _QUANT_PARAMS.get(node.op_type, ()):
            if pos < len(node.input):
                quant.add(node.input[pos])
    total = 0
    for init in model.graph.initializer:
        if init.name in quant or init.name.endswith(("_scale", "_zero_point")):
            continue
        if not init.dims:  # scalar constants (epsilons, exponents) are not weights
            continue
        dtype = _dtype(init)
        if dtype.kind not in _WEIGHT_KINDS or (dtype.kind in "iu" and dtype.itemsize > 1):
            continue
        total += math.prod(init.dims)
    return int(total)


def _dtype(init) -> np.dtype:
    import onnx

    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(init.data_type))


SMALL_INITIALIZER = 4096  # elements; larger initializers are weights, whose values shape inference never needs


def _fixed(model, shapes: dict[str, list[int]]):
    """A light copy of the model with each graph input's shape fixed (batch 1, the data's sample shape); large
    initializers become typed inputs of the same shape, so shape inference need not copy the weights."""
    import onnx
    from onnx import helper

    fixed = onnx.ModelProto()
    graph = model.graph
    fixed.CopyFrom(helper.make_model(helper.make_graph([], graph.name, [], []), opset_imports=model.opset_import))
    fixed.ir_version = model.ir_version
    fixed.graph.node.extend(graph.node)
    fixed.graph.output.extend(graph.output)
    fixed.graph.input.extend(graph.input)
    fixed.functions.extend(model.functions)
    declared = {v.name for v in graph.input}
    for init in graph.initializer:
        if math.prod(init.dims) <= SMALL_INITIALIZER:
            fixed.graph.initializer.append(init)
        elif init.name not in declared:
            fixed.graph.input.append(helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    initializers = {i.name for i in graph.initializer}
    for value in fixed.graph.input:
        if value.name in initializers:
            continue
        dims = value.type.tensor_type.shape.dim
        shape = shapes.get(value.name)
        if shape is None or len(shape) != len(dims):
            shape = [1] + [d.dim_value or 1 for d in list(dims)[1:]]
        for dim, size in zip(dims, shape):
            dim.Clear()
            dim.dim_value = int(size)
    return fixed


def _infer(model, symbolic: bool):
    """onnx's shape inference; ONNX Runtime's symbolic one (it knows the com.microsoft ops that the transformer
    optimizer and quantizer emit, but imports sympy, seconds) only where onnx's leaves a counted op unknown."""
    import onnx

    if symbolic:
        try:
            from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

            return SymbolicShapeInference.infer_shapes(model, auto_merge=True, guess_output_rank=True)
        except Exception:  # noqa: BLE001 - an op it does not know: keep onnx's answer
            pass
    try:
        return onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception:  # noqa: BLE001
        return model


def _shapes(model) -> dict[str, list[int] | None]:
    out: dict[str, list[int] | None] = {}
    for value in [*model.graph.input, *model.graph.value_info, *model.graph.output]:
        dims = value.type.tensor_type.shape.dim
        out[value.name] = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    for init in model.graph.initializer:
        out[init.name] = list(init.dims)
    return out


def _known(shape) -> bool:
    return shape is not None and all(isinstance(d, int) and d > 0 for d in shape)


def macs(model, input_shapes: dict[str, list[int]]) -> int | None:
    """Multiply-accumulates of one forward pass at the given input shapes (batch 1): MatMul/Gemm/Conv and
    their quantized and fused forms (MatMulInteger, QLinear*, FusedMatMul, Attention). None when a counted
    op's shapes cannot be inferred."""
    fixed = _fixed(model, input_shapes)
    count = _count(_infer(fixed, symbolic=False))
    return count if count is not None else _count(_infer(fixed, symbolic=True))


def _count(inferred) -> int | None:
    shape = _shapes(inferred)
    total = 0
    for node in inferred.graph.node:
        op = node.op_type
        if op in ("MatMul", "MatMulInteger", "FusedMatMul", "DynamicQuantizeMatMul", "MatMulIntegerToFloat",
                  "QLinearMatMul", "Gemm", "QGemm"):
            a = shape.get(node.input[0])
            out = shape.get(node.output[0])
            if not (_known(a) and _known(out)):
                return None
            k = a[-1]
            if op in ("Gemm", "QGemm") and any(at.name == "transA" and at.i for at in node.attribute):
                k = a[0]
            total += math.prod(out) * k
        elif op in ("Conv", "ConvInteger", "QLinearConv"):
            w = shape.get(node.input[3 if op == "QLinearConv" else 1])
            out = shape.get(node.output[0])
            if not (_known(w) and _known(out)):
                return None
            total += math.prod(out) * math.prod(w[1:])
        elif op in ("Attention", "QAttention"):
            x, w = shape.get(node.input[0]), shape.get(node.input[1])
            if not (_known(x) and _known(w)) or len(x) != 3:
                return None
            batch, seq, hidden = x
            total += batch * seq * hidden * w[-1]  # the fused Q, K, V projections
            total += 2 * batch * seq * seq * (w[-1] // 3)  # QK^T and attention x V over all heads
    return int(total)


class _Counter:
    def __init__(self) -> None:
        self.size = 0

    def write(self, data) -> int:
        self.size += len(data)
        return len(data)

    def flush(self) -> None:
        pass


def compressed_size(folder: Path) -> int:
    """Bytes of the artifact folder as a gzip-compressed tar (level 6, as `tar czf` and image layers use)."""
    counter = _Counter()
    with gzip.GzipFile(fileobj=counter, mode="wb", compresslevel=6, mtime=0) as gz:
        with tarfile.open(fileobj=gz, mode="w|") as tar:
            for path in sorted(Path(folder).iterdir()):
                if path.is_file():
                    tar.add(path, arcname=path.name)
    return counter.size
