"""Real ``nn`` modules for the norm and embedding calls of a rebuilt torch.export graph.

``models.rebuild_module`` turns a program's ``aten.linear``/``aten.conv*`` calls into ``nn.Linear``/``nn.Conv*``
modules. A program also calls ``aten.batch_norm``, ``aten.layer_norm`` and ``aten.embedding`` on ``get_attr``
tensors; Torch-Pruning's dependency graph sees those tensors only when they belong to modules, so a pruned
convolution would leave its BatchNorm's 32 running means behind for 16 channels. ``modularize`` replaces
each such call with a ``nn.BatchNorm*d`` / ``nn.LayerNorm`` / ``nn.Embedding`` holding the same tensors
(outputs are unchanged), and reports the calls that still use parameters outside any module.
"""

from __future__ import annotations

import operator

import torch
from torch import fx, nn

aten = torch.ops.aten

# Calls on parameters that Torch-Pruning follows as "unwrapped parameters" (elementwise, along the
# channel dimension) or that carry no channel dimension of their own.
_SAFE_PARAMETER_OPS = {
    aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor, aten.cat.default, aten.expand.default,
    aten.view.default, aten.reshape.default, aten.unsqueeze.default, aten.to.dtype, aten.type_as.default,
    aten.slice.Tensor, aten.select.int, aten.clone.default, aten.detach.default, aten._to_copy.default,
    aten.alias.default, operator.getitem,
}


class BatchNorm(nn.modules.batchnorm._BatchNorm):
    """A BatchNorm for inputs of any rank (used when the graph does not say the input's rank)."""

    def _check_input_dim(self, input: torch.Tensor) -> None:  # noqa: A002 - torch's signature
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")


_BATCH_NORM_BY_RANK = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}


def modularize(gm: fx.GraphModule) -> fx.GraphModule:
    """A GraphModule equal to ``gm`` in which batch_norm, layer_norm and embedding calls on stored tensors are
    modules. Calls on computed tensors are left as they are."""
    graph = gm.graph
    changed = False
    counts: dict[str, int] = {}

    def add(kind: str, module: nn.Module) -> str:
        counts[kind] = counts.get(kind, 0) + 1
        name = f"{kind}{counts[kind] - 1}"
        while hasattr(gm, name):
            counts[kind] += 1
            name = f"{kind}{counts[kind] - 1}"
        gm.add_submodule(name, module)
        return name

    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        replacement = None
        if node.target in (aten.batch_norm.default, aten._native_batch_norm_legit_no_training.default):
            replacement = _batch_norm(gm, node, add)
        elif node.target == aten.layer_norm.default:
            replacement = _layer_norm(gm, node, add)
        elif node.target == aten.embedding.default:
            replacement = _embedding(gm, node, add)
        if replacement is None:
            continue
        name, input_node = replacement
        if node.target == aten._native_batch_norm_legit_no_training.default:
            users = list(node.users)
            if any(u.target is not operator.getitem or u.args[1] != 0 for u in users):
                gm.delete_submodule(name)
                continue  # the saved statistics are used: leave the call
            with graph.inserting_before(node):
                new = graph.call_module(name, (input_node,))
            for u in users:
                u.replace_all_uses_with(new)
                graph.erase_node(u)
        else:
            with graph.inserting_before(node):
                new = graph.call_module(name, (input_node,))
            node.replace_all_uses_with(new)
        new.meta = dict(node.meta)
        graph.erase_node(node)
        changed = True
    if not changed:
        return gm
    graph.eliminate_dead_code()
    rebuilt = fx.GraphModule(gm, graph)  # copies only what the graph still uses
    rebuilt.delete_all_unused_submodules()
    return rebuilt.train(gm.training)


def _tensor(gm: fx.GraphModule, node) -> torch.Tensor | None | bool:
    """The stored tensor a get_attr node names; None for a None argument; False for anything else."""
    if node is None:
        return None
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return False
    obj = gm
    for part in node.target.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return False
    return obj if isinstance(obj, torch.Tensor) else False


def _arg(node, index: int, name: str, default):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _rank(node) -> int | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return val.dim() if isinstance(val, torch.Tensor) else None


def _param(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t.detach().clone(), requires_grad=t.is_floating_point())


def _batch_norm(gm, node, add):
    x = node.args[0]
    weight, bias, mean, var = (_tensor(gm, _arg(node, i, n, None))
                               for i, n in ((1, "weight"), (2, "bias"), (3, "running_mean"), (4, "running_var")))
    if any(t is False for t in (weight, bias, mean, var)) or mean is None or var is None:
        return None
    if node.target == aten.batch_norm.default:
        if _arg(node, 5, "training", False):
            return None  # batch statistics at inference: not a standard module
        momentum, eps = _arg(node, 6, "momentum", 0.1), _arg(node, 7, "eps", 1e-5)
    else:  # _native_batch_norm_legit_no_training(input, weight, bias, mean, var, momentum, eps)
        momentum, eps = _arg(node, 5, "momentum", 0.1), _arg(node, 6, "eps", 1e-5)
    cls = _BATCH_NORM_BY_RANK.get(_rank(x), BatchNorm)
    bn = cls(mean.numel(), eps=float(eps), momentum=float(momentum), affine=weight is not None)
    with torch.no_grad():
        if weight is not None:
            bn.weight = _param(weight)
            bn.bias = _param(bias) if bias is not None else nn.Parameter(torch.zeros_like(weight))
        bn.running_mean.copy_(mean)
        bn.running_var.copy_(var)
    bn.eval()
    return add("batch_norm", bn), x


def _layer_norm(gm, node, add):
    x, shape = node.args[0], list(_arg(node, 1, "normalized_shape", []))
    weight, bias = _tensor(gm, _arg(node, 2, "weight", None)), _tensor(gm, _arg(node, 3, "bias", None))
    if weight is False or bias is False or not all(isinstance(s, int) for s in shape):
        return None
    ln = nn.LayerNorm(shape, eps=float(_arg(node, 4, "eps", 1e-5)), elementwise_affine=weight is not None,
                      bias=bias is not None)
    with torch.no_grad():
        if weight is not None:
            ln.weight = _param(weight)
        if bias is not None:
            ln.bias = _param(bias)
    return add("layer_norm", ln), x


def _embedding(gm, node, add):
    weight, indices = _tensor(gm, node.args[0]), node.args[1]
    if weight is None or weight is False or weight.dim() != 2:
        return None
    padding_idx = _arg(node, 2, "padding_idx", -1)
    if _arg(node, 4, "sparse", False) or _arg(node, 3, "scale_grad_by_freq", False):
        return None
    emb = nn.Embedding(weight.shape[0], weight.shape[1], padding_idx=None if padding_idx in (-1, None) else padding_idx)
    emb.weight = _param(weight)
    return add("embedding", emb), indices


def unwrapped_parameter_ops(gm: fx.GraphModule) -> list[tuple[str, str]]:
    """(op, parameter) for each call that uses a stored parameter outside a module in a way Torch-Pruning can't
    follow (e.g. a transposed convolution or a matmul on a weight): structured pruning would corrupt it."""
    params = {name for name, _ in gm.named_parameters()}
    found = []
    for node in gm.graph.nodes:
        if node.op != "get_attr" or node.target not in params:
            continue
        for user in node.users:
            if user.op == "call_function" and user.target not in _SAFE_PARAMETER_OPS:
                found.append((op_name(user.target), node.target))
    return found


def op_name(target) -> str:
    name = getattr(target, "__name__", None) or str(target)
    if isinstance(target, torch._ops.OpOverload):
        name = f"aten.{target._schema.name.split('::')[-1]}"
    return name
