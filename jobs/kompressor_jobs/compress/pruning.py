"""Pruning methods and schedules, with fine-tuning between steps.

none: nothing is removed (quantization alone) and nothing is fine-tuned;
unstructured: per-layer L1 magnitude (torch.nn.utils.prune.l1_unstructured);
global: magnitude ranked across all layers (prune.global_unstructured);
structured: Torch-Pruning's dependency graph (MetaPruner) removes whole channels, neurons, attention heads and
FFN channels, so the exported graph is physically smaller. BatchNorm/LayerNorm go with the layers that feed
them, residual groups are pruned together, grouped and depthwise convolutions keep their groups, attention
keeps ``num_heads * head_dim`` consistent (whole heads are removed; the Hugging Face config and the attention
modules' attributes are updated), and embeddings and the output layer are never pruned. Masks of the
magnitude methods are made permanent before returning.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import fx, nn
from torch.nn.utils import prune

from kompressor.console import log
from kompressor.errors import UserError

PRUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
IMPORTANCES = ("magnitude", "taylor")
_VIEW_OPS = (torch.ops.aten.view.default, torch.ops.aten.reshape.default, torch.ops.aten._unsafe_view.default)


def _is_view(node: fx.Node) -> bool:
    """aten.view/reshape(x, [sizes]) or x.view/reshape([sizes]) (models.rebuild_module turns aten calls whose
    sizes hold graph values into method calls, for the ONNX exporter)."""
    if node.op == "call_function" and node.target in _VIEW_OPS:
        return True
    return (node.op == "call_method" and node.target in ("view", "reshape") and len(node.args) == 2
            and isinstance(node.args[1], (list, tuple)))
_SUGGESTION = ("use compression.pruning.method unstructured or global (which keep every tensor's shape), or "
               "method none with quantization alone")


@dataclass
class PruneResult:
    module: nn.Module
    step_sparsities: list[float]
    fine_tune_seconds: float = 0.0
    params_before: int = 0
    params_after: int = 0
    weight_sparsity: float = 0.0  # exact zeros among the prunable layers' weights
    notes: list[str] = field(default_factory=list)
    fine_tuning: list[dict] = field(default_factory=list)  # one FineTuneReport.to_facts() per step
    attention: dict = field(default_factory=dict)  # structured: heads/FFN sizes before and after

    @property
    def structured_sparsity(self) -> float:
        """The fraction of parameters removed (0 for the magnitude methods, which keep every tensor)."""
        if not self.params_before:
            return 0.0
        return max(0.0, 1.0 - self.params_after / self.params_before)


# --- schedules and counts -----------------------------------------------------------------------

def polynomial_schedule(final: float, steps: int, initial: float = 0.0) -> list[float]:
    """Zhu & Gupta (2017): s_t = s_f + (s_i - s_f) * (1 - t/n)^3 for t = 1..n."""
    return [final + (initial - final) * (1 - t / steps) ** 3 for t in range(1, steps + 1)]


def schedule_of(sparsity: float, schedule: str, steps: int) -> list[float]:
    return [sparsity] if schedule == "oneshot" else polynomial_schedule(sparsity, steps)


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def prunable_layers(module: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in module.named_modules() if isinstance(m, PRUNABLE)]


def weight_sparsity(module: nn.Module) -> float:
    weights = [m.weight.detach() for _, m in prunable_layers(module)]
    total = sum(w.numel() for w in weights)
    return float(sum((w == 0).sum().item() for w in weights) / total) if total else 0.0


# --- the entry point ----------------------------------------------------------------------------

FineTune = Callable[..., object]  # (module, description) -> a report with .seconds and .to_facts()


def prune_model(module: nn.Module, method: str, sparsity: float, *, schedule: str = "oneshot", steps: int = 1,
                fine_tune: FineTune | None = None, example: tuple[torch.Tensor, ...] | None = None,
                importance: str = "magnitude") -> PruneResult:
    """Prune ``module`` to ``sparsity`` and fine-tune it after each step with ``fine_tune`` (a
    compress.finetune.FineTuner, or None for no fine-tuning). Returns the pruned module (structured pruning
    of a torch.export graph returns a new module) with facts about the run.

    ``example``: a few rows of real inputs, positionally (structured pruning traces the model with them)."""
    sparsities = [] if method == "none" else schedule_of(sparsity, schedule, steps)
    result = PruneResult(module, sparsities, params_before=count_params(module))
    if method == "none":
        result.notes.append("pruning.method none: nothing pruned, nothing fine-tuned")
    elif method == "structured":
        if example is None:
            raise ValueError("structured pruning needs example inputs")
        if importance not in IMPORTANCES:
            raise ValueError(f"unknown importance {importance!r}")
        _structured(result, sparsity, fine_tune, example, importance)
    elif method in ("unstructured", "global"):
        if not prunable_layers(module):
            raise UserError("the model has no Linear or Conv layers to prune; use compression.pruning.method none "
                            "with quantization alone")
        _magnitude(result, method, fine_tune)
    else:
        raise ValueError(f"unknown pruning method {method!r}")
    result.params_after = count_params(result.module)
    result.weight_sparsity = weight_sparsity(result.module)
    return result


def _fine_tune(result: PruneResult, fine_tune: FineTune | None, module: nn.Module, description: str) -> None:
    if fine_tune is None:
        return
    report = fine_tune(module, description=description)
    result.fine_tune_seconds += float(getattr(report, "seconds", 0.0))
    if hasattr(report, "to_facts"):
        result.fine_tuning.append(report.to_facts())


# --- unstructured / global magnitude --------------------------------------------------------------

def _magnitude(result: PruneResult, method: str, fine_tune: FineTune | None) -> None:
    layers = [m for _, m in prunable_layers(result.module)]
    for step, target in enumerate(result.step_sparsities, 1):
        _make_permanent(layers)  # re-ranking from the fine-tuned weights; pruned zeros rank lowest
        if method == "global":
            prune.global_unstructured([(m, "weight") for m in layers], pruning_method=prune.L1Unstructured,
                                      amount=float(target))
        else:
            for m in layers:
                prune.l1_unstructured(m, "weight", amount=float(target))
        _fine_tune(result, fine_tune, result.module,
                   f"fine-tuning (step {step}/{len(result.step_sparsities)}, sparsity {target:.3f})")
    _make_permanent(layers)


def _make_permanent(layers: list[nn.Module]) -> None:
    for m in layers:
        if prune.is_pruned(m):
            prune.remove(m, "weight")


# --- structured -----------------------------------------------------------------------------------

def _structured(result: PruneResult, sparsity: float, fine_tune: FineTune | None, example: tuple,
                importance: str) -> None:
    import torch_pruning as tp

    from kompressor_jobs.compress.fx_modules import modularize, unwrapped_parameter_ops

    module = result.module.cpu().eval()
    if isinstance(module, fx.GraphModule):
        module = modularize(module)
        result.module = module
        unsupported = unwrapped_parameter_ops(module)
        if unsupported:
            ops = ", ".join(sorted({f"{op} (on {param})" for op, param in unsupported}))
            raise UserError(f"structured pruning cannot follow the op(s) {ops}: their weights are not in a "
                            f"layer Torch-Pruning knows; {_SUGGESTION}")
    _check_runs(module, example, "before pruning")
    if not prunable_layers(module):
        raise UserError("the model has no Linear or Conv layers to prune; use compression.pruning.method none "
                        "with quantization alone")
    attention = find_attention(module, example)
    ignored = never_pruned(module, example)
    packed = packed_projections(module)
    if packed:
        ignored += packed
        result.notes.append(f"kept {len(packed)} packed projection(s) whole (their outputs are split into "
                            "several tensors, e.g. a fused q/k/v)")
    schedule = result.step_sparsities
    steps = len(schedule)

    def scheduler(ratio: float, n: int) -> list[float]:  # Torch-Pruning wants the ratio after step 0..n
        return [0.0] + (schedule if n == len(schedule) else polynomial_schedule(ratio, n))

    imp = (tp.importance.GroupTaylorImportance() if importance == "taylor"
           else tp.importance.GroupMagnitudeImportance(p=2))
    num_heads = {layer: a.heads for a in attention for layer in a.qkv}
    before = attention_sizes(module, attention)
    try:
        pruner = tp.pruner.MetaPruner(
            module, example, importance=imp, pruning_ratio=float(sparsity), iterative_steps=steps,
            iterative_pruning_ratio_scheduler=scheduler, ignored_layers=ignored, global_pruning=False,
            num_heads=num_heads, prune_num_heads=bool(num_heads), prune_head_dims=False,
            head_pruning_ratio=float(sparsity), output_transform=_output_sum)
    except Exception as err:  # noqa: BLE001 - Torch-Pruning fails in many ways on graphs it can't trace
        raise UserError(f"structured pruning could not trace the model ({type(err).__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else ''}); {_SUGGESTION}") from None
    for step in range(1, steps + 1):
        module.cpu()
        if importance == "taylor":
            if fine_tune is None or not hasattr(fine_tune, "accumulate_gradients"):
                raise ValueError("taylor importance needs a fine-tuner to compute gradients")
            fine_tune.accumulate_gradients(module)
        _set_head_ratio(pruner, attention, step, schedule[step - 1])
        rows = head_rows(attention)
        _step(pruner, module)
        module.zero_grad(set_to_none=True)
        update_attention(module, attention, pruner, rows)
        if isinstance(module, fx.GraphModule):
            repair_views(module, example)
        _check_runs(module, example, f"after pruning step {step}")
        log("pruned channels", step=step, steps=steps, target=round(schedule[step - 1], 4),
            parameters=count_params(module))
        _fine_tune(result, fine_tune, module,
                   f"fine-tuning (step {step}/{steps}, channel ratio {schedule[step - 1]:.3f})")
    result.attention = {"before": before, "after": attention_sizes(module, attention)} if attention else {}
    result.module = module.eval()


def _set_head_ratio(pruner, attention: list[Attention], step: int, target: float) -> None:
    """Torch-Pruning removes ceil(ratio * current heads) per step, counted from the heads left, not the original
    ones: set the step's ratio so that ceil(target * original) heads are gone after it (at least one stays)."""
    if not attention:
        return
    a = attention[0]
    alive = max(1, a.original - math.ceil(target * a.original - 1e-9))
    remove = max(0, a.heads - alive)
    pruner.per_step_head_pruning_ratio[step] = (remove - 0.5) / a.heads if remove else 0.0


def _step(pruner, module: nn.Module) -> None:
    """pruner.step(), with a failure inside Torch-Pruning reported as the layer (and the ops after it) it was
    pruning."""
    current: dict = {}
    estimate = pruner.estimate_importance

    def tracked(group):
        current["group"] = group
        return estimate(group)

    pruner.estimate_importance = tracked
    try:
        for group in pruner.step(interactive=True):
            current["group"] = group
            group.prune()
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001 - a graph Torch-Pruning can't follow
        group = current.get("group")
        layer = group[0].dep.target.module if group is not None else None
        where = _describe(module, layer) if layer is not None else "the model"
        raise UserError(f"structured pruning cannot handle {where} ({type(err).__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else ''}); {_SUGGESTION}") from None
    finally:
        pruner.estimate_importance = estimate


def _describe(module: nn.Module, layer: nn.Module) -> str:
    name = next((n for n, m in module.named_modules() if m is layer), "?")
    text = f"the layer {name} ({type(layer).__name__})"
    if isinstance(module, fx.GraphModule):
        from kompressor_jobs.compress.fx_modules import op_name

        ops = sorted({op_name(u.target) for node in module.graph.nodes if node.op == "call_module"
                      and node.target == name for u in node.users if u.op == "call_function"})
        if ops:
            text += f" whose output goes to the op(s) {', '.join(ops)}"
    return text


_SPLIT_OPS = (torch.ops.aten.unflatten.int, torch.ops.aten.split.Tensor, torch.ops.aten.split_with_sizes.default,
              torch.ops.aten.chunk.default, torch.ops.aten.unbind.int)


def packed_projections(module: nn.Module) -> list[nn.Module]:
    """Linears of a torch.export graph whose output is split into several tensors (a fused q/k/v, e.g.
    nn.MultiheadAttention's in_proj): Torch-Pruning can't map their channels, so they are kept whole."""
    if not isinstance(module, fx.GraphModule):
        return []
    found = []
    for node in module.graph.nodes:
        if node.op == "call_module" and isinstance(module.get_submodule(node.target), nn.Linear):
            if any(u.op == "call_function" and u.target in _SPLIT_OPS for u in node.users):
                found.append(module.get_submodule(node.target))
    return found


def _output_sum(out):
    from kompressor_jobs.compress.finetune import output_tensor

    return output_tensor(out).float().sum()


def _check_runs(module: nn.Module, example: tuple, when: str) -> None:
    """Run the model once; a failure names the op (graph node or module) that broke."""
    try:
        with torch.no_grad():
            module.eval()(*example)
        return
    except Exception as err:  # noqa: BLE001
        detail = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    op = _failing_op(module, example)
    raise UserError(f"structured pruning broke the model {when}: the op {op} fails ({detail}); the pruner can't "
                    f"handle it. {_SUGGESTION[0].upper()}{_SUGGESTION[1:]}")


def _failing_op(module: nn.Module, example: tuple) -> str:
    if isinstance(module, fx.GraphModule):
        from kompressor_jobs.compress.fx_modules import op_name

        class Finder(fx.Interpreter):
            node = None

            def run_node(self, n):
                Finder.node = n
                return super().run_node(n)

        try:
            with torch.no_grad():
                Finder(module).run(*example)
        except Exception:  # noqa: BLE001
            n = Finder.node
            if n is not None:
                target = n.target if n.op != "call_module" else type(module.get_submodule(n.target)).__name__
                return f"{op_name(target) if n.op == 'call_function' else target} (node {n.name})"
        return "unknown"
    # The innermost module whose forward was entered and never left is where the failure happened.
    stack: list[str] = []
    hooks = []
    for name, m in module.named_modules():
        if name:
            hooks.append(m.register_forward_pre_hook(lambda mod, args, name=name: stack.append(name)))
            hooks.append(m.register_forward_hook(lambda mod, args, out: stack.pop()))
    try:
        with torch.no_grad():
            module(*example)
    except Exception:  # noqa: BLE001
        pass
    finally:
        for h in hooks:
            h.remove()
    if not stack:
        return type(module).__name__
    name = stack[-1]
    return f"{type(module.get_submodule(name)).__name__} ({name})"


def executed_layers(module: nn.Module, example: tuple) -> list[nn.Module]:
    """Prunable layers and embeddings in the order the forward pass runs them."""
    order: list[nn.Module] = []
    hooks = [m.register_forward_hook(lambda mod, args, out: order.append(mod))
             for m in module.modules() if isinstance(m, (*PRUNABLE, nn.Embedding))]
    try:
        with torch.no_grad():
            module.eval()(*example)
    finally:
        for h in hooks:
            h.remove()
    return order


def never_pruned(module: nn.Module, example: tuple) -> list[nn.Module]:
    """Embeddings (their width is the model's hidden size) and the output layer (its outputs are the classes,
    targets or embedding dimensions)."""
    ignored = [m for m in module.modules() if isinstance(m, nn.Embedding)]
    layers = [m for m in executed_layers(module, example) if isinstance(m, PRUNABLE)]
    if layers:
        ignored.append(layers[-1])
    return ignored


# --- attention ------------------------------------------------------------------------------------

@dataclass
class Attention:
    qkv: list[nn.Linear]  # the projections split into heads
    heads: int
    head_dim: int
    owner: nn.Module | None = None  # a Hugging Face-style self-attention module (attributes to update)
    name: str = ""  # the owner's module path
    alive: list[int] = field(default_factory=list)  # original indices of the heads still there
    original: int = 0  # heads before pruning

    def __post_init__(self):
        self.original = self.original or self.heads
        self.alive = self.alive or list(range(self.heads))


def find_attention(module: nn.Module, example: tuple) -> list[Attention]:
    """Multi-head attention blocks whose heads can be removed: Hugging Face-style self-attention modules
    (query/key/value Linears and num_attention_heads), and, in a torch.export graph, Linears whose outputs are
    reshaped into [..., heads, head_dim]."""
    found: list[Attention] = []
    for name, m in module.named_modules():
        heads = getattr(m, "num_attention_heads", None)
        q, k, v = (getattr(m, n, None) for n in ("query", "key", "value"))
        if isinstance(heads, int) and all(isinstance(x, nn.Linear) for x in (q, k, v)):
            found.append(Attention([q, k, v], heads, q.out_features // heads, m, name))
    if isinstance(module, fx.GraphModule) and not found:
        found.extend(_fx_attention(module))
    return found


def _fx_attention(gm: fx.GraphModule) -> list[Attention]:
    """Linears of a graph split into heads by a view: groups of them feeding one attention form one block."""
    split: dict[nn.Linear, tuple[int, int, fx.Node]] = {}
    rewritten = False
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        layer = gm.get_submodule(node.target)
        if not isinstance(layer, nn.Linear):
            continue
        for user in list(node.users):
            if _is_view(user) and (found := _head_split(list(user.args[1]), layer.out_features)):
                heads, dim = found
                split[layer] = (heads, dim, node)
                if user.args[1][-1] == -1:  # [..., heads, -1]: head_dim made explicit, so that removing heads
                    shape = [*user.args[1][:-1], dim]  # rewrites the heads' count (repair_views), not head_dim
                    user.args = (user.args[0], shape, *user.args[2:])
                    rewritten = True
    if rewritten:
        gm.recompile()
    # Projections reading the same input (q, k, v of one block) form one Attention.
    blocks: dict[tuple, list[nn.Linear]] = {}
    for layer, (heads, dim, node) in split.items():
        blocks.setdefault((node.args[0], heads, dim), []).append(layer)
    return [Attention(layers, heads, dim) for (_, heads, dim), layers in blocks.items()]


def _head_split(shape: list, width: int) -> tuple[int, int] | None:
    """(heads, head_dim) when a view of a ``width``-wide projection ends in [heads, head_dim]; either one may be
    -1 (inferred from the width)."""
    if len(shape) < 2 or not all(isinstance(s, int) for s in shape[-2:]):
        return None
    heads, dim = shape[-2:]
    if heads == -1 and dim > 0 and width % dim == 0:
        heads = width // dim
    elif dim == -1 and heads > 0 and width % heads == 0:
        dim = width // heads
    return (heads, dim) if heads > 1 and dim > 0 and heads * dim == width else None


def head_rows(attention: list[Attention]) -> list[torch.Tensor]:
    """The first weight row of each head of each block's query projection (to tell which heads survive)."""
    return [a.qkv[0].weight.detach()[::a.head_dim].clone() for a in attention]


def update_attention(module: nn.Module, attention: list[Attention], pruner, rows: list[torch.Tensor]) -> None:
    """Keep num_heads * head_dim == the projections' width after heads were removed, and record which of the
    original heads remain (``rows``: head_rows() taken before the step)."""
    for a, before in zip(attention, rows):
        heads = pruner.num_heads.get(a.qkv[0], a.heads)
        width = a.qkv[0].out_features
        if any(x.out_features != width for x in a.qkv) or width != heads * a.head_dim:
            raise UserError(f"structured pruning left attention inconsistent ({heads} heads x {a.head_dim} != "
                            f"{width}); {_SUGGESTION}")
        after = a.qkv[0].weight.detach()[::a.head_dim]
        if after.shape[1] == before.shape[1]:
            kept = [i for i in range(len(before)) if any(torch.equal(before[i], r) for r in after)]
            if len(kept) == heads:
                a.alive = [a.alive[i] for i in kept]
        a.heads = heads
        if a.owner is not None:
            a.owner.num_attention_heads = heads
            if hasattr(a.owner, "attention_head_size"):
                a.owner.attention_head_size = a.head_dim
            if hasattr(a.owner, "all_head_size"):
                a.owner.all_head_size = width
    _update_configs(module, attention)


_LAYER_INDEX = re.compile(r"(?:^|\.)layers?\.(\d+)\.")


def _update_configs(module: nn.Module, attention: list[Attention]) -> None:
    """Hugging Face configs (module.config) describe the pruned model, so that it saves and reloads:
    ``pruned_heads`` (Transformers' own record of removed heads: {layer: [original head indices]}, which
    from_pretrained applies before loading the weights; num_attention_heads stays the original count, as
    the head size is derived from it) and ``intermediate_size`` (the FFN width, the same in every layer)."""
    configs = {id(c): c for m in module.modules() for c in [getattr(m, "config", None)]
               if c is not None and hasattr(c, "num_attention_heads")}
    if not configs:
        return
    pruned: dict[int, list[int]] = {}
    for a in attention:
        match = _LAYER_INDEX.search(a.name + ".")
        if a.owner is None or match is None:
            continue
        gone = sorted(set(range(a.original)) - set(a.alive))
        if gone:
            pruned[int(match.group(1))] = gone
    intermediate = {m.dense.out_features for n, m in module.named_modules()
                    if n.endswith("intermediate") and isinstance(getattr(m, "dense", None), nn.Linear)}
    for config in configs.values():
        if pruned and hasattr(config, "pruned_heads"):
            config.pruned_heads = {layer: heads for layer, heads in sorted(pruned.items())}
        if len(intermediate) == 1 and hasattr(config, "intermediate_size"):
            config.intermediate_size = next(iter(intermediate))
    for a in attention:  # BertAttention-style parents keep the set of pruned heads too
        parent = _parent(module, a.name)
        match = _LAYER_INDEX.search(a.name + ".")
        if parent is not None and isinstance(getattr(parent, "pruned_heads", None), set) and match:
            parent.pruned_heads = set(pruned.get(int(match.group(1)), []))


def _parent(module: nn.Module, name: str) -> nn.Module | None:
    if "." not in name:
        return None
    try:
        return module.get_submodule(name.rsplit(".", 1)[0])
    except AttributeError:
        return None


def attention_sizes(module: nn.Module, attention: list[Attention]) -> dict:
    if not attention:
        return {}
    sizes = {"heads": [a.qkv[0].out_features // a.head_dim for a in attention], "headDim": attention[0].head_dim}
    ffn = [m.dense.out_features for n, m in module.named_modules()
           if n.endswith("intermediate") and isinstance(getattr(m, "dense", None), nn.Linear)]
    if ffn:
        sizes["ffn"] = ffn
    return sizes


# --- torch.export graphs: shapes baked into views ---------------------------------------------------

def repair_views(gm: fx.GraphModule, example: tuple) -> int:
    """A torch.export graph stores reshape targets as constants (``view(x, [b, 128, 12, 32])``, ``view(x, [b,
    512])``). After channels or heads are removed, the first constant that no longer matches the input is
    recomputed from the input's size (the number of heads, the flattened width); returns how many changed."""
    changed = 0

    class Repair(fx.Interpreter):
        def run_node(self, n):
            nonlocal changed
            if _is_view(n):
                args, _ = self.fetch_args_kwargs_from_env(n)
                x, shape = args[0], list(args[1])
                fixed = _fixed_shape(list(x.shape), shape, list(n.args[1]))
                if fixed is not None:
                    n.args = (n.args[0], fixed, *n.args[2:])
                    changed += 1
            return super().run_node(n)

    with torch.no_grad():
        try:
            Repair(gm).run(*example)
        except Exception:  # noqa: BLE001 - _check_runs names the op that still fails
            pass
    if changed:
        gm.recompile()
    return changed


def _fixed_shape(in_shape: list[int], shape: list[int], original: list) -> list | None:
    numel = math.prod(in_shape)
    if -1 in shape or math.prod(shape) == numel:
        return None  # a -1 absorbs the change (or nothing changed)
    # Leading dimensions equal to the input's stay.
    lead = 0
    while lead < min(len(shape), len(in_shape)) and shape[lead] == in_shape[lead]:
        lead += 1
    # The first constant after them that can absorb the change by shrinking is recomputed (for
    # [b, s, heads, head_dim] that is the number of heads: whole heads are removed, head_dim stays).
    for i in range(lead, len(shape)):
        if isinstance(original[i], int) and original[i] > 1:
            others = math.prod(s for j, s in enumerate(shape) if j != i)
            if others and numel % others == 0 and 0 < numel // others < original[i]:
                new = list(original)
                new[i] = numel // others
                return new
    return None


__all__ = ["PruneResult", "prune_model", "polynomial_schedule", "schedule_of", "count_params", "prunable_layers",
           "weight_sparsity", "find_attention", "repair_views"]
