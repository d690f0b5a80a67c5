"""`kompressor prune` / `evaluate` on the sources users bring, through the CLI: a ResNet with BatchNorm (.pt2 and
.onnx) and the pretrained all-MiniLM-L6-v2 topic classifier with two int64 inputs (Hugging Face folder, .pt2 and
.onnx). Expectations come from the written files and direct ONNX Runtime / PyTorch runs, never hard-coded."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from jobs_support import onnx_weights, run_cli
from kompressor.store import resolve_local, verify_artifact
from support.text_models import minilm_dir, spec_inputs

pytestmark = pytest.mark.slow

DIGITS = {"train": "builtin://digits?split=train", "eval": "builtin://digits?split=eval"}


# --- sources -------------------------------------------------------------------------------------------

def _resnet():
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self, c_in, c_out, stride):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out),
                                      nn.ReLU(), nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False), nn.BatchNorm2d(c_out))
            self.skip = (nn.Identity() if stride == 1 and c_in == c_out else
                         nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)))

        def forward(self, x):
            return torch.relu(self.body(x) + self.skip(x))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(1, 12, 3, padding=1, bias=False), nn.BatchNorm2d(12), nn.ReLU())
            self.blocks = nn.Sequential(Block(12, 12, 1), Block(12, 24, 2))
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(24, 10)

        def forward(self, x):
            return self.fc(self.pool(self.blocks(self.stem(x))).flatten(1))

    return Net()


@pytest.fixture(scope="module")
def resnet(tmp_path_factory, job_env):
    """A small ResNet (BatchNorm, identity and projection shortcuts, adaptive pooling) trained for a few
    epochs on digits [1, 8, 8], saved as .pt2 and as .onnx."""
    import torch

    from kompressor_jobs.data import load_dataset

    torch.manual_seed(0)
    model = _resnet()
    data = load_dataset(DIGITS["train"], [1, 8, 8])
    X, y = torch.from_numpy(data.X), torch.from_numpy(data.y)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(3):
        for i in range(0, len(y), 64):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(X[i:i + 64]), y[i:i + 64]).backward()
            optimizer.step()
    model.eval()
    folder = tmp_path_factory.mktemp("resnet")
    example = (torch.zeros(4, 1, 8, 8),)
    torch.export.save(torch.export.export(model, example, dynamic_shapes=({0: torch.export.Dim("batch")},)),
                      str(folder / "resnet.pt2"))
    torch.onnx.export(model, example, str(folder / "resnet.onnx"), dynamo=False, opset_version=17,
                      input_names=["pixels"], output_names=["logits"],
                      dynamic_axes={"pixels": {0: "batch"}, "logits": {0: "batch"}})
    return folder, model


def ort_outputs(path: Path, feed: dict[str, np.ndarray]) -> np.ndarray:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    rows = len(next(iter(feed.values())))
    return np.concatenate([sess.run(None, {k: v[i:i + 1] for k, v in feed.items()})[0] for i in range(rows)])


def npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def text_spec(models, model_uri: str, **model) -> dict:
    return {"model": {"uri": model_uri, "inputs": spec_inputs(models.seq_len), **model},
            "data": {"train": models.uri("train"), "eval": models.uri("eval")},
            "compression": {"pruning": {"method": "none"}}}


def assert_nothing_written(out: Path) -> None:
    assert not out.exists()
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")] == []


# --- a ResNet with BatchNorm ---------------------------------------------------------------------------

def test_resnet_pt2_is_rebuilt_with_real_batchnorm_and_pruned_through_the_cli(jobs, write_spec, resnet):
    import torch
    from torch import nn

    from kompressor_jobs.models import load_source

    folder, model = resnet
    uri = f"file://{folder / 'resnet.pt2'}"
    source = load_source(uri, [1, 8, 8])
    batch_norms = [m for m in source.module.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(batch_norms) == sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert source.kind == "cnn" and source.output_dim == 10
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(source.module(x), model(x), atol=1e-5)

    spec = write_spec({"model": {"uri": uri, "inputShape": [1, 8, 8]}, "data": DIGITS,
                       "compression": {"pruning": {"method": "unstructured", "sparsity": 0.5, "fineTuneEpochs": 1}},
                       "gates": {"maxAccuracyDrop": 0.2}})
    candidate, manifest, metrics = jobs.prune_and_evaluate(spec)
    assert manifest["model"]["inputs"] == [{"name": "input", "dtype": "float32", "shape": [1, 8, 8]}]
    assert manifest["model"]["format"] == "torch-export" and manifest["model"]["kind"] == "cnn"
    convs = [w for w in onnx_weights(candidate / "model.onnx") if w.ndim == 4]
    assert sum(int((w == 0).sum()) for w in convs) / sum(w.size for w in convs) == pytest.approx(0.5, abs=0.02)
    from kompressor_jobs.data import load_dataset

    data = load_dataset(DIGITS["eval"], [1, 8, 8])
    direct = (ort_outputs(candidate / "model.onnx", {"input": data.X}).argmax(1) == data.y).mean()
    assert metrics["accuracy"] == pytest.approx(direct, abs=1e-6)


def test_builtin_digits_resnet_has_batchnorm_and_residual_blocks(jobs, write_spec, tmp_path):
    import torch
    from torch import nn

    from kompressor_jobs.data import load_dataset
    from kompressor_jobs.models import load_source

    source = load_source("builtin://digits-resnet")
    modules = list(source.module.modules())
    assert source.kind == "resnet" and source.output_dim == 10
    assert sum(isinstance(m, nn.BatchNorm2d) for m in modules) >= 5
    assert any(isinstance(m, nn.AdaptiveAvgPool2d) for m in modules)
    # a residual block adds its input back: zeroing the block's convolutions leaves relu(shortcut(x))
    block = next(m for m in modules if hasattr(m, "shortcut") and len(list(m.shortcut.children())) == 0)
    x = torch.randn(2, block.conv1.in_channels, 8, 8)
    with torch.no_grad():
        block.eval()
        block.bn2.weight.zero_()
        block.bn2.bias.zero_()
        assert torch.allclose(block(x), torch.relu(x))
    spec = write_spec({"model": {"uri": "builtin://digits-resnet"}, "data": DIGITS,
                       "compression": {"pruning": {"method": "none"}}})
    candidate = tmp_path / "candidate"
    code, err = jobs.prune(spec, candidate)
    assert code == 0, err
    data = load_dataset(DIGITS["eval"], [1, 8, 8])
    accuracy = (ort_outputs(candidate / "model.onnx", {"input": data.X}).argmax(1) == data.y).mean()
    assert accuracy > 0.9
    assert {"BatchNormalization", "Conv"} & {n.op_type for n in onnx.load(str(candidate / "model.onnx")).graph.node}


def test_onnx_resnet_is_quantized_and_evaluated_without_torch(tmp_path, write_spec, job_env, resnet):
    """An ONNX source needs no torch: prune (method none + static INT8) and evaluate run with torch, Torch-Pruning
    and Transformers made unimportable."""
    folder, _ = resnet
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'torch_pruning', 'transformers'):\n"
        "            raise ImportError(name + ' is blocked in this test')\n"
        "sys.meta_path.insert(0, Block())\n")
    env = {**job_env, "PYTHONPATH": str(blocker)}
    spec = write_spec({"model": {"uri": f"file://{folder / 'resnet.onnx'}", "inputShape": [1, 8, 8]}, "data": DIGITS,
                       "compression": {"pruning": {"method": "none"}, "quantization": {"mode": "static-int8"}},
                       "gates": {"maxAccuracyDrop": 0.05}})
    candidate, evaluation = tmp_path / "candidate", tmp_path / "eval"
    pruned = run_cli("prune", "--spec", str(spec), "--out", str(candidate), env=env)
    assert pruned.returncode == 0, pruned.stderr
    evaluated = run_cli("evaluate", "--spec", str(spec), "--candidate", str(candidate), "--out", str(evaluation),
                        env=env)
    assert evaluated.returncode == 0, evaluated.stderr
    manifest = verify_artifact(candidate)
    assert manifest["model"]["format"] == "onnx" and manifest["inputs"][0]["name"] == "pixels"
    ops = {n.op_type for n in onnx.load(str(candidate / "model.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    # the baseline is the source graph itself, byte for byte
    baseline = resolve_local(manifest["baseline"]["uri"]) / "model.onnx"
    assert baseline.read_bytes() == (folder / "resnet.onnx").read_bytes()
    metrics = json.loads((evaluation / "metrics.json").read_text())
    assert metrics["accuracy"] > 0.5 and metrics["baseline"]["metrics"]["accuracy"] > 0.5


def test_pruning_an_onnx_source_is_refused_with_what_to_do_instead(tmp_path, write_spec, jobs, resnet):
    folder, _ = resnet
    for compression in ({"pruning": {"method": "structured", "sparsity": 0.5}},
                        {"pruning": {"method": "none"}, "search": {"enabled": True}}):
        out = tmp_path / "candidate"
        spec = write_spec({"model": {"uri": f"file://{folder / 'resnet.onnx'}", "inputShape": [1, 8, 8]},
                           "data": DIGITS, "compression": compression})
        code, err = jobs.prune(spec, out)
        assert code == 2, err
        assert "pruning an ONNX source is not supported" in err
        assert "method: none" in err and "torch.export" in err and "resnet.onnx" in err
        assert_nothing_written(out)


# --- the pretrained MiniLM, two int64 inputs ------------------------------------------------------------

def test_minilm_hugging_face_folder_is_exported_with_named_int64_inputs_and_evaluated(jobs, write_spec,
                                                                                      text_models):
    spec = write_spec(text_spec(text_models, text_models.uri("hf_dir"), format="auto"))
    candidate, manifest, metrics = jobs.prune_and_evaluate(spec)
    assert manifest["model"]["format"] == "huggingface" and manifest["model"]["kind"] == "transformer"
    assert [(i["name"], i["dtype"], i["shape"]) for i in manifest["inputs"]] == [
        ("input_ids", "int64", [-1, text_models.seq_len]), ("attention_mask", "int64", [-1, text_models.seq_len])]
    assert manifest["outputs"][0]["name"] == "logits" and manifest["outputs"][0]["shape"] == [-1, 4]
    data = npz(text_models.eval)
    feed = {k: data[k] for k in ("input_ids", "attention_mask")}
    logits = ort_outputs(candidate / "model.onnx", feed)
    assert metrics["accuracy"] == pytest.approx((logits.argmax(1) == data["y"]).mean(), abs=1e-6)
    assert metrics["accuracy"] > 0.9  # the pretrained encoder with its trained head separates the topics
    # what PyTorch computes with Transformers itself, outside Kompressor
    import torch
    from transformers import AutoModelForSequenceClassification

    hf = AutoModelForSequenceClassification.from_pretrained(str(text_models.hf_dir), local_files_only=True).eval()
    with torch.no_grad():
        expected = hf(**{k: torch.from_numpy(v[:8]) for k, v in feed.items()}).logits.numpy()
    assert np.allclose(logits[:8], expected, atol=1e-4)


def test_minilm_pt2_takes_its_two_int64_inputs_positionally_and_is_pruned(jobs, write_spec, text_models):
    spec = write_spec(text_spec(text_models, text_models.uri("pt2")) | {
        "compression": {"pruning": {"method": "unstructured", "sparsity": 0.3, "fineTuneEpochs": 0}}})
    candidate = jobs.tmp_path / "candidate"
    code, err = jobs.prune(spec, candidate)
    assert code == 0, err
    manifest = verify_artifact(candidate)
    assert manifest["model"]["format"] == "torch-export"
    assert [i["name"] for i in manifest["inputs"]] == ["input_ids", "attention_mask"]
    # the batch stays dynamic: one row and 40 rows both run
    data = npz(text_models.eval)
    feed = {k: data[k][:40] for k in ("input_ids", "attention_mask")}
    assert ort_outputs(candidate / "model.onnx", {k: v[:1] for k, v in feed.items()}).shape == (1, 4)
    assert ort_outputs(candidate / "model.onnx", feed).shape == (40, 4)
    # the linear layers of the encoder are pruned to the target
    matrices = [w for w in onnx_weights(candidate / "model.onnx") if w.ndim == 2 and set(w.shape) <= {384, 1536}]
    zeros = sum(int((w == 0).sum()) for w in matrices) / sum(w.size for w in matrices)
    assert zeros == pytest.approx(0.3, abs=0.03)


def test_minilm_onnx_is_quantized_alone(jobs, write_spec, text_models):
    spec = write_spec(text_spec(text_models, text_models.uri("onnx")) | {
        "compression": {"pruning": {"method": "none"}, "quantization": {"mode": "dynamic-int8"}}})
    candidate = jobs.tmp_path / "candidate"
    code, err = jobs.prune(spec, candidate)
    assert code == 0, err
    manifest = verify_artifact(candidate)
    assert manifest["model"]["format"] == "onnx" and manifest["achieved"]["method"] == "none"
    graph = onnx.load(str(candidate / "model.onnx")).graph
    assert {"DynamicQuantizeLinear", "MatMulInteger"} & {n.op_type for n in graph.node}
    assert (candidate / "model.onnx").stat().st_size < 0.5 * text_models.onnx.stat().st_size
    data = npz(text_models.eval)
    feed = {k: data[k] for k in ("input_ids", "attention_mask")}
    agree = ort_outputs(candidate / "model.onnx", feed).argmax(1) == ort_outputs(text_models.onnx, feed).argmax(1)
    assert agree.mean() >= 0.9


def test_minilm_embedding_task_matches_sentence_transformers(jobs, write_spec, text_models, tmp_path, monkeypatch):
    """task: embedding on the untouched sentence-transformers folder, on a PVC: mean pooling + normalisation, as
    the sentence-transformers library computes it."""
    shutil.copytree(minilm_dir(), tmp_path / "volumes" / "models" / "minilm")  # a user's folder on a claim
    monkeypatch.setenv("KOMPRESSOR_PVC_ROOT", str(tmp_path / "volumes"))
    spec = write_spec(text_spec(text_models, "pvc://models/minilm", task="embedding"))
    candidate = tmp_path / "candidate"
    code, err = jobs.prune(spec, candidate)
    assert code == 0, err
    manifest = verify_artifact(candidate)
    assert manifest["model"]["task"] == "embedding" and manifest["outputs"][0]["name"] == "outputs"
    assert manifest["model"]["outputDim"] == 384 and manifest["outputs"][0]["shape"][0] == -1
    texts = json.loads((text_models.root / "texts.json").read_text())["eval"][:6]
    from support.text_models import tokenize

    ours = ort_outputs(candidate / "model.onnx", tokenize(texts, text_models.seq_len))
    assert ours.shape == (6, 384)
    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(str(minilm_dir()), device="cpu", local_files_only=True)
    reference.max_seq_length = text_models.seq_len
    expected = reference.encode(texts, convert_to_numpy=True)
    cosine = (ours * expected).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(expected, axis=1)
    assert cosine.min() > 0.999 and np.allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-4)


# --- bad input: exit 2, the input / dtype / file named, nothing written ---------------------------------

@pytest.mark.parametrize("case,arrays,expected", [
    ("a missing input", lambda d: {"input_ids": d["input_ids"], "y": d["y"]}, ["attention_mask", "int64"]),
    ("the wrong dtype", lambda d: {**d, "input_ids": d["input_ids"].astype(np.float32)},
     ["input_ids", "float32", "int64"]),
    ("the wrong shape", lambda d: {**d, "attention_mask": d["attention_mask"][:, :16]},
     ["attention_mask", "[16]", "[32]"]),
])
def test_data_not_matching_the_inputs_is_refused(tmp_path, write_spec, jobs, text_models, case, arrays, expected):
    bad = tmp_path / "train.npz"
    np.savez(bad, **arrays(npz(text_models.train)))
    spec = text_spec(text_models, text_models.uri("onnx"))
    spec["data"]["train"] = f"file://{bad}"
    out = tmp_path / "candidate"
    code, err = jobs.prune(write_spec(spec), out)
    assert code == 2, err
    for part in [*expected, str(bad)]:
        assert part in err, (case, err)
    assert_nothing_written(out)


def test_onnx_inputs_differing_from_the_spec_are_named(tmp_path, write_spec, jobs, text_models):
    spec = text_spec(text_models, text_models.uri("onnx"))
    spec["model"]["inputs"] = [{"name": "input_ids", "dtype": "int64", "shape": [32]},
                               {"name": "token_type_ids", "dtype": "int64", "shape": [32]}]
    out = tmp_path / "candidate"
    code, err = jobs.prune(write_spec(spec), out)
    assert code == 2, err
    assert "token_type_ids" in err and "attention_mask" in err and str(text_models.onnx) in err
    assert_nothing_written(out)


def test_hugging_face_folder_without_weights_is_refused(tmp_path, write_spec, jobs, text_models):
    folder = tmp_path / "no-weights"
    folder.mkdir()
    for f in text_models.hf_dir.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, folder / f.name)
    out = tmp_path / "candidate"
    code, err = jobs.prune(write_spec(text_spec(text_models, f"file://{folder}")), out)
    assert code == 2, err
    assert "has no weights" in err and str(folder) in err
    assert_nothing_written(out)


def test_bare_encoder_as_a_classifier_is_refused(tmp_path, write_spec, jobs, text_models):
    """The sentence-transformers folder has no classification head: loading it as a classifier would start from
    random head weights, so the job refuses and says what to do."""
    out = tmp_path / "candidate"
    code, err = jobs.prune(write_spec(text_spec(text_models, f"file://{minilm_dir()}")), out)
    assert code == 2, err
    assert "classifier.weight" in err and "task: embedding" in err
    assert_nothing_written(out)
