"""Source models on s3://, read from an in-process S3 server (moto's ThreadedMotoServer, spoken to over HTTP by
s3fs exactly as a real endpoint would be): a Hugging Face folder, an ONNX file, and a folder without weights.

s3fs and moto[server] are in the test extra, so a missing one fails the import rather than skipping.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

import s3fs  # noqa: F401 - the s3 extra; fail here, not later, when it is missing
from moto import server as moto_server

from kompressor.errors import UserError
from kompressor_jobs.models import load_source
from support.net import free_port
from support.text_models import spec_inputs

BUCKET = "models"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """An S3 endpoint on 127.0.0.1 with one bucket; the environment points botocore at it (as a Job's would)."""
    mp = pytest.MonkeyPatch()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    for key, value in {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "test",
                       "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        mp.setenv(key, value)
    import fsspec

    fsspec.filesystem("s3").clear_instance_cache()
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    fs.mkdir(BUCKET)
    yield fs
    fsspec.filesystem("s3").clear_instance_cache()
    server.stop()
    mp.undo()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A fresh source cache per test: what is read comes from S3, not from an earlier test's copy."""
    monkeypatch.setenv("KOMPRESSOR_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _put(fs, local: Path, key: str) -> str:
    fs.put(str(local), f"{BUCKET}/{key}", recursive=local.is_dir())
    return f"s3://{BUCKET}/{key}"


def _first_rows(path: Path, n: int = 4) -> dict[str, np.ndarray]:
    with np.load(path) as f:
        return {k: f[k][:n] for k in ("input_ids", "attention_mask")}


def test_hugging_face_folder_and_onnx_file_load_from_s3(s3, cache, tmp_path, text_models):
    import torch

    uri = _put(s3, text_models.hf_dir, "minilm/hf-classifier")
    inputs = spec_inputs(text_models.seq_len)
    remote = load_source(uri, inputs)
    local = load_source(text_models.uri("hf_dir"), inputs)
    assert (remote.format, remote.task, remote.output_dim) == ("huggingface", "classification", 4)
    assert remote.digest == local.digest  # the same files, fetched
    assert cache in remote.path.parents  # a local copy under the cache, read offline from there
    rows = _first_rows(text_models.eval)
    with torch.no_grad():
        ours, theirs = (m.module(*(torch.from_numpy(rows[i.name]) for i in m.inputs)) for m in (remote, local))
    np.testing.assert_allclose(ours.numpy(), theirs.numpy(), atol=1e-5)

    onnx_uri = _put(s3, text_models.onnx, "minilm/classifier.onnx")
    graph = load_source(onnx_uri)
    assert graph.format == "onnx" and graph.module is None and graph.path.name == "classifier.onnx"
    assert [i.name for i in graph.inputs] == ["input_ids", "attention_mask"]
    # Uploaded again under the same URI, the model is fetched again (the copy is keyed by the objects' ETags).
    from onnx_models import linear

    other = linear(tmp_path / "linear.onnx", np.eye(3), np.zeros(3))
    _put(s3, other, "minilm/classifier.onnx")
    again = load_source(onnx_uri)
    assert again.digest != graph.digest and [i.name for i in again.inputs] == ["input"]


def test_missing_s3_object_is_a_user_error_naming_the_uri(s3, cache):
    with pytest.raises(UserError, match=rf"s3://{BUCKET}/nowhere/model.onnx"):
        load_source(f"s3://{BUCKET}/nowhere/model.onnx")
    assert not any(p.is_file() for p in cache.rglob("*")) if cache.exists() else True  # nothing left behind


def test_hugging_face_folder_without_weights_on_s3_exits_2(s3, cache, tmp_path, write_spec, jobs, text_models):
    folder = tmp_path / "no-weights"
    folder.mkdir()
    for f in text_models.hf_dir.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, folder / f.name)
    uri = _put(s3, folder, "broken/hf-classifier")
    spec = {"model": {"uri": uri, "inputs": spec_inputs(text_models.seq_len)},
            "data": {"train": text_models.uri("train"), "eval": text_models.uri("eval")},
            "compression": {"pruning": {"method": "none"}}}
    out = tmp_path / "candidate"
    code, err = jobs.prune(write_spec(spec), out)
    assert code == 2, err
    assert uri in err and "has no weights" in err and "model.safetensors" in err
    assert not out.exists()
