"""The CompressedModel API (kompressor.io/v1alpha1): spec, status, defaults, validation.

Light on purpose: nothing here imports torch, onnxruntime or alibi-detect.
"""

from kompressor.api.manifest import CompressedModel, load_manifests, parse_manifest, to_manifest
from kompressor.api.spec import CompressedModelSpec
from kompressor.api.status import CompressedModelStatus
from kompressor.api.wire import SpecError, from_wire, to_wire

__all__ = [
    "CompressedModel", "CompressedModelSpec", "CompressedModelStatus", "SpecError",
    "from_wire", "load_manifests", "parse_manifest", "to_manifest", "to_wire",
]
