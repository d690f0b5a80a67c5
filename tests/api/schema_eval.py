"""A small stand-in for what the API server does with a CompressedModel create request.

It reads the committed CRD (not the Python model) and, in the API server's order:

1. routes the object: apiVersion and kind must name a served version of the CRD;
2. encodes it as JSON: YAML's .nan/.inf cannot be sent (kubectl fails with
   "json: unsupported value: NaN");
3. checks metadata.name (DNS-1123 subdomain) and metadata.namespace (DNS label), as the
   ObjectMeta validation does;
4. drops `status` (the CRD has a status subresource: a create cannot set it) and null
   values of non-nullable fields (pruned before defaulting);
5. rejects unknown fields, as kubectl's default server-side `--validate=strict` does;
6. applies the schema's defaults (a defaulted `{}` parent gets its children's defaults);
7. validates the openAPIV3Schema (OpenAPI 3.0, so JSON Schema draft 4 with boolean
   exclusiveMinimum/Maximum) with `pattern` matched by RE2, as Go's regexp does;
8. evaluates every x-kubernetes-validations CEL rule with cel-python on the defaulted
   object, values typed by the schema (a `type: number` is a double even when written 1),
   unless step 7 found a type, enum, required, maxLength or maxItems error (the API server
   then skips CEL too) or metadata is invalid (the root rule reads metadata.name).

``admit(doc)`` returns ``(defaulted object, problems)``; each problem is a field path in
the API server's form (``spec.gates.slices[0].name``) and a message.
"""

from __future__ import annotations

import copy
import functools
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import celpy
import jsonschema
import re2
import yaml
from celpy import celtypes

CRD_FILE = Path(__file__).resolve().parents[2] / "crds" / "compressedmodels.kompressor.io.yaml"

_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*\Z")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?\Z")
# Schema errors after which the API server does not run the CEL rules.
_BLOCKING = {"type", "enum", "required", "maxLength", "maxItems"}


@dataclass(frozen=True)
class Problem:
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


@functools.cache
def load_crd(path: Path = CRD_FILE) -> dict:
    return yaml.safe_load(path.read_text())


def root_schema(crd: dict | None = None) -> dict:
    crd = crd or load_crd()
    return served_version(crd)["schema"]["openAPIV3Schema"]


def served_version(crd: dict) -> dict:
    (version,) = [v for v in crd["spec"]["versions"] if v.get("served") and v.get("storage")]
    return version


def admit(doc: Any, crd: dict | None = None) -> tuple[Any, list[Problem]]:
    """What a create of ``doc`` would store, and every reason the API server would refuse it."""
    crd = crd or load_crd()
    if not isinstance(doc, dict):
        return doc, [Problem("", "the request body must be an object")]
    problems = _route(doc, crd) or _non_finite(doc, "")
    if problems:
        return doc, problems
    schema = root_schema(crd)
    obj = copy.deepcopy(doc)
    obj.pop("status", None)
    meta_problems = _object_meta(obj.get("metadata"))
    _prune_nulls(obj, schema)
    unknown = _unknown_fields(obj, schema, "")
    if unknown:
        return obj, meta_problems + unknown
    apply_defaults(obj, schema)
    schema_problems, blocking = _schema_errors(obj, schema)
    problems = meta_problems + schema_problems
    if not blocking and not meta_problems:
        problems += cel_problems(obj, schema)
    return obj, problems


def admit_file(path: Path) -> tuple[Any, list[Problem]]:
    """``admit`` of a one-document YAML file, computed once per test session (CEL is slow)."""
    return copy.deepcopy(_admit_file(str(path)))


@functools.cache
def _admit_file(path: str) -> tuple[Any, list[Problem]]:
    return admit(yaml.safe_load(Path(path).read_text()))


def _route(doc: dict, crd: dict) -> list[Problem]:
    group, version = crd["spec"]["group"], served_version(crd)["name"]
    if doc.get("apiVersion") != f"{group}/{version}":
        return [Problem("apiVersion", f"no {doc.get('kind')!r} is served at apiVersion {doc.get('apiVersion')!r}")]
    if doc.get("kind") != crd["spec"]["names"]["kind"]:
        return [Problem("kind", f"no matches for kind {doc.get('kind')!r} in version {group}/{version}")]
    return []


def _non_finite(value: Any, path: str) -> list[Problem]:
    if isinstance(value, float) and not math.isfinite(value):
        return [Problem(path, f"json: unsupported value: {value} (cannot be sent to the API server)")]
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in _non_finite(v, _join(path, k))]
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in _non_finite(v, f"{path}[{i}]")]
    return []


def _object_meta(meta: Any) -> list[Problem]:
    if not isinstance(meta, dict):
        return [Problem("metadata", "Required value")]
    problems = []
    name = meta.get("name")
    if not name and not meta.get("generateName"):
        problems.append(Problem("metadata.name", "Required value: name or generateName is required"))
    elif name is not None and not (isinstance(name, str) and len(name) <= 253 and _DNS_SUBDOMAIN.match(name)):
        problems.append(Problem("metadata.name", f"Invalid value: {name!r}: a lowercase RFC 1123 subdomain must "
                                                 "consist of lower case alphanumeric characters, '-' or '.'"))
    namespace = meta.get("namespace")
    if namespace is not None and not (isinstance(namespace, str) and len(namespace) <= 63
                                      and _DNS_LABEL.match(namespace)):
        problems.append(Problem("metadata.namespace", f"Invalid value: {namespace!r}: a lowercase RFC 1123 label"))
    return problems


def _children(obj: Any, schema: dict):
    """(key, value, subschema) for each child of ``obj`` the schema describes."""
    if isinstance(obj, dict) and "properties" in schema:
        for key, sub in schema["properties"].items():
            if key in obj:
                yield key, obj[key], sub
    elif isinstance(obj, dict) and isinstance(schema.get("additionalProperties"), dict):
        for key, value in obj.items():
            yield key, value, schema["additionalProperties"]
    elif isinstance(obj, list) and isinstance(schema.get("items"), dict):
        for i, value in enumerate(obj):
            yield i, value, schema["items"]


def _prune_nulls(obj: Any, schema: dict) -> None:
    if isinstance(obj, dict) and "properties" in schema:
        for key in [k for k, v in obj.items() if v is None and not schema["properties"].get(k, {}).get("nullable")]:
            del obj[key]
    for _, value, sub in _children(obj, schema):
        _prune_nulls(value, sub)


def _unknown_fields(obj: Any, schema: dict, path: str) -> list[Problem]:
    if schema.get("x-kubernetes-preserve-unknown-fields") or path == "metadata":
        return []
    problems = []
    if isinstance(obj, dict) and "properties" in schema:
        problems += [Problem(_join(path, k), f'unknown field "{_join(path, k)}"')
                     for k in obj if k not in schema["properties"]]
    for key, value, sub in _children(obj, schema):
        problems += _unknown_fields(value, sub, _join(path, key))
    return problems


def apply_defaults(obj: Any, schema: dict) -> Any:
    """Fill in the schema's defaults in place, parents first (as structural defaulting does)."""
    if isinstance(obj, dict) and "properties" in schema:
        for key, sub in schema["properties"].items():
            if key not in obj and "default" in sub:
                obj[key] = copy.deepcopy(sub["default"])
    for _, value, sub in _children(obj, schema):
        apply_defaults(value, sub)
    return obj


def _re2_pattern(validator, pattern, instance, schema):
    if validator.is_type(instance, "string") and not re2.search(pattern, instance):
        yield jsonschema.ValidationError(f"{instance!r} does not match {pattern!r}")


_Validator = jsonschema.validators.extend(jsonschema.Draft4Validator, {"pattern": _re2_pattern})


def _schema_errors(obj: Any, schema: dict) -> tuple[list[Problem], bool]:
    problems, blocking = [], False
    for err in _Validator(schema).iter_errors(obj):
        path = _path(err.absolute_path)
        if err.validator == "required":
            missing = re.match(r"^'(.+)' is a required property$", err.message)
            path = _join(path, missing.group(1) if missing else "?")
        problems.append(Problem(path, f"{err.validator}: {err.message}"))
        blocking = blocking or err.validator in _BLOCKING
    return problems, blocking


def cel_problems(obj: Any, schema: dict, path: str = "") -> list[Problem]:
    """Every x-kubernetes-validations rule broken anywhere in ``obj``."""
    problems = []
    for rule in schema.get("x-kubernetes-validations", []):
        activation = {"self": to_cel(_visible(obj, path), schema)}
        try:
            result = _program(rule["rule"]).evaluate(activation)
        except celpy.CELEvalError as err:  # e.g. "no such key": the API server refuses the object too
            result = err
        where = path + rule.get("fieldPath", "") if path else rule.get("fieldPath", "").lstrip(".")
        if isinstance(result, celpy.CELEvalError) or not isinstance(result, celtypes.BoolType):
            problems.append(Problem(path, f"evaluation error in {rule['rule']!r}: {result}"))
        elif not result:
            problems.append(Problem(where, rule["message"]))
    for key, value, sub in _children(obj, schema):
        problems += cel_problems(value, sub, _join(path, key))
    return problems


def _visible(obj: Any, path: str) -> Any:
    # At the root, CEL sees only metadata.name and metadata.generateName.
    if path == "" and isinstance(obj, dict) and isinstance(obj.get("metadata"), dict):
        meta = {k: v for k, v in obj["metadata"].items() if k in ("name", "generateName")}
        return {**obj, "metadata": meta}
    return obj


def _is_sorted(items) -> celtypes.BoolType:
    return celtypes.BoolType(all(a <= b for a, b in zip(items, items[1:])))


# Functions of the Kubernetes CEL libraries that cel-python lacks (k8s.io/apiserver/pkg/cel/library/lists.go).
_KUBERNETES_FUNCTIONS = {"isSorted": _is_sorted}


@functools.cache
def _program(rule: str):
    env = celpy.Environment()
    return env.program(env.compile(rule), functions=_KUBERNETES_FUNCTIONS)


def to_cel(value: Any, schema: dict) -> Any:
    """JSON data as CEL values, typed by the schema the way the API server types them."""
    kind = schema.get("type")
    if schema.get("x-kubernetes-preserve-unknown-fields") and not schema.get("properties"):
        return celpy.json_to_cel(value)
    if kind == "object" and isinstance(value, dict):
        props, extra = schema.get("properties") or {}, schema.get("additionalProperties")
        return celtypes.MapType({
            celtypes.StringType(k): to_cel(v, props.get(k) or (extra if isinstance(extra, dict) else {}))
            for k, v in value.items()
        })
    if kind == "array" and isinstance(value, list):
        return celtypes.ListType([to_cel(v, schema.get("items") or {}) for v in value])
    if kind == "number" and isinstance(value, (int, float)) and not isinstance(value, bool):
        return celtypes.DoubleType(float(value))
    if kind == "integer" and isinstance(value, int) and not isinstance(value, bool):
        return celtypes.IntType(value)
    return celpy.json_to_cel(value)


def _path(parts) -> str:
    out = ""
    for part in parts:
        out = f"{out}[{part}]" if isinstance(part, int) else _join(out, part)
    return out


def _join(path: str, key: Any) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else str(key)


def names_field(field: str, path: str, message: str) -> bool:
    """Whether a rejection at ``path`` saying ``message`` names ``field`` (or something inside it)."""
    return path == field or path.startswith((field + ".", field + "[")) or field in message
