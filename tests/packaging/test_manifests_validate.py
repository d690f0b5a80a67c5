"""Every manifest we ship, validated against the Kubernetes 1.30 OpenAPI schemas (kubernetes-validate,
strict: unknown fields are errors), and custom resources against their CRD's schema.

The examples/ CompressedModels are checked here against the CRD's openAPIV3Schema; the full API-server
check of the examples (schema after defaulting + every CEL rule) is tests/api/test_examples.py.
"""

from __future__ import annotations

import jsonschema
import kubernetes_validate
import pytest
import yaml

from chartkit import CHART, REPO

K8S_VERSION = "1.30.0"
# Kinds from CRDs that are not in this repository (prometheus-operator): no schema offline. Their fields
# are checked in test_chart.py::test_optional_features_render_when_enabled.
NO_SCHEMA_OFFLINE = {"monitoring.coreos.com/v1": {"ServiceMonitor", "PodMonitor"}}


def crd_schemas() -> dict[tuple[str, str], dict]:
    """(apiVersion, kind) -> openAPIV3Schema of every CRD the chart ships."""
    schemas = {}
    for path in sorted((CHART / "crds").glob("*.yaml")):
        for crd in yaml.safe_load_all(path.read_text()):
            if not crd:
                continue
            for version in crd["spec"]["versions"]:
                key = (f"{crd['spec']['group']}/{version['name']}", crd["spec"]["names"]["kind"])
                schemas[key] = version["schema"]["openAPIV3Schema"]
    return schemas


def validate_custom(obj: dict, schemas: dict) -> None:
    schema = schemas[(obj["apiVersion"], obj["kind"])]
    # openAPIV3Schema is OpenAPI 3.0 (draft-4 style booleans for exclusiveMinimum/Maximum).
    jsonschema.Draft4Validator(schema).validate(obj)


def validate(obj: dict, schemas: dict) -> str:
    """'k8s', 'crd' or 'none' (what it was validated against); raises on an invalid object."""
    if (obj["apiVersion"], obj["kind"]) in schemas:
        validate_custom(obj, schemas)
        return "crd"
    if obj["kind"] in NO_SCHEMA_OFFLINE.get(obj["apiVersion"], ()):
        return "none"
    kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    return "k8s"


def bundle_objects() -> list[dict]:
    return [d for d in yaml.safe_load_all((REPO / "charts" / "bundle" / "kompressor.yaml").read_text()) if d]


def test_every_rendered_object_is_valid_for_kubernetes_1_30(renderings):
    schemas = crd_schemas()
    seen = {}
    for label, objects in {**renderings, "bundle": bundle_objects()}.items():
        for obj in objects:
            where = f"{label}: {obj['kind']} {obj['metadata']['name']}"
            try:
                seen[obj["kind"]] = validate(obj, schemas)
            except (kubernetes_validate.ValidationError, jsonschema.ValidationError) as err:
                pytest.fail(f"{where}: {err}")
            except kubernetes_validate.SchemaNotFoundError:
                pytest.fail(f"{where}: no Kubernetes {K8S_VERSION} schema for {obj['apiVersion']} {obj['kind']}")
    # The peering objects were checked against the kopf.dev CRDs the chart installs.
    assert seen["ClusterKopfPeering"] == seen["KopfPeering"] == "crd"
    assert seen["Deployment"] == seen["CustomResourceDefinition"] == "k8s"


def test_a_typo_in_a_manifest_would_be_caught():
    schemas = crd_schemas()
    deployment = next(o for o in bundle_objects() if o["kind"] == "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["imagePullPolice"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(deployment, schemas)


@pytest.mark.parametrize("path", sorted((REPO / "crds").glob("*.yaml")) + sorted((CHART / "crds").glob("*.yaml")),
                         ids=lambda p: str(p.relative_to(REPO)))
def test_crd_files_are_valid_for_kubernetes_1_30(path):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert docs
    for crd in docs:
        assert crd["kind"] == "CustomResourceDefinition"
        kubernetes_validate.validate(crd, K8S_VERSION, strict=True)
        # Argo CD applies them before anything that uses them.
        assert crd["metadata"]["annotations"]["argocd.argoproj.io/sync-wave"] == "-1"


@pytest.mark.parametrize("path", sorted((REPO / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_examples_are_valid_kubernetes_objects(path):
    schemas = crd_schemas()
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert docs
    for obj in docs:
        assert validate(obj, schemas) in ("crd", "k8s")
