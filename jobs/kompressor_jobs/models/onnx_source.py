"""ONNX models (``.onnx``) as sources: their graph inputs, read and checked against spec.model.inputs. No torch:
an ONNX source is evaluated, quantized and served with ONNX Runtime alone (it cannot be pruned)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kompressor.api.spec import INPUT_DTYPES, InputSpec
from kompressor.errors import UserError

PRUNING_REFUSED = ("pruning an ONNX source is not supported (an ONNX graph has no trainable modules to remove "
                   "weights or channels from). Either set compression.pruning.method: none with quantization "
                   "(dynamic-int8 or static-int8), or export the PyTorch model with torch.export "
                   "(torch.export.save(torch.export.export(model, example_inputs), 'model.pt2')) and compress "
                   "the .pt2")


def _describe(value) -> tuple[str, list]:
    import onnx

    tensor = value.type.tensor_type
    try:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name
    except (KeyError, ValueError, TypeError):
        dtype = f"onnx type {tensor.elem_type}"
    dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor.shape.dim]
    return dtype, dims


def load_graph(uri: str, path: Path):
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as err:  # noqa: BLE001 - a corrupt or foreign file fails in several ways
        raise UserError(f"{uri}: not a readable ONNX model: {str(err).splitlines()[0] if str(err) else err}") from None
    if not model.graph.node or not model.graph.output:
        raise UserError(f"{uri}: not a readable ONNX model (no graph)")
    return model


def graph_inputs(model) -> list[tuple[str, str, list]]:
    """(name, numpy dtype name, dims) of each graph input that is not an initializer."""
    initializers = {i.name for i in model.graph.initializer}
    return [(v.name, *_describe(v)) for v in model.graph.input if v.name not in initializers]


def resolve_onnx_inputs(uri: str, model, declared: list[InputSpec] | None) -> list[InputSpec]:
    """The model's inputs: the declared ones checked against the graph's (names, dtypes, per-sample shapes),
    or the graph's own when none are declared."""
    found = graph_inputs(model)

    def show(inputs) -> str:
        return ", ".join(f"{n} ({d}, {list(s)})" for n, d, s in inputs)

    if declared is None:
        out = []
        for name, dtype, dims in found:
            shape = dims[1:]
            if dtype not in INPUT_DTYPES or not shape or not all(isinstance(d, int) and d > 0 for d in shape):
                raise UserError(f"{uri}: cannot take the ONNX graph's input {name} ({dtype}, shape {dims}) as it "
                                "is: set spec.model.inputs (fixed per-sample shapes; dtypes "
                                f"{', '.join(INPUT_DTYPES)})")
            out.append(InputSpec(name=name, dtype=dtype, shape=[int(d) for d in shape]))
        return out
    by_name = {n: (d, s) for n, d, s in found}
    graph_names = [n for n, _, _ in found]
    if len(declared) == 1 and len(found) == 1 and declared[0].name == "input" and graph_names != ["input"]:
        declared = [InputSpec(name=graph_names[0], dtype=declared[0].dtype, shape=list(declared[0].shape))]
    missing = [i.name for i in declared if i.name not in by_name]
    extra = [n for n in graph_names if n not in {i.name for i in declared}]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"spec.model.inputs names {', '.join(missing)}, which the graph does not have")
        if extra:
            parts.append(f"the graph also needs {', '.join(extra)}")
        raise UserError(f"{uri}: the ONNX model's inputs differ from spec.model.inputs: {'; '.join(parts)} "
                        f"(the graph's inputs: {show(found)})")
    for spec in declared:
        dtype, dims = by_name[spec.name]
        if dtype != spec.dtype:
            raise UserError(f"{uri}: the ONNX model's input {spec.name} is {dtype}, but spec.model.inputs says "
                            f"{spec.dtype}")
        shape = dims[1:]
        if len(shape) != len(spec.shape) or any(isinstance(g, int) and g > 0 and g != w
                                                for g, w in zip(shape, spec.shape)):
            raise UserError(f"{uri}: the ONNX model's input {spec.name} takes samples of shape {shape} (graph "
                            f"shape {dims}, batch first), but spec.model.inputs says {list(spec.shape)}")
    order = {n: i for i, n in enumerate(graph_names)}
    return sorted(declared, key=lambda i: order[i.name])


def output_dim(uri: str, path: Path, inputs: list[InputSpec]) -> tuple[int, str]:
    """(size of the last dimension of the first output, its name), from one ONNX Runtime run on zeros."""
    from kompressor_jobs.runtime import session

    sess = session(path, threads=1)
    feed = {i.name: np.zeros((2, *i.shape), dtype=np.dtype(i.dtype)) for i in inputs}
    try:
        out = sess.run(None, feed)[0]
    except Exception as err:  # noqa: BLE001 - the user's graph, any failure is a bad input
        raise UserError(f"{uri}: the ONNX model does not run on inputs "
                        f"{', '.join(f'{i.name} ({i.dtype}, [batch, {chr(44).join(map(str, i.shape))}])' for i in inputs)}"
                        f": {str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
    if out.ndim not in (1, 2) or out.shape[0] != 2:
        raise UserError(f"{uri}: the ONNX model's first output must be [batch, outputs], got shape {list(out.shape)}")
    return (int(out.shape[1]) if out.ndim == 2 else 1), sess.get_outputs()[0].name


def graph_kind(model) -> str:
    ops = {n.op_type for n in model.graph.node}
    if {"Attention", "MultiHeadAttention", "Gather", "LayerNormalization", "SkipLayerNormalization"} & ops and (
            "Softmax" in ops or "Attention" in ops or "MultiHeadAttention" in ops):
        return "transformer"
    if "Conv" in ops:
        return "cnn"
    return "mlp"
