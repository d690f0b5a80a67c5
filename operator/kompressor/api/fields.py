"""Declaring API fields once: type, description, default and bounds.

A dataclass field declared with :func:`api_field` carries everything the CRD's
openAPIV3Schema needs (see :mod:`kompressor.api.crd`) and everything the Python
parser needs (see :mod:`kompressor.api.parse`), so the two cannot drift apart.
Python attribute names are snake_case; their wire names are the camelCase forms.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

_MISSING = dataclasses.MISSING


@dataclasses.dataclass(frozen=True)
class Bounds:
    """Constraints that map one to one onto openAPIV3Schema keywords."""

    enum: tuple | None = None
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False
    exclusive_maximum: bool = False
    pattern: str | None = None
    min_length: int | None = None
    max_length: int | None = None
    min_items: int | None = None
    max_items: int | None = None
    item_minimum: float | None = None  # lower bound of each item of a list of numbers
    free_form: bool = False  # an object whose contents are not checked (resources, tolerations)
    map_of: type | None = None  # an object with string keys and values of this type


def api_field(
    description: str,
    *,
    default: Any = _MISSING,
    default_factory: Any = _MISSING,
    required: bool = False,
    wire: str | None = None,
    **bounds: Any,
) -> Any:
    """A dataclass field with its schema. ``required`` fields have no default. ``wire`` overrides the camelCase
    name where Kubernetes spells an initialism in capitals (targetCPUUtilization, as the HPA API does)."""
    if isinstance(bounds.get("enum"), list):
        bounds["enum"] = tuple(bounds["enum"])
    metadata = {"description": description, "bounds": Bounds(**bounds), "required": required}
    if wire is not None:
        metadata["wire"] = wire
    # Keyword-only, so required fields may follow defaulted ones in declaration order.
    if required:
        return dataclasses.field(metadata=metadata, kw_only=True)
    if default_factory is not _MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata, kw_only=True)
    return dataclasses.field(default=None if default is _MISSING else default, metadata=metadata, kw_only=True)


def camel(name: str) -> str:
    """``max_latency_p95_ms`` -> ``maxLatencyP95Ms``."""
    head, *rest = name.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


def snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def describe(cls: type) -> str:
    """The first paragraph of a dataclass docstring, used as the schema description."""
    doc = (cls.__doc__ or "").strip()
    return re.sub(r"\s+", " ", doc.split("\n\n")[0])
