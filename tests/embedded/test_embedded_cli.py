"""`kompressor run` refuses bad manifests before starting anything."""

import subprocess
import sys

import pytest
import yaml

from runner_process import DIGITS, write_manifest


def run(*args, env=None, timeout=60):
    return subprocess.run([sys.executable, "-m", "kompressor.cli", "run", *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=timeout)


def bad_digits():
    doc = yaml.safe_load(yaml.safe_dump(DIGITS))
    doc["metadata"]["name"] = "Digits"
    doc["spec"]["gates"]["minAccuracy"] = 1.5
    doc["spec"]["drift"]["detektor"] = "ks"
    return doc


def test_bad_manifest_exits_2_naming_every_field_and_starts_nothing(tmp_path, job_env):
    manifest = tmp_path / "cm.yaml"
    write_manifest(manifest, bad_digits())
    workdir = tmp_path / "work"
    result = run(manifest, "--workdir", workdir, env=job_env)
    assert result.returncode == 2
    for field in ("metadata.name", "spec.gates.minAccuracy", "spec.drift.detektor"):
        assert field in result.stderr
    assert "did you mean detector" in result.stderr
    assert not workdir.exists()


def test_second_document_bad_is_named_with_its_index(tmp_path, job_env):
    manifest = tmp_path / "cm.yaml"
    write_manifest(manifest, DIGITS, bad_digits())
    result = run(manifest, "--workdir", tmp_path / "work", env=job_env)
    assert result.returncode == 2
    assert f"{manifest}[1] spec.gates.minAccuracy" in result.stderr
    assert not (tmp_path / "work").exists()


def test_the_same_model_twice_is_refused(tmp_path, job_env):
    manifest = tmp_path / "cm.yaml"
    write_manifest(manifest, DIGITS, DIGITS)
    result = run(manifest, "--workdir", tmp_path / "work", env=job_env)
    assert result.returncode == 2
    assert "default/digits appears more than once" in result.stderr


@pytest.mark.parametrize("text, expected", [
    ("", "holds no CompressedModel"),
    ("spec: [unclosed", "is not valid YAML"),
    ("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n", "kind: must be CompressedModel"),
])
def test_not_a_compressedmodel_file_is_refused(tmp_path, job_env, text, expected):
    manifest = tmp_path / "cm.yaml"
    manifest.write_text(text)
    result = run(manifest, "--workdir", tmp_path / "work", env=job_env)
    assert result.returncode == 2
    assert expected in result.stderr


def test_missing_manifest_file_is_refused(tmp_path, job_env):
    result = run(tmp_path / "nope.yaml", "--workdir", tmp_path / "work", env=job_env)
    assert result.returncode == 2
    assert "no such manifest file" in result.stderr


def test_busy_port_is_refused_before_anything_starts(tmp_path, job_env):
    import socket

    manifest = tmp_path / "cm.yaml"
    write_manifest(manifest, DIGITS)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run(manifest, "--workdir", tmp_path / "work", "--port", port, env=job_env)
    assert result.returncode == 2
    assert f"port {port}" in result.stderr and "default/digits" in result.stderr and "--port" in result.stderr
    assert not (tmp_path / "work").exists()
