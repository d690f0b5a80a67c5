"""Helpers of the packaging tests: the chart rendered by Helm's own engine (offline), lookups."""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "kompressor"
HERE = Path(__file__).resolve().parent
FULL_VALUES = HERE / "values-full.yaml"

RELEASE = "kompressor"
NAMESPACE = "kompressor"


def _load_render_bundle():
    spec = importlib.util.spec_from_file_location("render_bundle", REPO / "charts" / "render_bundle.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


render_bundle = _load_render_bundle()


def render(values: dict | None = None, namespace: str = NAMESPACE, include_crds: bool = False) -> list[dict]:
    """The chart's objects for these values, as `helm install` would create them."""
    return render_bundle.render_chart(values or {}, namespace=namespace, release=RELEASE,
                                      include_crds=include_crds)


def find(objects: list[dict], kind: str, name: str | None = None, namespace: str | None = None) -> list[dict]:
    return [o for o in objects if o["kind"] == kind
            and (name is None or o["metadata"]["name"] == name)
            and (namespace is None or o["metadata"].get("namespace") == namespace)]


def one(objects: list[dict], kind: str, name: str | None = None, namespace: str | None = None) -> dict:
    found = find(objects, kind, name, namespace)
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def full_values() -> dict:
    return yaml.safe_load(FULL_VALUES.read_text())




def checkov_binary() -> str | None:
    """checkov lives in a venv of its own (its pins clash with ours): $KOMPRESSOR_CHECKOV, the one .ci/run makes, or PATH."""
    for candidate in (os.environ.get("KOMPRESSOR_CHECKOV"), str(REPO / ".ci" / ".checkov" / "bin" / "checkov")):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    return shutil.which("checkov")


def require_tool(name: str, path: str | None, hint: str) -> str:
    """The tool's path; a skip where it is missing on a developer's machine, a failure in CI (CI installs it)."""
    if path is None:
        message = f"{name} not found ({hint})"
        if os.environ.get("CI"):
            pytest.fail(message + ": CI must run this check")
        pytest.skip(message)
    return path


def console_tool(name: str) -> str | None:
    """A command installed by a Python test dependency: beside this interpreter (a venv need not be activated), else PATH."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.is_file() else shutil.which(name)
