"""Pruning methods and schedules, with fine-tuning between steps.

unstructured: per-layer L1 magnitude (torch.nn.utils.prune.l1_unstructured);
global: magnitude ranked across all layers (prune.global_unstructured);
structured: Torch-Pruning's dependency graph removes whole neurons/channels, so the exported
graph is physically smaller. Masks are made permanent before returning.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils import prune

from kompressor.console import log
from kompressor_jobs.data import Dataset
from kompressor_jobs.models import prunable_layers, train


@dataclass
class PruneResult:
    module: nn.Module
    step_sparsities: list[float]
    fine_tune_seconds: float = 0.0
    params_before: int = 0
    params_after: int = 0
    weight_sparsity: float = 0.0  # exact zeros among the prunable layers' weights
    notes: list[str] = field(default_factory=list)


def polynomial_schedule(final: float, steps: int, initial: float = 0.0) -> list[float]:
    """Zhu & Gupta (2017): s_t = s_f + (s_i - s_f) * (1 - t/n)^3 for t = 1..n."""
    return [final + (initial - final) * (1 - t / steps) ** 3 for t in range(1, steps + 1)]


def schedule_of(sparsity: float, schedule: str, steps: int) -> list[float]:
    return [sparsity] if schedule == "oneshot" else polynomial_schedule(sparsity, steps)


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def weight_sparsity(module: nn.Module) -> float:
    weights = [m.weight.detach() for _, m in prunable_layers(module)]
    total = sum(w.numel() for w in weights)
    return float(sum((w == 0).sum().item() for w in weights) / total) if total else 0.0


def prune_model(module: nn.Module, method: str, sparsity: float, schedule: str, steps: int,
                fine_tune_epochs: int, train_data: Dataset, device: str, input_shape: list[int]) -> PruneResult:
    """Prune ``module`` in place to ``sparsity`` and fine-tune it; returns it with facts about the run."""
    if not prunable_layers(module):
        raise ValueError("the model has no Linear or Conv layers to prune")
    sparsities = schedule_of(sparsity, schedule, steps)
    result = PruneResult(module, sparsities, params_before=count_params(module))
    if method == "structured":
        _structured(result, sparsity, len(sparsities), fine_tune_epochs, train_data, device, input_shape)
    else:
        _magnitude(result, method, fine_tune_epochs, train_data, device)
    result.params_after = count_params(result.module)
    result.weight_sparsity = weight_sparsity(result.module)
    return result


def _magnitude(result: PruneResult, method: str, epochs: int, data: Dataset, device: str) -> None:
    layers = [m for _, m in prunable_layers(result.module)]
    for step, target in enumerate(result.step_sparsities, 1):
        _make_permanent(layers)  # re-ranking from the fine-tuned weights; pruned zeros rank lowest
        if method == "global":
            prune.global_unstructured([(m, "weight") for m in layers], pruning_method=prune.L1Unstructured,
                                      amount=float(target))
        else:
            for m in layers:
                prune.l1_unstructured(m, "weight", amount=float(target))
        result.fine_tune_seconds += train(result.module, data, epochs, device,
                                          description=f"fine-tuning (step {step}/{len(result.step_sparsities)}, "
                                                      f"sparsity {target:.3f})")
    _make_permanent(layers)


def _make_permanent(layers: list[nn.Module]) -> None:
    for m in layers:
        if prune.is_pruned(m):
            prune.remove(m, "weight")


def _structured(result: PruneResult, sparsity: float, steps: int, epochs: int, data: Dataset, device: str,
                input_shape: list[int]) -> None:
    import torch_pruning as tp

    module = result.module.cpu().eval()
    # The classifier's outputs are the classes: never removed.
    ignored = [prunable_layers(module)[-1][1]]
    example = torch.zeros(2, *input_shape)
    schedule = result.step_sparsities

    def scheduler(ratio: float, n: int) -> list[float]:  # Torch-Pruning wants the ratio after step 0..n
        return [0.0] + (schedule if n == len(schedule) else polynomial_schedule(ratio, n))

    pruner = tp.pruner.MetaPruner(
        module, example, importance=tp.importance.MagnitudeImportance(p=1), pruning_ratio=float(sparsity),
        iterative_steps=steps, iterative_pruning_ratio_scheduler=scheduler, ignored_layers=ignored)
    for step in range(1, steps + 1):
        module.cpu()
        pruner.step()
        log("pruned channels", step=step, steps=steps, target=round(schedule[step - 1], 4),
            parameters=count_params(module))
        result.fine_tune_seconds += train(module, data, epochs, device,
                                          description=f"fine-tuning (step {step}/{steps}, "
                                                      f"channel ratio {schedule[step - 1]:.3f})")
    result.module = module.eval()
