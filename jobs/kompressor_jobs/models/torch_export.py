"""torch.export programs (``.pt2``) as sources: loaded safely (no pickle), their positional inputs read from the
graph, and rebuilt into an fx GraphModule whose layers are real ``nn`` modules (what pruning libraries see)."""

from __future__ import annotations

import logging
import zipfile
from pathlib import Path

import torch
from torch import nn

from kompressor.api.spec import InputSpec
from kompressor.errors import UserError

TORCH_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.int64: "int64", torch.int32: "int32",
                torch.bool: "bool"}
NUMPY_OF = {"float32": torch.float32, "float16": torch.float16, "int64": torch.int64, "int32": torch.int32,
            "bool": torch.bool}


def load_program(uri: str, path: Path):
    if not zipfile.is_zipfile(path):  # a .pt2 is a zip archive; anything else fails noisily inside torch
        raise UserError(f"{uri}: not a readable torch.export program (.pt2): the file is not a zip archive "
                        "(corrupt, truncated, or another format such as a pickled state_dict)")
    export_log = logging.getLogger("torch.export")
    level = export_log.level
    export_log.setLevel(logging.ERROR)  # torch logs a traceback as a warning before raising
    try:
        return torch.export.load(str(path))
    except Exception as err:  # noqa: BLE001 - corrupt, truncated or foreign files fail in many ways
        detail = str(err).splitlines()[0] if str(err) else ""
        raise UserError(f"{uri}: not a readable torch.export program (.pt2): {type(err).__name__}"
                        + (f": {detail}" if detail else "")) from None
    finally:
        export_log.setLevel(level)


def program_inputs(program) -> list[InputSpec | None]:
    """The program's positional (user) inputs as InputSpecs named after the graph's placeholders; None for
    one whose dtype or per-sample shape the graph does not pin down."""
    user_inputs = [s.arg.name for s in program.graph_signature.input_specs if s.kind.name == "USER_INPUT"]
    placeholders = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    out: list[InputSpec | None] = []
    for name in user_inputs:
        val = placeholders[name].meta.get("val") if name in placeholders else None
        dtype = TORCH_DTYPES.get(getattr(val, "dtype", None))
        try:
            shape = [int(d) for d in val.shape[1:]] if val is not None and val.dim() >= 2 else None
        except (TypeError, ValueError):  # a symbolic per-sample dimension
            shape = None
        out.append(InputSpec(name=name, dtype=dtype, shape=shape) if dtype and shape else None)
    return out


def resolve_program_inputs(uri: str, program, declared: list[InputSpec] | None) -> list[InputSpec]:
    """The declared inputs, checked against the program's positional arguments (count, dtype, per-sample
    shape); the program's own when none are declared."""
    found = program_inputs(program)
    if declared is None:
        if any(f is None for f in found) or not found:
            raise UserError(f"{uri}: cannot tell the model's inputs from the program; set spec.model.inputs "
                            "(or inputShape for one float32 input)")
        return found  # type: ignore[return-value]
    if len(declared) != len(found):
        raise UserError(f"{uri}: the program takes {len(found)} positional input(s), but spec.model declares "
                        f"{len(declared)} ({', '.join(i.name for i in declared)})")
    for spec, got in zip(declared, found):
        if got is None:
            continue
        if got.shape != list(spec.shape):
            if len(declared) == 1 and spec.name == "input" and spec.dtype == "float32":
                raise UserError(f"{uri}: the program takes samples of shape {got.shape}, "
                                f"but spec.model.inputShape is {list(spec.shape)}")
            raise UserError(f"{uri}: input {spec.name}: the program takes samples of shape {got.shape}, but "
                            f"spec.model.inputs says {list(spec.shape)}")
        if got.dtype != spec.dtype:
            raise UserError(f"{uri}: input {spec.name}: the program takes {got.dtype}, but spec.model.inputs says "
                            f"{spec.dtype}")
    return list(declared)


def example_inputs(inputs: list[InputSpec], batch: int = 2) -> tuple[torch.Tensor, ...]:
    """Zeros of each input's dtype and shape (a batch of 2 keeps the batch dimension dynamic in exports)."""
    return tuple(torch.zeros(batch, *i.shape, dtype=NUMPY_OF[i.dtype]) for i in inputs)


def module_kind(module: nn.Module) -> str:
    """What the architecture is, for defaults (learning rate, quantization): transformer, cnn or mlp."""
    kinds = {type(m).__name__ for m in module.modules()}
    graph = getattr(module, "graph", None)
    ops = {str(n.target) for n in graph.nodes if n.op == "call_function"} if graph is not None else set()
    if "Embedding" in kinds or "MultiheadAttention" in kinds or any("scaled_dot_product" in o or "embedding" in o
                                                                    for o in ops):
        return "transformer"
    if any(k.startswith("Conv") for k in kinds) or any("conv" in o for o in ops):
        return "cnn"
    return "mlp"


# --- torch.export program -> plain module ----------------------------------------------------

_CONV = {
    torch.ops.aten.conv1d.default: nn.Conv1d,
    torch.ops.aten.conv2d.default: nn.Conv2d,
    torch.ops.aten.conv3d.default: nn.Conv3d,
}


def rebuild_module(program) -> torch.fx.GraphModule:
    """Turn a torch.export program into an fx GraphModule whose ``aten.linear``/``aten.conv*`` calls are
    real ``nn.Linear``/``nn.Conv*`` modules, and whose batch_norm/layer_norm/embedding calls are real
    ``nn.BatchNorm*``/``nn.LayerNorm``/``nn.Embedding`` modules, holding the same tensors: Torch-Pruning and
    torch.nn.utils.prune find layers only as modules."""
    from kompressor_jobs.compress.fx_modules import modularize

    gm = program.module()
    graph = gm.graph
    count = 0
    for node in list(graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":
            graph.erase_node(node)
            continue
        if node.op == "call_function" and node.target == torch.ops.aten.sym_size.int:
            # x.size(d) rather than aten.sym_size: the ONNX exporter's tracer records a method call as a Shape
            # op (the batch stays dynamic) but bakes an aten.sym_size result in as a constant.
            with graph.inserting_before(node):
                size = graph.call_method("size", tuple(node.args))
            size.meta = dict(node.meta)
            node.replace_all_uses_with(size)
            graph.erase_node(node)
            continue
        if node.op != "call_function" or not (node.target == torch.ops.aten.linear.default or node.target in _CONV):
            continue
        args = list(node.args)
        weight_node, bias_node = args[1], args[2] if len(args) > 2 else node.kwargs.get("bias")
        if getattr(weight_node, "op", None) != "get_attr" or (bias_node is not None and bias_node.op != "get_attr"):
            continue  # computed weights: leave the call as it is
        weight = gm.get_parameter(weight_node.target) if _is_param(gm, weight_node.target) else None
        if weight is None:
            continue
        bias = gm.get_parameter(bias_node.target) if bias_node is not None else None
        if node.target == torch.ops.aten.linear.default:
            layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
        else:
            given = args[3:]  # conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1)
            stride, padding, dilation, groups = (given + [1, 0, 1, 1][len(given):])[:4]
            if isinstance(padding, str):
                continue
            layer = _CONV[node.target](weight.shape[1] * groups, weight.shape[0], tuple(weight.shape[2:]),
                                       stride=stride, padding=padding, dilation=dilation, groups=groups,
                                       bias=bias is not None)
        with torch.no_grad():
            layer.weight = nn.Parameter(weight.detach().clone())
            if bias is not None:
                layer.bias = nn.Parameter(bias.detach().clone())
        name = f"layer{count}"
        count += 1
        gm.add_submodule(name, layer)
        with graph.inserting_before(node):
            new = graph.call_module(name, (args[0],))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
    _dynamic_shapes_as_methods(graph)
    graph.eliminate_dead_code()
    # A fresh GraphModule: the one ep.module() returns refuses train()/eval().
    rebuilt = torch.fx.GraphModule(gm, graph)
    rebuilt.delete_all_unused_submodules()
    return modularize(rebuilt).eval()


def _dynamic_shapes_as_methods(graph: torch.fx.Graph) -> None:
    """``aten.view(x, [batch, 32])`` -> ``x.view([batch, 32])`` (and ``aten.full([batch, 32], ...)`` ->
    ``torch.full``) wherever a size list holds a graph value: the ONNX exporter's tracer keeps sizes passed to
    Tensor methods and torch functions dynamic, but bakes those passed to aten overloads in as constants (a graph
    exported at batch 2 would then refuse any other batch size)."""
    for node in list(graph.nodes):
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        lists = [a for a in node.args if isinstance(a, (list, tuple))]
        if not any(isinstance(x, torch.fx.Node) for lst in lists for x in lst):
            continue
        name = node.target._schema.name.split("::")[-1]
        first_is_tensor = bool(node.args) and isinstance(node.args[0], torch.fx.Node) and isinstance(
            node.args[0].meta.get("val"), torch.Tensor)
        with graph.inserting_before(node):
            if first_is_tensor and hasattr(torch.Tensor, name):
                new = graph.call_method(name, tuple(node.args), dict(node.kwargs))
            elif not first_is_tensor and hasattr(torch, name):
                new = graph.call_function(getattr(torch, name), tuple(node.args), dict(node.kwargs))
            else:
                continue
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        graph.erase_node(node)


def _is_param(gm: nn.Module, target: str) -> bool:
    try:
        gm.get_parameter(target)
        return True
    except AttributeError:
        return False
