"""The Python API model and the committed CRD agree, field by field and by behaviour.

- Walking both: same fields, required fields, types, enums, bounds, patterns and defaults.
- Defaults: what the API server stores for a minimal manifest parses to the spec the
  Python defaults give, and ``to_wire`` writes those same defaults.
- Every bound of the CRD, just past its limit, is refused by both layers naming the field;
  every inclusive numeric bound, at its limit, is accepted by both.
- ``to_wire(from_wire(x))`` round-trips; unknown fields get a did-you-mean.
"""

from __future__ import annotations

import copy
import dataclasses
import typing
from pathlib import Path

import pytest
import yaml

from kompressor.api import SpecError, parse_manifest, to_manifest
from kompressor.api.spec import CompressedModelSpec
from kompressor.api.status import CompressedModelStatus
from kompressor.api.wire import fields_of, from_wire, to_wire

from schema_eval import admit, admit_file, names_field, root_schema

ROOT = Path(__file__).resolve().parents[2]
GOOD = Path(__file__).parent / "corpus" / "good"
VALID_FILES = sorted((ROOT / "examples").glob("*.yaml")) + sorted(GOOD.glob("*.yaml"))
MINIMAL = yaml.safe_load((GOOD / "minimal.yaml").read_text())
_TYPES = {str: "string", int: "integer", float: "number", bool: "boolean"}
_BOUNDS = {"enum": "enum", "minimum": "minimum", "maximum": "maximum", "pattern": "pattern",
           "min_length": "minLength", "max_length": "maxLength", "min_items": "minItems", "max_items": "maxItems"}


# --- walking both --------------------------------------------------------------------------

def _compare(cls: type, schema: dict, path: str) -> list[str]:
    """Every way the dataclass ``cls`` and its CRD schema node differ."""
    diffs = []
    fields = {f.wire: f for f in fields_of(cls)}
    props = schema.get("properties", {})
    if set(fields) != set(props):
        diffs.append(f"{path}: python {sorted(set(fields) - set(props))} vs crd {sorted(set(props) - set(fields))}")
    if {w for w, f in fields.items() if f.required} != set(schema.get("required", [])):
        diffs.append(f"{path}: required fields differ")
    for wire in set(fields) & set(props):
        diffs += _compare_field(fields[wire], props[wire], f"{path}.{wire}")
    return diffs


def _section_defaults(cls) -> dict:
    """What an absent section of ``cls`` defaults to, from the Python model alone."""
    out = {}
    for info in fields_of(cls):
        f = info.field
        if f.default is not dataclasses.MISSING and f.default is not None:
            out[info.wire] = f.default
        elif f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(f.default_factory):
            out[info.wire] = _section_defaults(f.default_factory)
    return out


def _compare_field(info, sub: dict, path: str) -> list[str]:
    diffs, hint, b, f = [], info.hint, info.bounds, info.field
    for attr, key in _BOUNDS.items():
        want = getattr(b, attr)
        want = list(want) if isinstance(want, tuple) else want
        if sub.get(key) != want:
            diffs.append(f"{path}: {key} python {want!r} crd {sub.get(key)!r}")
    for attr, key in (("exclusive_minimum", "exclusiveMinimum"), ("exclusive_maximum", "exclusiveMaximum")):
        if getattr(b, attr) != sub.get(key, False):
            diffs.append(f"{path}: {key} differs")
    # Defaults: a value, the section's own defaults spelled out for a nested section (the API server
    # checks a default against the CEL rules as written: `{}` was refused), none for lists.
    if f.default is not dataclasses.MISSING and f.default is not None:
        expected_default = f.default
    elif f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(f.default_factory):
        expected_default = _section_defaults(f.default_factory)
    else:
        expected_default = dataclasses.MISSING
    if sub.get("default", dataclasses.MISSING) != expected_default:
        diffs.append(f"{path}: default python {expected_default!r} crd {sub.get('default')!r}")
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        diffs += [f"{path}: type"] if sub.get("type") != "object" else _compare(hint, sub, path)
    elif origin is list:
        (item,) = typing.get_args(hint)
        if sub.get("type") != "array":
            diffs.append(f"{path}: type")
        elif b.free_form:
            if not sub["items"].get("x-kubernetes-preserve-unknown-fields"):
                diffs.append(f"{path}[]: should keep unknown fields")
        elif dataclasses.is_dataclass(item):
            diffs += _compare(item, sub["items"], f"{path}[]")
        elif sub["items"].get("type") != _TYPES[item] or sub["items"].get("minimum") != b.item_minimum:
            diffs.append(f"{path}[]: item type or minimum")
    elif hint is dict or origin is dict:
        if sub.get("type") != "object":
            diffs.append(f"{path}: type")
        elif b.map_of is None or b.free_form:
            if not sub.get("x-kubernetes-preserve-unknown-fields"):
                diffs.append(f"{path}: should keep unknown fields")
        else:
            value = sub.get("additionalProperties", {})
            if dataclasses.is_dataclass(b.map_of):
                diffs += _compare(b.map_of, value, f"{path}{{}}")
            elif value.get("type") != _TYPES[b.map_of]:
                diffs.append(f"{path}{{}}: value type")
    elif sub.get("type") != _TYPES[hint]:
        diffs.append(f"{path}: type python {_TYPES[hint]} crd {sub.get('type')}")
    return diffs


@pytest.mark.parametrize("name, cls", [("spec", CompressedModelSpec), ("status", CompressedModelStatus)])
def test_the_crd_and_the_python_model_declare_the_same_fields(name, cls):
    assert _compare(cls, root_schema()["properties"][name], name) == []


# --- defaults and round trips ----------------------------------------------------------------

def _without_empty_lists(value):
    if isinstance(value, dict):
        return {k: _without_empty_lists(v) for k, v in value.items() if v != []}
    return value


def test_the_api_server_and_the_python_model_apply_the_same_defaults():
    stored, problems = admit(MINIMAL)
    assert problems == []
    python = to_wire(from_wire(CompressedModelSpec, MINIMAL["spec"]))
    # The CRD gives lists no default (an unset list stays absent); Python fills in [].
    assert _without_empty_lists(python) == stored["spec"]
    assert from_wire(CompressedModelSpec, stored["spec"]) == from_wire(CompressedModelSpec, MINIMAL["spec"])
    # Every section was defaulted, not just the ones the manifest names.
    assert set(stored["spec"]) == set(root_schema()["properties"]["spec"]["properties"])


@pytest.mark.parametrize("path", VALID_FILES, ids=lambda p: p.name)
def test_to_wire_and_from_wire_round_trip(path: Path):
    doc = yaml.safe_load(path.read_text())
    spec = from_wire(CompressedModelSpec, doc["spec"])
    wire = to_wire(spec)
    assert from_wire(CompressedModelSpec, wire) == spec
    assert to_wire(from_wire(CompressedModelSpec, wire)) == wire
    # Everything the user wrote survives (nulls mean "unset", as for the API server).
    stored, _ = admit_file(path)
    assert _without_empty_lists(wire) == _without_empty_lists(stored["spec"])
    cm = parse_manifest(doc)
    assert parse_manifest(to_manifest(cm, with_status=False)).spec == cm.spec


@pytest.mark.parametrize("section, typo, suggestion", [
    (None, "compresion", "compression"),
    ("gates", "minAcuracy", "minAccuracy"),
    ("drift", "pvalue", "pValue"),
    ("compression", "prunning", "pruning"),
])
def test_unknown_fields_are_refused_with_a_did_you_mean(section, typo, suggestion):
    doc = copy.deepcopy(MINIMAL)
    target = doc["spec"] if section is None else doc["spec"].setdefault(section, {})
    target[typo] = {} if section is None or section == "compression" else 0.5
    field = f"spec.{typo}" if section is None else f"spec.{section}.{typo}"
    with pytest.raises(SpecError) as caught:
        parse_manifest(doc)
    assert caught.value.problems == [(field, f"unknown field (did you mean {suggestion}?)")]
    _, problems = admit(doc)
    assert [p.path for p in problems] == [field]


def test_an_unknown_field_with_no_near_name_gets_no_guess():
    doc = copy.deepcopy(MINIMAL)
    doc["spec"]["serving"] = {"xyz": 1}
    with pytest.raises(SpecError) as caught:
        parse_manifest(doc)
    assert caught.value.problems == [("spec.serving.xyz", "unknown field")]


# --- every bound, from the CRD -------------------------------------------------------------------

# A valid first item for each list of objects, so that the item's own fields can be tested.
_SEED_ITEMS = {
    "spec.gates.slices": {"name": "x", "minAccuracy": 0.5},
    "spec.drift.categoricalFeatures": {"feature": 0, "categories": 2},
    "spec.jobs.tolerations": {"key": "nvidia.com/gpu", "operator": "Exists"},
    "spec.model.inputShape": 1,
    "spec.model.inputs": {"name": "x", "dtype": "int64", "shape": [8]},
    "spec.model.inputs[0].shape": 1,
    "spec.promotion.canary.steps": lambda n: list(range(1, n + 1)),  # a rule wants them increasing
}
# Other fields a value needs to be valid at its bound (a rule relates them).
_CONTEXT = {"spec.compression.search.minSparsity": {("spec", "compression", "search", "maxSparsity"): 0.99}}
# A valid object for each optional section with required fields or rules between its fields, so that one
# field of it can be tried alone; and the seeded fields a tried field excludes (exactly one target).
_SEED_OBJECTS = {"spec.serving.autoscaling": {"maxReplicas": 100, "targetConcurrency": 1},
                 "spec.serving.feedback.tokenSecretRef": {"name": "labels-token"},
                 "spec.drift.performance": {"minAccuracy": 0.9, "window": 100000, "minLabels": 1}}
_EXCLUDES = {"spec.serving.autoscaling.targetCPUUtilization": ("targetConcurrency",)}
_WRONG_TYPE = {"number": "1", "integer": 1.5, "string": 5, "boolean": "true", "object": [], "array": {}}


def _leaves(schema: dict, keys: tuple = ("spec",)):
    """(keys, schema) for every field under spec, list items as index 0."""
    yield keys, schema
    for name, sub in (schema.get("properties") or {}).items():
        yield from _leaves(sub, keys + (name,))
    if schema.get("type") == "array":
        yield from _leaves(schema["items"], keys + (0,))


def _dotted(keys) -> str:
    return "".join(f"[{k}]" if isinstance(k, int) else (f".{k}" if i else k) for i, k in enumerate(keys))


def _unique_items(list_path: str, n: int) -> list:
    seed = _SEED_ITEMS[list_path]
    if callable(seed):
        return seed(n)
    if isinstance(seed, dict):
        first = next(iter(seed))
        return [{**seed, first: f"s{i}" if isinstance(seed[first], str) else i} for i in range(n)]
    return [seed] * n


def _doc_with(keys: tuple, value) -> dict:
    """MINIMAL with one field set; inputShape (or, for the inputs fields, one input) is given so that any model
    uri may be tried: the two are exclusive."""
    doc = copy.deepcopy(MINIMAL)
    if keys[:3] == ("spec", "model", "inputs"):
        doc["spec"]["model"]["inputs"] = [copy.deepcopy(_SEED_ITEMS["spec.model.inputs"])]
    else:
        doc["spec"]["model"]["inputShape"] = [64]
    node = doc
    for i, key in enumerate(keys[:-1]):
        nxt = keys[i + 1]
        if isinstance(nxt, int):
            node = node.setdefault(key, [copy.deepcopy(_SEED_ITEMS[_dotted(keys[: i + 1])])])
        else:
            seed = _SEED_OBJECTS.get(_dotted(keys[: i + 1]))
            if seed is not None and isinstance(node, dict) and key not in node:
                node[key] = copy.deepcopy(seed)
            node = node.setdefault(key, {}) if isinstance(node, dict) else node[key]
    for other in _EXCLUDES.get(_dotted(keys), ()):
        node.pop(other, None)
    node[keys[-1]] = value
    return doc


def _past_bound_cases():
    spec = root_schema()["properties"]["spec"]
    for keys, s in _leaves(spec):
        field = _dotted(keys)
        if len(keys) > 1:
            yield field, "type", keys, _WRONG_TYPE[s["type"]]
        step = 1 if s.get("type") == "integer" else 0.01
        if "minimum" in s:
            yield field, "minimum", keys, s["minimum"] if s.get("exclusiveMinimum") else s["minimum"] - step
        if "maximum" in s:
            yield field, "maximum", keys, s["maximum"] if s.get("exclusiveMaximum") else s["maximum"] + step
        if "enum" in s:
            yield field, "enum", keys, "not-" + s["enum"][0]
        if "pattern" in s:
            yield field, "pattern", keys, "https://example.com/x"
        if "minLength" in s:
            yield field, "minLength", keys, "x" * (s["minLength"] - 1)
        if "maxLength" in s:
            yield field, "maxLength", keys, "x" * (s["maxLength"] + 1)
        if "minItems" in s:
            yield field, "minItems", keys, _unique_items(field, s["minItems"] - 1)
        if "maxItems" in s:
            yield field, "maxItems", keys, _unique_items(field, s["maxItems"] + 1)
        for required in s.get("required", []):
            yield f"{field}.{required}", "required", keys + (required,), None


PAST = list(_past_bound_cases())


def test_the_generated_cases_cover_every_kind_of_bound():
    assert {kind for _, kind, _, _ in PAST} == {"type", "minimum", "maximum", "enum", "pattern", "minLength",
                                                "maxLength", "minItems", "maxItems", "required"}


@pytest.mark.parametrize("field, kind, keys, value", PAST, ids=[f"{f}-{k}" for f, k, _, _ in PAST])
def test_just_past_each_bound_both_layers_refuse_naming_the_field(field, kind, keys, value):
    doc = _doc_with(keys, value)
    if value is None:  # a missing required field
        parent = doc
        for key in keys[:-1]:
            parent = parent[key]
        del parent[keys[-1]]
    _, problems = admit(doc)
    # CEL rules still run after a range error, so a related rule may add its own rejection
    # (maxSparsity below 0 is also below minSparsity); the field itself must be named.
    assert any(names_field(field, p.path, p.message) for p in problems), [str(p) for p in problems]
    with pytest.raises(SpecError) as caught:
        parse_manifest(doc)
    assert all(names_field(field, p, m) for p, m in caught.value.problems), caught.value.problems


def _at_bound_cases():
    for keys, s in _leaves(root_schema()["properties"]["spec"]):
        for key, exclusive in (("minimum", "exclusiveMinimum"), ("maximum", "exclusiveMaximum")):
            if key in s and not s.get(exclusive):
                yield _dotted(keys), key, keys, s[key]


AT = list(_at_bound_cases())


@pytest.mark.parametrize("field, kind, keys, value", AT, ids=[f"{f}-{k}" for f, k, _, _ in AT])
def test_at_each_inclusive_numeric_bound_both_layers_accept(field, kind, keys, value):
    doc = _doc_with(keys, value)
    for other, other_value in _CONTEXT.get(field, {}).items():
        _set(doc, other, other_value)
    _, problems = admit(doc)
    assert problems == [], [str(p) for p in problems]
    parsed = parse_manifest(doc)
    node = parsed.spec
    for key in keys[1:]:
        node = node[key] if isinstance(key, int) else getattr(node, _attribute(type(node), key))
    assert node == value


def _attribute(cls: type, wire: str) -> str:
    """The Python attribute behind a wire name (camelCase, or an override such as targetCPUUtilization)."""
    return next(info.name for info in fields_of(cls) if info.wire == wire)


def _set(doc: dict, keys: tuple, value) -> None:
    node = doc
    for key in keys[:-1]:
        node = node.setdefault(key, {})
    node[keys[-1]] = value
