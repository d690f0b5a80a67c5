"""Generating the CustomResourceDefinition from the API dataclasses.

``kompressor crd`` prints it; crds/compressedmodels.kompressor.io.yaml is its committed
output, and a test fails when the two differ.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

import yaml

from kompressor.api import defaults as d
from kompressor.api.fields import Bounds, describe
from kompressor.api.manifest import MAX_NAME_LENGTH
from kompressor.api.rules import rules_for
from kompressor.api.spec import CompressedModelSpec
from kompressor.api.status import CompressedModelStatus
from kompressor.api.wire import fields_of

_TYPES = {str: "string", int: "integer", float: "number", bool: "boolean"}


def object_schema(cls: type, description: str | None = None) -> dict:
    schema: dict[str, Any] = {"type": "object", "description": description or describe(cls)}
    props, required = {}, []
    for info in fields_of(cls):
        props[info.wire] = _field_schema(info.hint, info.description, info.bounds, info.field)
        if info.required:
            required.append(info.wire)
    schema["properties"] = props
    if required:
        schema["required"] = required
    validations = [
        {"rule": r.cel, "message": r.message, "fieldPath": r.field, "reason": "FieldValueInvalid"}
        for r in rules_for(cls)
    ]
    if validations:
        schema["x-kubernetes-validations"] = validations
    return schema


def _defaults(schema: dict) -> dict:
    """The object an absent section defaults to: every child default, nested sections spelled out too."""
    return {name: child["default"] for name, child in schema.get("properties", {}).items() if "default" in child}


def _field_schema(hint: Any, description: str, b: Bounds, field: dataclasses.Field | None) -> dict:
    if dataclasses.is_dataclass(hint):
        schema = object_schema(hint, description)
        if field is not None and field.default_factory is not dataclasses.MISSING:
            # So nested defaults apply when the section is left out. Spelled out, not {}: the API server
            # checks a default against the schema's CEL rules as written (it refused `{}` for rules that
            # read defaulted children: "no such key: mode").
            schema["default"] = _defaults(schema)
        return schema
    origin = typing.get_origin(hint)
    schema: dict[str, Any]
    if origin is list:
        (item,) = typing.get_args(hint)
        if b.free_form:
            items = {"type": "object", "description": "One item, as in a Pod spec.",
                     "x-kubernetes-preserve-unknown-fields": True}
        else:
            items = _field_schema(item, _item_description(item), Bounds(minimum=b.item_minimum), None)
        schema = {"type": "array", "description": description, "items": items}
    elif hint is dict or origin is dict:
        schema = {"type": "object", "description": description}
        if b.free_form or b.map_of is None:
            schema["x-kubernetes-preserve-unknown-fields"] = True
        else:
            schema["additionalProperties"] = _field_schema(b.map_of, _item_description(b.map_of), Bounds(), None)
    else:
        schema = {"type": _TYPES[hint], "description": description}
    if field is not None and field.default not in (dataclasses.MISSING, None):
        schema["default"] = field.default
    for attr, key in (("enum", "enum"), ("minimum", "minimum"), ("maximum", "maximum"), ("pattern", "pattern"),
                      ("min_length", "minLength"), ("max_length", "maxLength"), ("min_items", "minItems"),
                      ("max_items", "maxItems")):
        value = getattr(b, attr)
        if value is not None:
            schema[key] = list(value) if attr == "enum" else value
    if b.exclusive_minimum:
        schema["exclusiveMinimum"] = True
    if b.exclusive_maximum:
        schema["exclusiveMaximum"] = True
    return schema


def _item_description(item: Any) -> str:
    return describe(item) if dataclasses.is_dataclass(item) else "An item."


def _columns() -> list[dict]:
    return [
        {"name": "Phase", "type": "string", "jsonPath": ".status.phase", "description": "Lifecycle phase."},
        {"name": "Revision", "type": "integer", "jsonPath": ".status.currentRevision",
         "description": "Revision being served."},
        {"name": "Sparsity", "type": "number", "jsonPath": ".status.sparsity",
         "description": "Sparsity of the serving revision."},
        {"name": "Accuracy", "type": "number", "jsonPath": ".status.accuracy",
         "description": "Accuracy of the serving revision."},
        {"name": "Drift", "type": "string", "jsonPath": ".status.drift.outcome",
         "description": "Latest drift verdict."},
        {"name": "Candidate", "type": "integer", "jsonPath": ".status.online.revision", "priority": 1,
         "description": "Revision judged online (shadow or canary)."},
        {"name": "Weight", "type": "number", "jsonPath": ".status.online.weight", "priority": 1,
         "description": "Percent of live traffic the canary answers (shadow: 0)."},
        {"name": "Live", "type": "integer", "jsonPath": ".status.online.totals.requests", "priority": 1,
         "description": "Live requests the candidate saw."},
        {"name": "Online", "type": "string", "jsonPath": ".status.online.outcome", "priority": 1,
         "description": "Latest online verdict."},
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    ]


def build_crd() -> dict:
    root = {
        "type": "object",
        "description": describe(CompressedModelSpec),
        "properties": {
            "apiVersion": {"type": "string", "description": "API version: kompressor.io/v1alpha1."},
            "kind": {"type": "string", "description": "CompressedModel."},
            "metadata": {"type": "object"},
            "spec": object_schema(CompressedModelSpec),
            "status": object_schema(CompressedModelStatus),
        },
        "required": ["spec"],
        "x-kubernetes-validations": [{
            "rule": f"self.metadata.name.size() <= {MAX_NAME_LENGTH}",
            "message": f"metadata.name must be at most {MAX_NAME_LENGTH} characters (child object names add a suffix)",
            # (no fieldPath: the API server accepts only paths into the schema, and metadata is not in it)
            "reason": "FieldValueInvalid",
        }],
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{d.PLURAL}.{d.GROUP}",
            "labels": {"app.kubernetes.io/name": "kompressor", "app.kubernetes.io/part-of": "kompressor"},
            # Argo CD: create the CRD before any CompressedModel in the same sync.
            "annotations": {"argocd.argoproj.io/sync-wave": "-1"},
        },
        "spec": {
            "group": d.GROUP,
            "names": {
                "kind": d.KIND, "listKind": f"{d.KIND}List", "plural": d.PLURAL, "singular": d.SINGULAR,
                "shortNames": list(d.SHORT_NAMES), "categories": list(d.CATEGORIES),
            },
            "scope": "Namespaced",
            "versions": [{
                "name": d.VERSION, "served": True, "storage": True,
                "subresources": {"status": {}},
                "additionalPrinterColumns": _columns(),
                "schema": {"openAPIV3Schema": root},
            }],
        },
    }


def render_crd() -> str:
    header = "# Generated by `kompressor crd` from operator/kompressor/api/. Do not edit by hand.\n"
    return header + yaml.safe_dump(build_crd(), sort_keys=False, width=120)
