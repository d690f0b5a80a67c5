"""Accuracy recovery through compress.finetune's and compress.pruning's public functions: distillation from
the uncompressed model, early stopping that keeps the best epoch, the learning-rate schedule, several inputs
of different dtypes."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kompressor_jobs.compress.finetune import FineTuneConfig, FineTuner, lr_factor, predict
from kompressor_jobs.compress.pruning import prune_model
from kompressor_jobs.data import load_dataset, split_validation


@pytest.fixture(scope="module")
def digits():
    train = load_dataset("builtin://digits?split=train", [64])
    evaluation = load_dataset("builtin://digits?split=eval", [64])
    train, validation = split_validation(train, 0.2, seed=0)
    return train, validation, evaluation


@pytest.fixture(scope="module")
def teacher(digits):
    train, validation, _ = digits
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))
    FineTuner(FineTuneConfig(epochs=15, patience=0), train, validation, task="classification")(model)
    return model.eval()


def _x(data) -> list[torch.Tensor]:
    return [torch.from_numpy(a) for a in data.inputs.values()]


def _kl_to(teacher: nn.Module, student: nn.Module, data) -> float:
    t, s = predict(teacher, _x(data), "cpu"), predict(student, _x(data), "cpu")
    return float(F.kl_div(F.log_softmax(s, 1), F.log_softmax(t, 1), log_target=True, reduction="batchmean"))


def test_distillation_brings_a_pruned_model_closer_to_the_uncompressed_one(digits, teacher):
    """Fine-tuning data with 40 % wrong labels (as drifted, weakly labelled retraining data is): the labels
    alone pull the pruned model away from what the uncompressed model learnt; the teacher's outputs keep it
    close. The gap is the KL divergence to the teacher's predictions on the eval split."""
    train, validation, evaluation = digits
    rng = np.random.default_rng(0)
    y = train.y.copy()
    flip = rng.random(len(y)) < 0.4
    y[flip] = rng.integers(0, 10, int(flip.sum()))
    noisy = dataclasses.replace(train, y=y)
    example = tuple(x[:2] for x in _x(train))
    gaps = {}
    for distil in (False, True):
        config = FineTuneConfig(epochs=3, patience=0, distillation=distil)  # default temperature and alpha
        tuner = FineTuner(config, noisy, validation, task="classification", teacher=teacher)
        result = prune_model(copy.deepcopy(teacher), "structured", 0.7, fine_tune=tuner, example=example)
        assert result.params_after < result.params_before
        gaps[distil] = _kl_to(teacher, result.module, evaluation)
    assert gaps[True] < gaps[False]


def test_early_stopping_keeps_the_best_epoch_and_stops(digits, teacher):
    train, validation, _ = digits
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    # A learning rate this large wrecks the trained model: the best weights are the ones it started from.
    tuner = FineTuner(FineTuneConfig(epochs=6, learning_rate=2.0, lr_schedule="constant", patience=2),
                      train, validation, task="classification")
    student = copy.deepcopy(teacher)
    report = tuner(student)
    assert report.stopped_early and report.epochs_run == 2
    assert report.best_epoch == 0
    assert all(h["validation"] < tuner.score(teacher)[0] for h in report.history)
    for key, value in student.state_dict().items():
        torch.testing.assert_close(value, before[key])


def test_the_kept_weights_are_the_best_validation_epoch(digits):
    train, validation, _ = digits
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    tuner = FineTuner(FineTuneConfig(epochs=4, patience=3), train, validation, task="classification")
    start = tuner.score(model)[0]
    report = tuner(model)
    scores = [start] + [h["validation"] for h in report.history]
    assert scores[report.best_epoch] == max(scores)  # ties go to the lower validation loss
    assert tuner.score(model)[0] == pytest.approx(max(scores), abs=1e-6)


def test_warm_up_then_cosine_decay_or_constant():
    total, warmup = 100, 10
    cosine = [lr_factor("cosine", s, total, warmup) for s in range(total)]
    assert cosine[0] < cosine[5] < cosine[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(cosine[warmup:], cosine[warmup + 1:]))  # decays after the warm-up
    assert cosine[-1] < 0.01
    assert {lr_factor("constant", s, total, 0) for s in range(total)} == {1.0}


def test_named_inputs_of_mixed_dtypes_train_only_float_parameters():
    """Token ids (int64) and a float feature, as a text model with side features takes them; embedding
    distillation has no labels."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 20, (64, 6), generator=g)
    extra = torch.randn(64, 3, generator=g)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(20, 8)
            self.proj = nn.Linear(8 + 3, 16)
            self.register_buffer("steps", torch.zeros((), dtype=torch.int64))

        def forward(self, ids, extra):
            return self.proj(torch.cat([self.emb(ids).mean(1), extra], 1))

    class Data:
        inputs = {"input_ids": ids.numpy(), "extra": extra.numpy()}
        y = None

        def __len__(self):
            return 64

    torch.manual_seed(0)
    teacher = Model().eval()
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        student.proj.weight.mul_(0.5)
    tuner = FineTuner(FineTuneConfig(epochs=3, patience=0, learning_rate=1e-2), Data(), Data(), task="embedding",
                      teacher=teacher)
    gap_before = -tuner.score(student)[0]
    report = tuner(student)
    assert report.epochs_run == 3
    assert -tuner.score(student)[0] < gap_before  # cosine distance to the teacher shrank
    assert student.steps.dtype == torch.int64


@pytest.mark.slow
@pytest.mark.parametrize("method, sparsity, max_drop", [("structured", 0.5, 0.01), ("unstructured", 0.8, 0.02),
                                                         ("global", 0.8, 0.02)])
def test_default_recovery_keeps_a_resnet_within_its_target(jobs, write_spec, method, sparsity, max_drop):
    """The issue's targets with the default fine-tuning (epochs, learning rate, schedule, distillation, early
    stopping): 50 % of a ResNet's channels within 1 point, 80 % of its weights within 2 points."""
    spec = write_spec({"model": {"uri": "builtin://digits-resnet"},
                       "data": {"train": "builtin://digits?split=train", "eval": "builtin://digits?split=eval"},
                       "compression": {"pruning": {"method": method, "sparsity": sparsity}}},
                      name=f"{method}.yaml")
    # write_spec's base sets fineTuneEpochs: drop it so that the API default applies.
    import yaml

    doc = yaml.safe_load(spec.read_text())
    doc["spec"]["compression"]["pruning"].pop("fineTuneEpochs", None)
    spec.write_text(yaml.safe_dump(doc))
    _, manifest, metrics = jobs.prune_and_evaluate(spec, name=method)
    baseline = metrics["baseline"]["metrics"]["accuracy"]
    assert baseline - metrics["accuracy"] <= max_drop, (method, baseline, metrics["accuracy"])
    assert manifest["achieved"]["distillation"]["enabled"]
