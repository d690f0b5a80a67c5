"""Fixtures for the prune/evaluate job tests: one model cache per session, spec files, CLI runners."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import yaml

from kompressor import cli
from support.dicts import merge

BASE_SPEC = {
    "apiVersion": "kompressor.io/v1alpha1",
    "kind": "CompressedModel",
    "metadata": {"name": "jobs-test", "namespace": "default"},
    "spec": {
        "model": {"uri": "builtin://breast-cancer-mlp"},
        "data": {"train": "builtin://breast_cancer?split=train", "eval": "builtin://breast_cancer?split=eval"},
        "compression": {"pruning": {"method": "unstructured", "sparsity": 0.5, "fineTuneEpochs": 1}},
    },
}


@pytest.fixture(scope="session", autouse=True)
def job_env(tmp_path_factory):
    """Session-wide cache (builtin models train once), one thread per library, JSON logs."""
    import torch

    cache = os.environ.get("KOMPRESSOR_CACHE") or str(tmp_path_factory.mktemp("kompressor-cache"))
    env = {"KOMPRESSOR_CACHE": cache, "OMP_NUM_THREADS": "1", "KOMPRESSOR_ORT_THREADS": "1",
           "KOMPRESSOR_JSON_LOGS": "1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield {**os.environ, **env}
    torch.set_num_threads(threads)
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def write_spec(tmp_path):
    """write_spec(spec_overrides) -> path of a CompressedModel YAML based on BASE_SPEC."""
    counter = iter(range(1000))

    def write(override: dict | None = None, name: str | None = None) -> Path:
        doc = copy.deepcopy(BASE_SPEC)
        doc["spec"] = merge(doc["spec"], override or {})
        path = tmp_path / (name or f"spec-{next(counter)}.yaml")
        path.write_text(yaml.safe_dump(doc))
        return path

    return write


class Jobs:
    """Runs `kompressor prune` / `kompressor evaluate` through the CLI's main (in-process: torch is
    imported once per session) and returns (exit code, stderr)."""

    def __init__(self, capsys, tmp_path: Path):
        self.capsys = capsys
        self.tmp_path = tmp_path
        self.baselines = Path(os.environ["KOMPRESSOR_CACHE"]) / "baselines"

    def run(self, *argv: str) -> tuple[int, str]:
        self.capsys.readouterr()
        code = cli.main(["--json-logs", *argv])
        return code, self.capsys.readouterr().err

    def prune(self, spec: Path, out: Path, *extra: str) -> tuple[int, str]:
        return self.run("prune", "--spec", str(spec), "--out", str(out), "--baseline-cache", str(self.baselines),
                        *extra)

    def evaluate(self, spec: Path, candidate: Path, out: Path) -> tuple[int, str]:
        return self.run("evaluate", "--spec", str(spec), "--candidate", str(candidate), "--out", str(out))

    def prune_and_evaluate(self, spec: Path, name: str = "r1") -> tuple[Path, dict, dict]:
        candidate, evaluation = self.tmp_path / name / "candidate", self.tmp_path / name / "eval"
        code, err = self.prune(spec, candidate)
        assert code == 0, err
        code, err = self.evaluate(spec, candidate, evaluation)
        assert code == 0, err
        manifest = json.loads((candidate / "manifest.json").read_text())
        metrics = json.loads((evaluation / "metrics.json").read_text())
        return candidate, manifest, metrics


@pytest.fixture
def jobs(capsys, tmp_path):
    return Jobs(capsys, tmp_path)


@pytest.fixture(scope="session")
def text_models(job_env):
    """The pretrained MiniLM topic classifier as a Hugging Face folder, a .pt2 and an .onnx, with its tokenized
    data (tests/support/text_models.py); built once and cached under KOMPRESSOR_CACHE."""
    from support.text_models import text_models as build

    return build(Path(job_env["KOMPRESSOR_CACHE"]) / "test-fixtures")
