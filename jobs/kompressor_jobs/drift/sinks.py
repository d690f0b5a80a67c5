"""Where drift verdicts go: a JSON file (replaced atomically) or a CompressedModel's status.drift.

Each sink can also read back the last verdict it holds, so ``consecutive`` survives restarts and
``--once`` runs without any other state.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from kompressor.api import defaults as d
from kompressor.api.status import DriftVerdict
from kompressor.api.wire import SpecError, from_wire, to_wire
from kompressor.errors import UserError

K8S_PREFIX = "k8s://"


def history_path(verdict: Path) -> Path:
    """Where a file sink also appends every verdict, one JSON line each: ``verdict.json`` ->
    ``verdict.history.jsonl`` (the report's p-value plot: one point per window, even when several
    windows were tested between two reads of the verdict file)."""
    return verdict.with_name(f"{verdict.stem}.history.jsonl")


class FileSink:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.history = history_path(self.path)

    def __str__(self) -> str:
        return str(self.path)

    def read(self) -> DriftVerdict | None:
        try:
            return _parse(json.loads(self.path.read_text()))
        except FileNotFoundError:
            return None
        except ValueError:  # unreadable: start counting afresh rather than fail forever
            return None

    def write(self, verdict: DriftVerdict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        wire = to_wire(verdict)
        tmp.write_text(json.dumps(wire, indent=2, sort_keys=True))
        os.replace(tmp, self.path)
        with open(self.history, "a") as fh:
            fh.write(json.dumps(wire, sort_keys=True) + "\n")


class KubernetesSink:
    """Merge-patches ``{"status": {"drift": ...}}`` on the CompressedModel's /status subresource."""

    def __init__(self, namespace: str, name: str):
        from kubernetes import client, config

        from kompressor.k8s.client import load_configuration

        try:
            configuration = load_configuration()
        except (config.ConfigException, OSError) as err:
            raise UserError(f"k8s://{namespace}/{name}: no in-cluster config and no usable kubeconfig: "
                            f"{err}") from None
        self.namespace, self.name = namespace, name
        self.api = client.CustomObjectsApi(client.ApiClient(configuration))

    def __str__(self) -> str:
        return f"{K8S_PREFIX}{self.namespace}/{self.name}"

    def read(self) -> DriftVerdict | None:
        from kubernetes.client.exceptions import ApiException

        try:
            obj = self.api.get_namespaced_custom_object(d.GROUP, d.VERSION, self.namespace, d.PLURAL, self.name)
        except ApiException as err:
            if err.status == 404:
                return None
            raise
        return _parse(((obj or {}).get("status") or {}).get("drift"))

    def write(self, verdict: DriftVerdict) -> None:
        self.api.patch_namespaced_custom_object_status(
            d.GROUP, d.VERSION, self.namespace, d.PLURAL, self.name, {"status": {"drift": to_wire(verdict)}},
            _content_type="application/merge-patch+json")


def _parse(data) -> DriftVerdict | None:
    if not isinstance(data, dict):
        return None
    try:
        return from_wire(DriftVerdict, data, "status.drift")
    except SpecError:
        return None


def open_sink(target: str) -> FileSink | KubernetesSink:
    if target.startswith(K8S_PREFIX):
        parts = target[len(K8S_PREFIX):].split("/")
        if len(parts) != 2 or not all(parts):
            raise UserError(f"--verdict {target}: use k8s://NAMESPACE/NAME")
        return KubernetesSink(*parts)
    return FileSink(target)
