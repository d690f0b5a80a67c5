"""Accuracy recovery: fine-tuning a pruned model, with knowledge distillation from the uncompressed one.

AdamW over the floating-point parameters (token-id embeddings' int inputs are never trained), a
learning-rate schedule (linear warm-up then cosine decay, or constant), a seeded shuffle, and early
stopping on the validation split that keeps the best epoch's weights (the model before fine-tuning
counts as epoch 0, so fine-tuning never leaves a model worse on validation than it found it).

The loss is ``alpha * distillation + (1 - alpha) * task`` (see distillation.py); embedding models have
no labels and are fine-tuned by distillation alone. Models take their inputs positionally, in the
order of the dataset's inputs, each in its own dtype.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from kompressor.api import defaults as d
from kompressor.console import log, progress
from kompressor_jobs.compress.distillation import cosine_loss, distillation_loss, task_loss

SEED = 0
# Rows per forward pass when only predicting (teacher outputs, validation).
PREDICT_BATCH = 256


@dataclass
class FineTuneConfig:
    epochs: int
    learning_rate: float = d.LEARNING_RATE_SMALL
    lr_schedule: str = d.LR_SCHEDULE
    batch_size: int = d.FINE_TUNE_BATCH_SIZE
    patience: int = d.EARLY_STOPPING_PATIENCE
    distillation: bool = d.DISTILLATION_ENABLED
    temperature: float = d.DISTILLATION_TEMPERATURE
    alpha: float = d.DISTILLATION_ALPHA
    warmup_fraction: float = d.FINE_TUNE_WARMUP_FRACTION
    seed: int = SEED


def default_learning_rate(kind: str | None) -> float:
    """Pretrained transformers take small steps; small nets trained from scratch take large ones."""
    return d.LEARNING_RATE_PRETRAINED if kind in ("transformer", "huggingface", "pretrained") else d.LEARNING_RATE_SMALL


def config_from_spec(compression, kind: str | None = None) -> FineTuneConfig:
    """A FineTuneConfig from ``spec.compression`` (a CompressionSpec)."""
    ft, kd = compression.fine_tuning, compression.distillation
    lr = ft.learning_rate if ft.learning_rate is not None else default_learning_rate(kind)
    return FineTuneConfig(epochs=compression.pruning.fine_tune_epochs, learning_rate=float(lr),
                          lr_schedule=ft.lr_schedule, batch_size=ft.batch_size, patience=ft.early_stopping_patience,
                          distillation=kd.enabled, temperature=kd.temperature, alpha=kd.alpha)


@dataclass
class FineTuneReport:
    seconds: float = 0.0
    epochs_run: int = 0
    best_epoch: int = 0  # 0: the weights before fine-tuning were the best on validation
    stopped_early: bool = False
    history: list[dict] = field(default_factory=list)  # per epoch: trainLoss, validation score

    def to_facts(self) -> dict:
        return {"seconds": round(self.seconds, 3), "epochsRun": self.epochs_run, "bestEpoch": self.best_epoch,
                "stoppedEarly": self.stopped_early, "history": self.history}


# --- data -------------------------------------------------------------------------------------

def dataset_tensors(data) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """(inputs in order, labels or None) of a Dataset, as CPU tensors in their own dtypes."""
    inputs = getattr(data, "inputs", None)
    arrays = list(inputs.values()) if inputs else [data.X]
    xs = [torch.from_numpy(np.ascontiguousarray(a)) for a in arrays]
    y = getattr(data, "y", None)
    return xs, (torch.from_numpy(np.ascontiguousarray(y)) if y is not None else None)


def output_tensor(out) -> torch.Tensor:
    """The tensor a model returns (Hugging Face outputs: logits, else the first field)."""
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"the model returned {type(out).__name__}, not a tensor")


@torch.no_grad()
def predict(module: nn.Module, xs: list[torch.Tensor], device: str, batch: int = PREDICT_BATCH) -> torch.Tensor:
    """Outputs of ``module`` (put in eval mode) for all rows, on the CPU."""
    module.eval()
    n = len(xs[0])
    outs = [output_tensor(module(*[x[i:i + batch].to(device) for x in xs])).float().cpu() for i in range(0, n, batch)]
    return torch.cat(outs) if outs else torch.empty(0)


def lr_factor(schedule: str, step: int, total: int, warmup: int) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step`` (0-based) of ``total``."""
    if schedule == "constant":
        return 1.0
    if step < warmup:
        return (step + 1) / warmup
    progress_ = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress_)))


# --- the fine-tuner ---------------------------------------------------------------------------

class FineTuner:
    """Fine-tunes modules on ``train``, judged on ``validation``, distilling from ``teacher``.

    The teacher's outputs are computed once and reused by every call (gradual steps, search probes)."""

    def __init__(self, config: FineTuneConfig, train, validation=None, task: str = "classification",
                 teacher: nn.Module | None = None, device: str = "cpu"):
        self.config = config
        self.task = task
        self.device = device
        self.train_x, self.train_y = dataset_tensors(train)
        if validation is not None and len(validation):
            self.val_x, self.val_y = dataset_tensors(validation)
        else:
            self.val_x, self.val_y = None, None
        if task != "embedding" and self.train_y is None:
            raise ValueError(f"{task} fine-tuning needs labels (y)")
        self.distil = teacher is not None and (config.distillation or task == "embedding")
        if task == "embedding" and teacher is None:
            raise ValueError("embedding models are fine-tuned by distillation: a teacher is needed")
        self.teacher_train = self.teacher_val = None
        if self.distil:
            teacher = copy.deepcopy(teacher).to(device)
            self.teacher_train = predict(teacher, self.train_x, device)
            if self.val_x is not None:
                self.teacher_val = predict(teacher, self.val_x, device)
            del teacher

    @property
    def alpha(self) -> float:
        if not self.distil:
            return 0.0
        return 1.0 if self.task == "embedding" else float(self.config.alpha)

    def loss(self, out: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        alpha = self.alpha
        total = out.new_zeros(())
        if alpha > 0:
            total = total + alpha * distillation_loss(self.task, out, self.teacher_train[idx].to(out.device),
                                                      self.config.temperature)
        if alpha < 1:
            total = total + (1 - alpha) * task_loss(self.task, out, self.train_y[idx].to(out.device))
        return total

    @torch.no_grad()
    def score(self, module: nn.Module) -> tuple[float, float] | None:
        """Validation score (higher is better), as (primary, tie-breaker); None without validation data."""
        if self.val_x is None:
            return None
        out = predict(module, self.val_x, self.device)
        if self.task == "embedding":
            return (-float(cosine_loss(out, self.teacher_val)), 0.0)
        loss = float(task_loss(self.task, out, self.val_y))
        if self.task == "classification":
            return (float((out.argmax(-1) == self.val_y).float().mean()), -loss)
        return (-loss, 0.0)

    def batches(self, generator: torch.Generator) -> list[torch.Tensor]:
        n, size = len(self.train_x[0]), self.config.batch_size
        order = torch.randperm(n, generator=generator)
        chunks = [order[i:i + size] for i in range(0, n, size)]
        # A batch of one row breaks BatchNorm in training mode: merge it into the previous one.
        if len(chunks) > 1 and len(chunks[-1]) < 2:
            chunks[-2] = torch.cat([chunks[-2], chunks.pop()])
        return chunks

    def trainable(self, module: nn.Module) -> list[nn.Parameter]:
        return [p for p in module.parameters() if p.requires_grad and p.is_floating_point()]

    def __call__(self, module: nn.Module, description: str = "fine-tuning",
                 epochs: int | None = None) -> FineTuneReport:
        """Fine-tune ``module`` in place (it ends in eval mode, on the CPU)."""
        cfg = self.config
        epochs = cfg.epochs if epochs is None else epochs
        report = FineTuneReport()
        if epochs <= 0:
            return report
        start = time.perf_counter()
        torch.manual_seed(cfg.seed)
        generator = torch.Generator().manual_seed(cfg.seed)
        module.to(self.device)
        params = self.trainable(module)
        optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate)
        steps_per_epoch = len(self.batches(torch.Generator().manual_seed(cfg.seed)))
        total = steps_per_epoch * epochs
        warmup = max(1, int(round(cfg.warmup_fraction * total))) if cfg.lr_schedule == "cosine" else 0
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_factor(cfg.lr_schedule, step, total, warmup))
        early = cfg.patience > 0 and self.val_x is not None
        best_score = self.score(module) if early else None
        best_state = _snapshot(module) if early else None
        since_best = 0
        with progress(description, total=epochs) as bar:
            for epoch in range(1, epochs + 1):
                module.train()
                running, rows = 0.0, 0
                for idx in self.batches(generator):
                    optimizer.zero_grad(set_to_none=True)
                    out = output_tensor(module(*[x[idx].to(self.device) for x in self.train_x]))
                    loss = self.loss(out, idx)
                    loss.backward()
                    optimizer.step()
                    scheduler.step()
                    running += float(loss.detach()) * len(idx)
                    rows += len(idx)
                entry = {"epoch": epoch, "trainLoss": round(running / max(rows, 1), 6)}
                report.epochs_run = epoch
                score = self.score(module)
                if score is not None:
                    entry["validation"] = round(score[0], 6)
                report.history.append(entry)
                bar.advance(**{k: v for k, v in entry.items() if k != "epoch"})
                if early:
                    if score > best_score:
                        best_score, best_state, since_best = score, _snapshot(module), 0
                        report.best_epoch = epoch
                    else:
                        since_best += 1
                        if since_best >= cfg.patience:
                            report.stopped_early = epoch < epochs
                            break
                else:
                    report.best_epoch = epoch
        if early:
            module.load_state_dict(best_state)
            if report.best_epoch != report.epochs_run:
                log("kept the best epoch's weights", best_epoch=report.best_epoch, epochs_run=report.epochs_run,
                    validation=round(best_score[0], 6))
        module.eval().cpu()  # copying back also waits for the device to finish
        report.seconds = time.perf_counter() - start
        return report

    def accumulate_gradients(self, module: nn.Module, batches: int = 4) -> None:
        """Gradients of the fine-tuning loss on a few training batches (for Taylor importance)."""
        module.to(self.device).eval()  # eval: BatchNorm statistics and dropout stay put
        module.zero_grad(set_to_none=True)
        generator = torch.Generator().manual_seed(self.config.seed)
        for idx in self.batches(generator)[:batches]:
            out = output_tensor(module(*[x[idx].to(self.device) for x in self.train_x]))
            if self.alpha == 0 and self.task != "embedding":
                loss = task_loss(self.task, out, self.train_y[idx].to(out.device))
            elif self.alpha > 0:
                loss = self.loss(out, idx)
            else:
                loss = out.float().pow(2).mean()
            loss.backward()
        module.cpu()


def _snapshot(module: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# --- wiring for `kompressor prune` --------------------------------------------------------------

_TUNERS: dict[tuple, FineTuner] = {}


def fine_tuner(compression, source, train, validation, device: str, task: str | None = None) -> FineTuner:
    """The FineTuner for ``spec.compression`` with the uncompressed ``source.module`` as the teacher. One per
    job (search probes and gradual steps reuse it, and so the teacher's outputs are computed once)."""
    task = task or getattr(source, "task", None) or "classification"
    config = config_from_spec(compression, getattr(source, "kind", None))
    key = (id(source.module), id(train), id(validation), repr(config), task, device)
    if key not in _TUNERS:
        _TUNERS.clear()
        _TUNERS[key] = FineTuner(config, train, validation, task=task, teacher=source.module, device=device)
    return _TUNERS[key]


def example_inputs(data, rows: int = 2) -> tuple[torch.Tensor, ...]:
    """A few real rows of ``data`` as positional model inputs (structured pruning traces the model with them)."""
    xs, _ = dataset_tensors(data)
    return tuple(x[:rows] for x in xs)
