"""Plain supervised training of a torch module on a Dataset (the builtin models' recipe), and the layer
helpers pruning uses. Fine-tuning after compression (schedules, distillation, early stopping) lives in
compress/finetune.py."""

from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn

from kompressor.console import progress
from kompressor_jobs.data import Dataset

SEED = 0
BATCH_SIZE = 64
LEARNING_RATE = 1e-3


def input_tensors(data: Dataset, device: str = "cpu") -> list[torch.Tensor]:
    """The dataset's inputs as tensors, in the model's positional order."""
    return [torch.from_numpy(np.ascontiguousarray(a)).to(device) for a in data.inputs.values()]


def train(module: nn.Module, data: Dataset, epochs: int, device: str, description: str = "training",
          lr: float = LEARNING_RATE, seed: int = SEED) -> float:
    """Cross-entropy training with Adam and a seeded shuffle. Returns the wall time in seconds."""
    start = time.perf_counter()
    if epochs <= 0:
        return 0.0
    module.to(device).train()
    xs = input_tensors(data, device)
    y = torch.from_numpy(data.y).to(device)
    optimizer = torch.optim.Adam([p for p in module.parameters() if p.requires_grad], lr=lr)
    generator = torch.Generator().manual_seed(seed)
    loss_fn = nn.CrossEntropyLoss()
    with progress(description, total=epochs) as bar:
        for _ in range(epochs):
            order = torch.randperm(len(y), generator=generator).to(device)
            total = 0.0
            for i in range(0, len(y), BATCH_SIZE):
                idx = order[i:i + BATCH_SIZE]
                optimizer.zero_grad(set_to_none=True)
                loss = loss_fn(module(*[x[idx] for x in xs]), y[idx])
                loss.backward()
                optimizer.step()
                total += float(loss.detach()) * len(idx)
            bar.advance(loss=round(total / len(y), 4))
    module.eval().cpu()  # copying back also waits for the device to finish
    return time.perf_counter() - start


@torch.no_grad()
def accuracy(module: nn.Module, data: Dataset) -> float:
    module.eval()
    pred = module(*input_tensors(data)).argmax(dim=1).numpy()
    return float((pred == data.y).mean())


def prunable_layers(module: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in module.named_modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))]


def as_numpy_batch(data: Dataset, n: int, seed: int = SEED) -> dict[str, np.ndarray]:
    """A seeded random sample of ``n`` rows, as a feed (input name -> array)."""
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(len(data), size=min(n, len(data)), replace=False))
    return {k: v[idx] for k, v in data.inputs.items()}
