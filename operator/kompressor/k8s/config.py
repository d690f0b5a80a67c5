"""The operator's configuration, from `kompressor operator` flags."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field


@dataclass(frozen=True)
class OperatorConfig:
    artifact_store: str = "file:///artifacts"
    namespaces: tuple[str, ...] = ()
    clusterwide: bool = True
    metrics_port: int = 0
    liveness: str | None = None
    peering: str = "kompressor"
    standalone: bool = True
    workers: int = 16
    resync_seconds: float = 300.0  # reconcile each resource at least this often, events or not
    cleanup_attempts: int = 5  # artifact deletion on CR deletion: give up (with a warning) after these
    labels: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "OperatorConfig":
        namespaces = tuple(args.namespace or ())
        return cls(
            artifact_store=args.artifact_store, namespaces=namespaces,
            clusterwide=bool(args.all_namespaces or not namespaces), metrics_port=args.metrics_port,
            liveness=args.liveness or None, peering=args.peering, standalone=args.standalone,
        )
