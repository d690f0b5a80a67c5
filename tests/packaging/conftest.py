"""Session-wide renderings of the chart and one checkov run, shared by the packaging tests."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest
import yaml

from chartkit import REPO, checkov_binary, full_values, render, require_tool

# The renderings every test shares: defaults, every feature on, and a single-namespace standalone operator.
RENDERINGS = {
    "default": {},
    "full": None,  # values-full.yaml
    "namespaced": {"watchNamespace": "ml", "peering": {"enabled": False}},
}


@pytest.fixture(scope="session")
def renderings() -> dict[str, list[dict]]:
    out = {}
    for label, values in RENDERINGS.items():
        out[label] = render(full_values() if values is None else values)
    return out


@pytest.fixture(scope="session")
def default_objects(renderings) -> list[dict]:
    return renderings["default"]


@pytest.fixture(scope="session")
def full_objects(renderings) -> list[dict]:
    return renderings["full"]


@pytest.fixture(scope="session")
def checkov_report(renderings, tmp_path_factory) -> dict:
    """checkov over every rendering, the plain bundle and both Dockerfiles, in ONE run (it is slow)."""
    binary = require_tool("checkov", checkov_binary(), "set KOMPRESSOR_CHECKOV; .ci/run installs it")
    root = tmp_path_factory.mktemp("checkov")
    for label, objects in renderings.items():
        (root / f"chart-{label}.yaml").write_text("---\n".join(yaml.safe_dump(o) for o in objects))
    shutil.copy(REPO / "charts" / "bundle" / "kompressor.yaml", root / "bundle.yaml")
    for image in ("operator", "jobs"):
        (root / image).mkdir()
        shutil.copy(REPO / image / "Dockerfile", root / image / "Dockerfile")
    proc = subprocess.run(
        [binary, "--directory", str(root), "--framework", "kubernetes", "dockerfile", "--output", "json",
         "--skip-download", "--compact"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "BC_SKIP_MAPPING": "TRUE"},
    )
    try:
        reports = json.loads(proc.stdout)
    except json.JSONDecodeError:
        pytest.fail(f"checkov gave no JSON (exit {proc.returncode}): {proc.stderr[-2000:]}")
    reports = reports if isinstance(reports, list) else [reports]
    return {r["check_type"]: r for r in reports}
