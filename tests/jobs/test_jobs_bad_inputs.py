"""Bad input to `kompressor prune` / `evaluate`: a clear message, a non-zero exit, nothing half-written."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from jobs_support import run_cli
from kompressor.errors import UserError
from kompressor_jobs.hardware import cpu_flags, select_device

pytestmark = pytest.mark.slow


@pytest.fixture
def pt2(tmp_path):
    """A small valid torch.export program taking [batch, 30]."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(30, 16), nn.ReLU(), nn.Linear(16, 2))
    path = tmp_path / "model.pt2"
    torch.export.save(torch.export.export(model, (torch.zeros(4, 30),),
                                          dynamic_shapes=({0: torch.export.Dim.DYNAMIC},)), str(path))
    return path


def assert_nothing_written(out):
    assert not out.exists()
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")] == []


def test_corrupt_model_file_exits_2_with_a_clear_message(tmp_path, write_spec, job_env):
    bad = tmp_path / "corrupt.pt2"
    bad.write_bytes(np.random.default_rng(0).bytes(4096))
    spec = write_spec({"model": {"uri": f"file://{bad}", "inputShape": [30]}})
    out = tmp_path / "out" / "candidate"
    result = run_cli("prune", "--spec", str(spec), "--out", str(out), env=job_env)
    assert result.returncode == 2, result.stderr
    message = json.loads(result.stderr.strip().splitlines()[-1])
    assert message["level"] == "error" and "not a readable torch.export program" in message["event"]
    assert "Traceback" not in result.stderr
    assert not out.exists()


def test_truncated_model_file_is_refused(tmp_path, write_spec, jobs, pt2):
    truncated = tmp_path / "truncated.pt2"
    truncated.write_bytes(pt2.read_bytes()[: pt2.stat().st_size // 2])
    out = tmp_path / "candidate"
    code, err = jobs.prune(write_spec({"model": {"uri": f"file://{truncated}", "inputShape": [30]}}), out)
    assert code == 2 and "not a readable torch.export program" in err
    assert_nothing_written(out)


def test_missing_model_file_is_refused(tmp_path, write_spec, jobs):
    out = tmp_path / "candidate"
    code, err = jobs.prune(write_spec({"model": {"uri": f"file://{tmp_path}/none.pt2", "inputShape": [30]}}), out)
    assert code == 2 and "model file not found" in err
    assert_nothing_written(out)


def test_wrong_input_shape_is_refused(tmp_path, write_spec, jobs, pt2):
    out = tmp_path / "candidate"
    code, err = jobs.prune(write_spec({"model": {"uri": f"file://{pt2}", "inputShape": [31]}}), out)
    assert code == 2 and "takes samples of shape [30], but spec.model.inputShape is [31]" in err
    assert_nothing_written(out)
    code, err = jobs.prune(write_spec({"model": {"uri": "builtin://digits-mlp", "inputShape": [8, 8]}}), out)
    assert code == 2 and "whose input shape is [64]" in err
    assert_nothing_written(out)


@pytest.mark.parametrize("case,arrays,message", [
    ("labels out of range", lambda X, y: {"X": X, "y": np.where(y == 1, 5, y)}, "label 5 is out of range"),
    ("empty", lambda X, y: {"X": X[:0], "y": y[:0]}, "empty"),
    ("NaN features", lambda X, y: {"X": np.where(np.arange(X.shape[1]) == 3, np.nan, X), "y": y}, "NaN"),
    ("wrong feature count", lambda X, y: {"X": X[:, :29], "y": y}, "expects input shape [30]"),
])
def test_bad_training_data_is_refused(tmp_path, write_spec, jobs, case, arrays, message):
    from kompressor_jobs.data import load_dataset

    train = load_dataset("builtin://breast_cancer?split=train")
    path = tmp_path / "train.npz"
    np.savez(path, **arrays(train.X, train.y))
    out = tmp_path / "candidate"
    code, err = jobs.prune(write_spec({"data": {"train": f"file://{path}"}}), out)
    assert code == 2, err
    assert message in err and str(path) in err
    assert_nothing_written(out)


def test_retrain_without_retrain_data_is_refused(tmp_path, write_spec, jobs):
    out = tmp_path / "candidate"
    code, err = jobs.prune(write_spec(), out, "--retrain")
    assert code == 2 and "spec.data.retrain is not set" in err
    assert_nothing_written(out)


def test_invalid_spec_names_the_field(tmp_path, write_spec, jobs):
    out = tmp_path / "candidate"
    code, err = jobs.prune(write_spec({"compression": {"pruning": {"method": "magic"}}}), out)
    assert code == 2
    assert "spec.compression.pruning.method" in err and "'magic'" in err, err  # the field and the bad value
    assert_nothing_written(out)
    code, err = jobs.prune(write_spec({"compression": {"pruning": {"sparsity": 1.5}}}), out)
    assert code == 2 and "spec.compression.pruning.sparsity" in err, err
    code, err = jobs.prune(tmp_path / "missing.yaml", out)
    assert code == 2 and "spec file not found" in err
    assert_nothing_written(out)


def test_evaluate_refuses_a_tampered_candidate(tmp_path, write_spec, jobs):
    spec = write_spec({"compression": {"pruning": {"fineTuneEpochs": 0}}})
    candidate = tmp_path / "candidate"
    assert jobs.prune(spec, candidate)[0] == 0
    tampered = tmp_path / "tampered"
    shutil.copytree(candidate, tampered)
    with open(tampered / "model.onnx", "r+b") as fh:
        fh.seek(100)
        fh.write(b"\x00\x01\x02\x03")
    out = tmp_path / "eval"
    code, err = jobs.evaluate(spec, tampered, out)
    assert code == 2 and "does not match the manifest" in err
    assert_nothing_written(out)
    code, err = jobs.evaluate(spec, tmp_path / "nowhere", out)
    assert code == 2 and "no such artifact folder" in err
    assert_nothing_written(out)


def test_parity_failure_is_an_export_error(tmp_path):
    import torch
    from torch import nn

    from kompressor_jobs.compress.export import ExportError, check_parity, export_onnx

    torch.manual_seed(0)
    exported, other = nn.Linear(4, 3), nn.Linear(4, 3)
    export_onnx(exported, [4], tmp_path / "m.onnx")
    batch = np.random.default_rng(0).normal(size=(8, 4)).astype(np.float32)
    assert check_parity(exported, tmp_path / "m.onnx", batch) < 1e-5
    with pytest.raises(ExportError, match="parity check failed"):
        check_parity(other, tmp_path / "m.onnx", batch)


# --- device selection --------------------------------------------------------------------------

@pytest.mark.parametrize("requested,available,expected", [
    ("auto", True, "cuda"), ("auto", False, "cpu"), ("cpu", True, "cpu"), ("cpu", False, "cpu"),
    ("cuda", True, "cuda"),
])
def test_device_selection(requested, available, expected):
    assert select_device(requested, cuda_available=available) == expected


def test_cuda_requested_without_a_gpu_is_an_error():
    with pytest.raises(UserError, match="no CUDA device is visible"):
        select_device("cuda", cuda_available=False)
    with pytest.raises(UserError, match="must be one of"):
        select_device("tpu", cuda_available=False)


def test_cuda_hidden_by_cuda_visible_devices_fails_the_cli(tmp_path, write_spec, job_env):
    out = tmp_path / "candidate"
    result = run_cli("prune", "--spec", str(write_spec()), "--out", str(out), "--device", "cuda",
                     env={**job_env, "CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 2 and "no CUDA device is visible" in result.stderr
    assert not out.exists()


def test_cpu_flags_are_read_from_cpuinfo():
    cpuinfo = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma avx512f avx512_vnni\n"
    assert cpu_flags(cpuinfo) == ["avx", "avx2", "fma", "avx512f", "avx512_vnni"]
    assert cpu_flags("Features\t: fp asimd\n") == ["asimd"]
    assert cpu_flags("") == []


def test_evaluate_refuses_a_consistently_hashed_but_corrupt_model(tmp_path, write_spec, jobs):
    from kompressor.store import read_manifest, write_manifest

    spec = write_spec({"compression": {"pruning": {"fineTuneEpochs": 0}}})
    candidate = tmp_path / "candidate"
    assert jobs.prune(spec, candidate)[0] == 0
    manifest = read_manifest(candidate)
    (candidate / "model.onnx").write_bytes((candidate / "model.onnx").read_bytes()[:500])  # truncated
    write_manifest(candidate, {k: v for k, v in manifest.items() if k not in ("files", "schema")})
    out = tmp_path / "eval"
    code, err = jobs.evaluate(spec, candidate, out)
    assert code == 2 and "ONNX Runtime cannot load the model" in err
    assert_nothing_written(out)
