import json

import pytest

from kompressor.store import ArtifactError, StoreError, open_store, verify_artifact, write_manifest


def _artifact(folder, payload=b"onnx-bytes"):
    folder.mkdir(parents=True)
    (folder / "model.onnx").write_bytes(payload)
    return write_manifest(folder, {"revision": 1})


def test_put_and_verify_roundtrip(tmp_path):
    manifest = _artifact(tmp_path / "work")
    store = open_store(f"file://{tmp_path}/store")
    uri = store.put_dir(tmp_path / "work", "default/digits/r1/candidate")
    assert uri == f"file://{tmp_path}/store/default/digits/r1/candidate"
    folder = store.fetch_dir("default/digits/r1/candidate")
    assert verify_artifact(folder, manifest["files"]["model.onnx"])["revision"] == 1


def test_tampered_model_is_refused(tmp_path):
    _artifact(tmp_path / "a")
    (tmp_path / "a" / "model.onnx").write_bytes(b"evil")
    with pytest.raises(ArtifactError, match="does not match"):
        verify_artifact(tmp_path / "a")


def test_expected_digest_mismatch_is_refused(tmp_path):
    _artifact(tmp_path / "a")
    with pytest.raises(ArtifactError, match="not the expected"):
        verify_artifact(tmp_path / "a", "0" * 64)


def test_manifest_pointing_outside_is_refused(tmp_path):
    _artifact(tmp_path / "a")
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    manifest["files"]["../secret"] = "0" * 64
    (tmp_path / "a" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="outside"):
        verify_artifact(tmp_path / "a")


@pytest.mark.parametrize("key", ["../etc", "a/../../b", "/abs", "", "a//b"])
def test_keys_cannot_escape_the_root(tmp_path, key):
    with pytest.raises(StoreError, match="invalid artifact key"):
        open_store(f"file://{tmp_path}").uri(key)


@pytest.mark.parametrize("uri", ["file://../../etc/passwd", "file:///data/../etc", "http://x/y", "ftp://a/b"])
def test_bad_store_uris_are_refused(uri):
    with pytest.raises(StoreError):
        open_store(uri)


def test_pvc_maps_to_the_mounted_claim(tmp_path, monkeypatch):
    monkeypatch.setenv("KOMPRESSOR_PVC_ROOT", str(tmp_path))
    store = open_store("pvc://artifacts/kompressor")
    assert store.path("ns/m") == tmp_path / "artifacts" / "kompressor" / "ns" / "m"
