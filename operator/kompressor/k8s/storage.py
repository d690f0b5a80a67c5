"""The artifact store as the Job and serving pods see it: one volume, one mount, paths.

``pvc://CLAIM/prefix`` mounts the claim at ``$KOMPRESSOR_PVC_ROOT/CLAIM`` (the default root in
pods); ``file:///root`` (single-node clusters, development) mounts the host folder at the same
path. The operator itself reads the same store through ``kompressor.store.open_store``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import PurePosixPath
from urllib.parse import urlparse

from kompressor.errors import UserError
from kompressor.store.stores import DEFAULT_PVC_ROOT, PVC_ROOT_ENV, safe_key

VOLUME = "artifacts"


@dataclass(frozen=True)
class PodStore:
    uri: str
    root: PurePosixPath  # the store root inside pods
    volume: dict
    mount: dict
    env: list[dict] = field(default_factory=list)

    def path(self, key: str) -> str:
        return str(self.root / safe_key(key))


def pod_store(uri: str) -> PodStore:
    parsed = urlparse(uri)
    if parsed.scheme == "pvc" and parsed.netloc:
        claim = parsed.netloc
        mount_path = PurePosixPath(DEFAULT_PVC_ROOT) / claim
        prefix = parsed.path.strip("/")
        return PodStore(
            uri=uri, root=mount_path / prefix if prefix else mount_path,
            volume={"name": VOLUME, "persistentVolumeClaim": {"claimName": claim}},
            mount={"name": VOLUME, "mountPath": str(mount_path)},
            env=[{"name": PVC_ROOT_ENV, "value": DEFAULT_PVC_ROOT}],
        )
    if parsed.scheme == "file" and parsed.path.startswith("/"):
        root = PurePosixPath(parsed.path)
        return PodStore(
            uri=uri, root=root,
            volume={"name": VOLUME, "hostPath": {"path": str(root), "type": "DirectoryOrCreate"}},
            mount={"name": VOLUME, "mountPath": str(root)},
        )
    raise UserError(f"--artifact-store {uri}: the operator needs a store its pods can mount: "
                    "pvc://CLAIM/prefix (clusters) or file:///path (single-node clusters)")


def pod_path_of(uri: str) -> str:
    """Where an artifact URI recorded in the status (file://, pvc:// or a bare path) is inside pods."""
    parsed = urlparse(uri)
    if parsed.scheme == "pvc":
        return str(PurePosixPath(DEFAULT_PVC_ROOT) / parsed.netloc / parsed.path.lstrip("/"))
    if parsed.scheme == "file":
        return parsed.path
    if parsed.scheme == "" and uri.startswith("/"):
        return uri
    raise UserError(f"{uri}: the serving pods cannot mount this artifact (use a pvc:// or file:// store)")
