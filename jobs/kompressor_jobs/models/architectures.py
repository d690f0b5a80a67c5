"""The builtin architectures (see builtin.py for the registry), their seeded training and their cache of
torch.export programs."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
from torch import nn

from kompressor.console import log
from kompressor_jobs.data import load_dataset
from kompressor_jobs.models.builtin import BuiltinModel
from kompressor_jobs.models.source import cache_dir
from kompressor_jobs.models.training import BATCH_SIZE, LEARNING_RATE, SEED, accuracy, train


class MLP(nn.Sequential):
    def __init__(self, n_in: int, hidden: tuple[int, ...], n_out: int):
        layers: list[nn.Module] = []
        for width in hidden:
            layers += [nn.Linear(n_in, width), nn.ReLU()]
            n_in = width
        layers.append(nn.Linear(n_in, n_out))
        super().__init__(*layers)


class CNN(nn.Module):
    def __init__(self, input_shape: tuple[int, ...], hidden: tuple[int, ...], n_out: int):
        super().__init__()
        *channels, fc = hidden
        convs: list[nn.Module] = []
        c_in = input_shape[0]
        for c in channels:
            convs += [nn.Conv2d(c_in, c, 3, padding=1), nn.ReLU()]
            c_in = c
        convs.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*convs)
        flat = c_in * (input_shape[1] // 2) * (input_shape[2] // 2)
        self.head = nn.Sequential(nn.Linear(flat, fc), nn.ReLU(), nn.Linear(fc, n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.features(x), 1))


class BasicBlock(nn.Module):
    """ResNet's basic block: conv-BN-ReLU-conv-BN plus the shortcut (a 1x1 conv + BN when the shape changes)."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU()
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    """A small ResNet: a conv-BN-ReLU stem, stages of ``blocks`` basic blocks (the first of each later stage
    halving the resolution through a projection shortcut; the first stage's shortcut is the identity), adaptive
    average pooling and a linear head."""

    def __init__(self, input_shape: tuple[int, ...], widths: tuple[int, ...], n_out: int, blocks: int = 1):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(input_shape[0], widths[0], 3, padding=1, bias=False),
                                  nn.BatchNorm2d(widths[0]), nn.ReLU())
        stages, c_in = [], widths[0]
        for i, width in enumerate(widths):
            for b in range(blocks):
                stages.append(BasicBlock(c_in, width, stride=2 if i > 0 and b == 0 else 1))
                c_in = width
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.stages(self.stem(x))), 1))


def build_builtin(spec: BuiltinModel) -> nn.Module:
    torch.manual_seed(SEED)
    if spec.arch == "mlp":
        return MLP(spec.input_shape[0], spec.hidden, spec.num_classes)
    if spec.arch == "resnet":
        return ResNet(spec.input_shape, spec.hidden, spec.num_classes)
    return CNN(spec.input_shape, spec.hidden, spec.num_classes)


def export_program(module: nn.Module, input_shape: list[int]):
    # A batch-1 example would specialise the batch dimension; 2 keeps it dynamic.
    example = torch.zeros(2, *input_shape)
    return torch.export.export(module.eval(), (example,), dynamic_shapes=({0: torch.export.Dim.DYNAMIC},))


def builtin_path(spec: BuiltinModel, train_digest: str) -> Path:
    recipe = {"name": spec.name, "recipe": spec.recipe, "arch": spec.arch, "hidden": spec.hidden,
              "epochs": spec.epochs, "seed": SEED, "lr": LEARNING_RATE, "batch": BATCH_SIZE, "data": train_digest}
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir() / "models" / f"{spec.name}-{key}.pt2"


def ensure_builtin(spec: BuiltinModel) -> Path:
    """The cached .pt2 of a builtin model, trained (once, seeded) if missing. Always on CPU: a few
    seconds, and the same weights whichever machine trains first (GPU kernels are not bitwise alike)."""
    train_data = load_dataset(spec.data_uri("train"), list(spec.input_shape))
    path = builtin_path(spec, train_data.digest)
    if path.is_file():
        return path
    module = build_builtin(spec)
    seconds = train(module, train_data, spec.epochs, "cpu", description=f"training builtin {spec.name}")
    log("trained builtin model", model=spec.name, seconds=round(seconds, 2),
        train_accuracy=round(accuracy(module, train_data), 4))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp.pt2")
    os.close(fd)
    try:
        torch.export.save(export_program(module, list(spec.input_shape)), tmp)
        try:
            os.link(tmp, path)  # the first writer wins; a concurrent trainer then uses its file
        except FileExistsError:
            pass
        except OSError:  # a filesystem without hard links: last writer wins, atomically
            os.replace(tmp, path)
            return path
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
