"""Artifact folders: ``model.onnx`` plus ``manifest.json`` listing every file's sha256.

Manifest contract (written by `kompressor prune`, read by everyone):
``{"schema": "kompressor.io/artifact/v1", "files": {"model.onnx": "<sha256>", ...}, ...}``;
the rest (revision, lineage, inputs, compression config, versions, hardware) is free-form.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from kompressor.errors import UserError

MODEL_FILE = "model.onnx"
MANIFEST_FILE = "manifest.json"
MANIFEST_SCHEMA = "kompressor.io/artifact/v1"


class ArtifactError(UserError):
    """A missing, unreadable or tampered artifact."""


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(folder: str | Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Hash every file in ``folder`` (recursively, but not the manifest) into ``manifest["files"]``
    and write it atomically. Returns the manifest written."""
    folder = Path(folder)
    files = {
        str(p.relative_to(folder)): sha256_file(p)
        for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST_FILE
    }
    out = {"schema": MANIFEST_SCHEMA, **manifest, "files": files}
    tmp = folder / f".{MANIFEST_FILE}.tmp"
    tmp.write_text(json.dumps(out, indent=2, sort_keys=True, default=str))
    os.replace(tmp, folder / MANIFEST_FILE)
    return out


def read_manifest(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / MANIFEST_FILE
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise ArtifactError(f"{folder}: no {MANIFEST_FILE}; not an artifact folder") from None
    except (OSError, ValueError) as err:
        raise ArtifactError(f"{path}: unreadable manifest: {err}") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise ArtifactError(f"{path}: manifest has no 'files' table")
    return manifest


def verify_artifact(folder: str | Path, expected_sha256: str | None = None) -> dict[str, Any]:
    """Check every file against the manifest (and model.onnx against ``expected_sha256``,
    e.g. from the CR status). Returns the manifest; raises ArtifactError on any mismatch."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if MODEL_FILE not in manifest["files"]:
        raise ArtifactError(f"{folder}: manifest lists no {MODEL_FILE}")
    for name, digest in manifest["files"].items():
        path = (folder / name).resolve()
        if folder.resolve() not in path.parents:
            raise ArtifactError(f"{folder}: manifest names a file outside the artifact: {name}")
        if not path.is_file():
            raise ArtifactError(f"{folder}: {name} is listed in the manifest but missing")
        actual = sha256_file(path)
        if actual != digest:
            raise ArtifactError(f"{folder}: {name} sha256 {actual} does not match the manifest ({digest})")
    if expected_sha256 and manifest["files"][MODEL_FILE] != expected_sha256:
        raise ArtifactError(
            f"{folder}: {MODEL_FILE} sha256 {manifest['files'][MODEL_FILE]} is not the expected {expected_sha256}")
    return manifest
