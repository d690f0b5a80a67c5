"""Store backends. Keys are relative, '/'-separated paths such as ``default/digits/r3/candidate``."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from pathlib import Path, PurePosixPath
from typing import Protocol
from urllib.parse import urlparse

from kompressor.errors import UserError

# Inside a Pod, a claim named in pvc://CLAIM/path is mounted at $KOMPRESSOR_PVC_ROOT/CLAIM.
PVC_ROOT_ENV = "KOMPRESSOR_PVC_ROOT"
DEFAULT_PVC_ROOT = "/var/lib/kompressor/pvc"


class StoreError(UserError):
    """A bad store URI or key."""


def safe_key(key: str) -> str:
    """Refuse keys that would leave the store root."""
    path = PurePosixPath(key)
    if not key or path.is_absolute() or any(part in ("..", "") for part in key.split("/")) or "\\" in key:
        raise StoreError(f"invalid artifact key {key!r}: must be a relative path without '..'")
    return str(path)


def resolve_local(uri: str) -> Path:
    """The local path of a file:// or pvc:// URI (pvc:// as mounted inside a Pod)."""
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise StoreError(f"{uri}: file:// URIs need an absolute path (file:///...)")
        raw = parsed.path
    elif parsed.scheme == "pvc":
        root = os.environ.get(PVC_ROOT_ENV, DEFAULT_PVC_ROOT)
        raw = f"{root}/{parsed.netloc}{parsed.path}"
    else:
        raise StoreError(f"{uri}: not a local URI (file:// or pvc://)")
    if any(part == ".." for part in raw.split("/")):
        raise StoreError(f"{uri}: '..' path segments are not allowed")
    return Path(raw)


class Store(Protocol):
    root: str

    def uri(self, key: str) -> str: ...

    def put_dir(self, src: Path, key: str) -> str:
        """Publish a finished local folder under ``key`` all at once; returns its URI."""

    def fetch_dir(self, key: str) -> Path:
        """A local folder with the contents under ``key`` (the folder itself for file stores)."""

    def exists(self, key: str) -> bool: ...


class FileStore:
    def __init__(self, root: Path, uri_root: str):
        self.root_path = root
        self.root = uri_root.rstrip("/")

    def uri(self, key: str) -> str:
        return f"{self.root}/{safe_key(key)}"

    def path(self, key: str) -> Path:
        return self.root_path / safe_key(key)

    def put_dir(self, src: Path, key: str) -> str:
        dest = self.path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        staging = dest.parent / f".{dest.name}.{uuid.uuid4().hex[:8]}.tmp"
        shutil.copytree(src, staging)
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(staging, dest)
        return self.uri(key)

    def fetch_dir(self, key: str) -> Path:
        path = self.path(key)
        if not path.is_dir():
            raise StoreError(f"{self.uri(key)}: no such artifact folder")
        return path

    def exists(self, key: str) -> bool:
        return self.path(key).exists()


class S3Store:
    """s3://bucket/prefix through fsspec (pip install 'kompressor[s3]')."""

    def __init__(self, uri: str):
        try:
            import fsspec
        except ImportError:
            raise StoreError("s3:// stores need the s3 extra: pip install 'kompressor[s3]'") from None
        self.fs = fsspec.filesystem("s3")
        self.root = uri.rstrip("/")

    def uri(self, key: str) -> str:
        return f"{self.root}/{safe_key(key)}"

    def put_dir(self, src: Path, key: str) -> str:
        self.fs.put(str(src), self.uri(key), recursive=True)
        return self.uri(key)

    def fetch_dir(self, key: str) -> Path:
        local = Path(tempfile.mkdtemp(prefix="kompressor-"))
        self.fs.get(self.uri(key), str(local), recursive=True)
        return local

    def exists(self, key: str) -> bool:
        return self.fs.exists(self.uri(key))


def open_store(uri: str) -> Store:
    """``file:///abs/root``, ``pvc://claim/prefix`` or ``s3://bucket/prefix``."""
    scheme = urlparse(uri).scheme
    if scheme in ("file", "pvc"):
        return FileStore(resolve_local(uri), uri)
    if scheme == "s3":
        return S3Store(uri)
    raise StoreError(f"{uri}: unsupported artifact store (use file://, pvc:// or s3://)")
