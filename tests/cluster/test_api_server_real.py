"""The CRD on the real kube-apiserver: accepted and Established, documented by `kubectl explain`, shown
with its printer columns by `kubectl get cmodel`, and every entry of tests/api/corpus judged by the real
server exactly as the stand-in validator (tests/api/schema_eval.py) judges it."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "api"))

from schema_eval import admit, names_field  # noqa: E402

CORPUS = REPO / "tests" / "api" / "corpus"
BAD = sorted((CORPUS / "bad").glob("*.yaml"))
GOOD = sorted((CORPUS / "good").glob("*.yaml"))
NAMESPACE = "corpus"

pytestmark = [pytest.mark.slow, pytest.mark.cluster]


def _expect(path: Path) -> tuple[str, str]:
    head = dict(re.findall(r"^# (expect|layer): (\S+)$", path.read_text(), re.MULTILINE))
    return head.get("expect", ""), head.get("layer", "api")


@pytest.fixture(scope="module")
def server(cluster, crd, api_client):
    """``create(doc) -> (accepted, [(field, message)])``: a server-side dry-run create, strict field
    validation (kubectl's default), the body sent as kubectl sends it (JSON without NaN)."""
    from kubernetes.client.exceptions import ApiException

    from kubernetes import client

    custom = client.CustomObjectsApi(api_client)
    cluster.kubectl("create", "namespace", NAMESPACE, check=False)

    served: dict[str, set[str]] = {}
    namespaces = {NAMESPACE}

    def kinds(api_version: str) -> set[str]:
        """The kinds the real server's discovery serves at ``api_version`` (kubectl's REST mapping)."""
        if api_version not in served:
            out = cluster.kubectl("get", "--raw", f"/apis/{api_version}", check=False)
            served[api_version] = ({r["kind"] for r in json.loads(out.stdout)["resources"]}
                                   if out.returncode == 0 else set())
        return served[api_version]

    def create(doc) -> tuple[bool, list[tuple[str, str]]]:
        # kubectl maps apiVersion + kind to a resource with the server's discovery before sending anything
        if not isinstance(doc, dict):
            return False, [("", "the request body must be an object")]
        if not doc.get("apiVersion") or not isinstance(doc["apiVersion"], str):
            return False, [("apiVersion", "apiVersion not set")]
        if not doc.get("kind"):
            return False, [("kind", "kind not set")]
        if doc["kind"] not in kinds(doc["apiVersion"]):
            field = "kind" if kinds(doc["apiVersion"]) else "apiVersion"
            return False, [(field, f"no matches for kind {doc['kind']!r} in version {doc['apiVersion']!r}")]
        non_finite = _non_finite(doc, "")
        if non_finite:  # kubectl: "json: unsupported value: NaN"; nothing reaches the server
            return False, [(non_finite, "json: unsupported value (NaN or infinity)")]
        body = json.dumps(doc)
        namespace = (doc.get("metadata") or {}).get("namespace") or NAMESPACE
        if re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", namespace) and namespace not in namespaces:
            cluster.kubectl("create", "namespace", namespace, check=False)
            namespaces.add(namespace)
        try:
            custom.create_namespaced_custom_object("kompressor.io", "v1alpha1", namespace, "compressedmodels",
                                                   json.loads(body), dry_run="All", field_validation="Strict")
        except ApiException as err:
            status = json.loads(err.body or "{}")
            if err.status == 404 and (status.get("details") or {}).get("kind") == "namespaces":
                return False, [("metadata.namespace", status.get("message", ""))]  # no such (or invalid) namespace
            causes = (status.get("details") or {}).get("causes") or []
            # (the server adds a note without a field when it skipped CEL rules after schema errors)
            found = [(c.get("field", ""), c.get("message", "")) for c in causes
                     if not c.get("message", "").endswith("correct the existing errors to complete validation")]
            return False, found or [("", status.get("message", str(err)))]
        return True, []

    return create


def _doc(path: Path):
    return yaml.safe_load(path.read_text())


def _non_finite(value, path: str) -> str | None:
    """The path of the first NaN or infinity (which JSON, and so kubectl, cannot send)."""
    import math

    if isinstance(value, float) and not math.isfinite(value):
        return path
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        found = _non_finite(item, f"{path}[{key}]" if isinstance(key, int) else (f"{path}.{key}" if path else key))
        if found is not None:
            return found
    return None


@pytest.mark.parametrize("path", BAD, ids=[p.stem for p in BAD])
def test_the_real_server_refuses_every_bad_entry_naming_its_field(server, path):
    expect, layer = _expect(path)
    accepted, problems = server(_doc(path))
    if layer == "operator":
        assert accepted, f"the real API server refuses it ({problems}): drop its `# layer: operator` line"
        return
    assert not accepted, "the real API server accepts this malformed manifest"
    wrong = [p for p in problems if not names_field(expect, p[0], p[1])]
    assert not wrong, f"rejections that do not name {expect}: {problems}"


@pytest.mark.parametrize("path", BAD + GOOD, ids=[f"{p.parent.name}-{p.stem}" for p in BAD + GOOD])
def test_the_stand_in_validator_agrees_with_the_real_server(server, path):
    doc = _doc(path)
    accepted, problems = server(doc)
    _, stand_in = admit(yaml.safe_load(path.read_text()))
    assert accepted == (not stand_in), (
        f"real server: {'accepts' if accepted else 'refuses'} {problems}; stand-in: {[str(p) for p in stand_in]}")
    if not accepted:
        expect, _ = _expect(path)
        if expect:  # both name the field the entry is about
            assert any(names_field(expect, f, m) for f, m in problems), problems
            assert any(names_field(expect, p.path, p.message) for p in stand_in), stand_in


def test_the_crd_is_established_with_its_printer_columns(cluster, crd):
    crd_json = json.loads(cluster.kubectl("get", "crd", "compressedmodels.kompressor.io", "-o", "json").stdout)
    conditions = {c["type"]: c["status"] for c in crd_json["status"]["conditions"]}
    assert conditions.get("Established") == "True" and conditions.get("NamesAccepted") == "True", conditions
    assert "cmodel" in crd_json["spec"]["names"].get("shortNames", [])
    columns = [c["name"] for c in crd_json["spec"]["versions"][0].get("additionalPrinterColumns", [])]
    assert columns
    cluster.kubectl("create", "namespace", "columns", check=False)
    model = yaml.safe_load((REPO / "tests" / "api" / "corpus" / "good" / "minimal.yaml").read_text())
    model["metadata"] = {"name": "shown", "namespace": "columns"}
    cluster.kubectl("apply", "-f", "-", input=json.dumps(model))
    lines = cluster.kubectl("get", "cmodel", "-n", "columns").stdout.splitlines()
    wide = [c["name"].upper() for c in crd_json["spec"]["versions"][0]["additionalPrinterColumns"]
            if not c.get("priority")]
    assert lines[0].split() == ["NAME", *wide], lines  # the server's Table, as kubectl prints it
    assert lines[1].split()[0] == "shown"
    cluster.kubectl("delete", "namespace", "columns", "--wait=false")


def test_kubectl_explain_documents_the_spec(cluster, crd):
    out = cluster.kubectl("explain", "compressedmodel.spec").stdout
    for field in ("model", "data", "compression", "gates", "drift", "serving", "jobs"):
        assert re.search(rf"^\s+{field}\s", out, re.MULTILINE), f"{field} missing from kubectl explain:\n{out}"
    deep = cluster.kubectl("explain", "compressedmodel.spec.compression.pruning.sparsity").stdout
    assert "sparsity" in deep.lower() and ("number" in deep or "<double>" in deep or "<number>" in deep), deep
