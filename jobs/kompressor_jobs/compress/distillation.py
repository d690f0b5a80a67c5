"""Knowledge-distillation losses: how far a compressed model's outputs are from the uncompressed model's.

classification: KL divergence between the temperature-softened class distributions (Hinton et al. 2015),
scaled by T² so its gradients keep their size whatever the temperature; regression: mean squared error to
the teacher's outputs; embedding: 1 - cosine similarity to the teacher's vectors (no labels needed).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def distillation_loss(task: str, student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """The distillation loss of one batch (mean over rows)."""
    student, teacher = student.float(), teacher.float()
    if task == "classification":
        t = float(temperature)
        return F.kl_div(F.log_softmax(student / t, dim=-1), F.log_softmax(teacher / t, dim=-1),
                        reduction="batchmean", log_target=True) * (t * t)
    if task == "regression":
        return F.mse_loss(student, teacher)
    if task == "embedding":
        return cosine_loss(student, teacher)
    raise ValueError(f"unknown task {task!r}")


def cosine_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    return (1.0 - F.cosine_similarity(student.flatten(1), teacher.flatten(1), dim=1)).mean()


def task_loss(task: str, outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The loss on labels: cross-entropy for classification, mean squared error for regression."""
    if task == "classification":
        return F.cross_entropy(outputs.float(), labels.long())
    if task == "regression":
        return F.mse_loss(outputs.float().reshape(labels.shape), labels.float())
    raise ValueError(f"task {task!r} has no labels")
