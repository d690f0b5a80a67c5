"""The artifact store: where jobs put artifacts and the operator and server read them.

One small interface (``open_store``) over file://, pvc:// (a mounted claim, i.e. a file
store inside a Pod) and s3:// (fsspec, the optional ``s3`` extra). Keys never escape the
store root, and every artifact read is checked against its manifest's sha256.
"""

from kompressor.store.artifact import (
    MANIFEST_FILE, MODEL_FILE, ArtifactError, read_manifest, sha256_file, verify_artifact, write_manifest,
)
from kompressor.store.stores import Store, StoreError, open_store, resolve_local

__all__ = [
    "MANIFEST_FILE", "MODEL_FILE", "ArtifactError", "Store", "StoreError", "open_store", "read_manifest",
    "resolve_local", "sha256_file", "verify_artifact", "write_manifest",
]
