"""CompressedModel manifests: the objects users apply, as read from YAML or the API."""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kompressor.api import defaults as d
from kompressor.api.spec import CompressedModelSpec
from kompressor.api.status import CompressedModelStatus
from kompressor.api.wire import SpecError, from_wire, to_wire

# Child objects are named "<name>-<suffix>" (e.g. "-prune-r12"), and Job names end up in
# 63-character pod labels, so the resource name itself is kept shorter.
MAX_NAME_LENGTH = 40
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


@dataclass
class CompressedModel:
    name: str
    namespace: str
    spec: CompressedModelSpec
    status: CompressedModelStatus = field(default_factory=CompressedModelStatus)
    generation: int = 1
    annotations: dict[str, str] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    uid: str | None = None
    raw_spec: dict[str, Any] = field(default_factory=dict)  # the spec exactly as the user wrote it

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


def parse_manifest(doc: Any, where: str = "manifest") -> CompressedModel:
    """Validate one CompressedModel document; raise SpecError naming every bad field."""
    if not isinstance(doc, dict):
        raise SpecError([(where, "must be a YAML mapping")])
    problems: list[tuple[str, str]] = []
    if doc.get("apiVersion") != d.API_VERSION:
        problems.append(("apiVersion", f"must be {d.API_VERSION}, got {doc.get('apiVersion')!r}"))
    if doc.get("kind") != d.KIND:
        problems.append(("kind", f"must be {d.KIND}, got {doc.get('kind')!r}"))
    meta = doc.get("metadata") if isinstance(doc.get("metadata"), dict) else {}
    name = meta.get("name")
    if not isinstance(name, str) or not _DNS_LABEL.match(name):
        problems.append(("metadata.name", "must be a DNS label (lowercase letters, digits, '-')"))
    elif len(name) > MAX_NAME_LENGTH:
        problems.append(("metadata.name", f"must be at most {MAX_NAME_LENGTH} characters"))
    namespace = meta.get("namespace") or d.DEFAULT_NAMESPACE
    if not isinstance(namespace, str) or not _DNS_LABEL.match(namespace):
        problems.append(("metadata.namespace", "must be a DNS label"))
    spec = None
    if "spec" not in doc:
        problems.append(("spec", "required field is missing"))
    else:
        try:
            spec = from_wire(CompressedModelSpec, doc["spec"], "spec")
        except SpecError as err:
            problems.extend(err.problems)
    status = CompressedModelStatus()
    if isinstance(doc.get("status"), dict) and doc["status"]:
        try:
            status = from_wire(CompressedModelStatus, doc["status"], "status")
        except SpecError as err:
            problems.extend(err.problems)
    if problems:
        raise SpecError(problems)
    return CompressedModel(
        name=name, namespace=namespace, spec=spec, status=status,
        generation=int(meta.get("generation") or 1),
        annotations=dict(meta.get("annotations") or {}), labels=dict(meta.get("labels") or {}),
        uid=meta.get("uid"), raw_spec=copy.deepcopy(doc["spec"]),
    )


def load_manifests(path: str | Path) -> list[CompressedModel]:
    """Every CompressedModel in a (multi-document) YAML file. Other kinds are an error."""
    text = Path(path).read_text()
    try:
        docs = [doc for doc in yaml.safe_load_all(text) if doc is not None]
    except yaml.YAMLError as err:
        raise SpecError([(str(path), f"is not valid YAML: {err}")]) from None
    if not docs:
        raise SpecError([(str(path), "holds no CompressedModel")])
    models = []
    for i, doc in enumerate(docs):
        try:
            models.append(parse_manifest(doc))
        except SpecError as err:
            prefix = f"{path}[{i}] " if len(docs) > 1 else f"{path}: "
            raise SpecError([(prefix + p, m) for p, m in err.problems]) from None
    return models


def to_manifest(cm: CompressedModel, with_status: bool = True) -> dict:
    doc: dict[str, Any] = {
        "apiVersion": d.API_VERSION,
        "kind": d.KIND,
        "metadata": {"name": cm.name, "namespace": cm.namespace, "generation": cm.generation},
        "spec": to_wire(cm.spec),
    }
    if cm.annotations:
        doc["metadata"]["annotations"] = dict(cm.annotations)
    if with_status:
        doc["status"] = to_wire(cm.status)
    return doc
