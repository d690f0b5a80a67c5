"""Every Kubernetes API access the adapters make, declared once as (apiGroup, resource, verb).

A call can only be made through an ``Access`` object (the API modules take one and derive the
HTTP method and URL from it), so the set of declared accesses IS what the code does, and
``kompressor.k8s.permissions.required_rules()`` is derived from it for the chart's RBAC.
"""

from __future__ import annotations

from dataclasses import dataclass

METHODS = {"get": "GET", "list": "GET", "create": "POST", "patch": "PATCH", "delete": "DELETE"}

DECLARED: list["Access"] = []


@dataclass(frozen=True)
class Resource:
    group: str
    version: str
    plural: str
    namespaced: bool = True

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    def path(self, namespace: str | None = None, name: str | None = None, subresource: str | None = None) -> str:
        base = f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"
        parts = [base]
        if self.namespaced and namespace:
            parts.append(f"namespaces/{namespace}")
        parts.append(self.plural)
        if name:
            parts.append(name)
        if subresource:
            parts.append(subresource)
        return "/".join(parts)


@dataclass(frozen=True)
class Access:
    resource: Resource
    verb: str
    subresource: str | None = None

    @property
    def method(self) -> str:
        return METHODS[self.verb]

    @property
    def rule_resource(self) -> str:
        return f"{self.resource.plural}/{self.subresource}" if self.subresource else self.resource.plural


def declare(resource: Resource, verb: str, subresource: str | None = None) -> Access:
    """Declare (and return) one access; call at import time of the module that uses it."""
    if verb not in METHODS:
        raise ValueError(f"unknown verb {verb!r}")
    access = Access(resource, verb, subresource)
    if access not in DECLARED:
        DECLARED.append(access)
    return access
