"""The committed CRD is exactly what the API dataclasses generate."""

from pathlib import Path

import yaml

from kompressor.api.crd import build_crd, render_crd

ROOT = Path(__file__).resolve().parents[2]
CRD_FILE = ROOT / "crds" / "compressedmodels.kompressor.io.yaml"


def test_committed_crd_matches_the_python_model():
    assert CRD_FILE.read_text() == render_crd(), "run `kompressor crd > crds/compressedmodels.kompressor.io.yaml`"


def _walk(schema, path="openAPIV3Schema"):
    yield path, schema
    for name, sub in (schema.get("properties") or {}).items():
        yield from _walk(sub, f"{path}.{name}")
    if isinstance(schema.get("items"), dict):
        yield from _walk(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        yield from _walk(schema["additionalProperties"], f"{path}{{}}")


def test_every_spec_and_status_field_has_a_description():
    root = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    missing = [p for p, s in _walk(root) if p.count(".") > 1 and not s.get("description")]
    assert missing == []


def test_the_crd_names_and_columns():
    crd = yaml.safe_load(CRD_FILE.read_text())
    names = crd["spec"]["names"]
    assert (crd["spec"]["group"], names["kind"], names["plural"]) == ("kompressor.io", "CompressedModel", "compressedmodels")
    assert names["shortNames"] == ["cmodel"] and names["categories"] == ["kompressor"]
    version = crd["spec"]["versions"][0]
    assert version["name"] == "v1alpha1" and version["subresources"] == {"status": {}}
    assert [c["name"] for c in version["additionalPrinterColumns"]] == [
        "Phase", "Revision", "Sparsity", "Accuracy", "Drift", "Candidate", "Weight", "Live", "Online", "Age"]
