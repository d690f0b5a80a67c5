"""A verified artifact loaded into an ONNX Runtime session, with its OIP v2 metadata."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kompressor.errors import UserError
from kompressor.store import MODEL_FILE, verify_artifact
from kompressor_jobs.runtime import ort_threads, session_options

# ONNX Runtime's tensor types and the OIP v2 datatypes, one to one.
ORT_TO_OIP = {
    "tensor(bool)": "BOOL", "tensor(uint8)": "UINT8", "tensor(uint16)": "UINT16", "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64", "tensor(int8)": "INT8", "tensor(int16)": "INT16", "tensor(int32)": "INT32",
    "tensor(int64)": "INT64", "tensor(float16)": "FP16", "tensor(float)": "FP32", "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}
OIP_TO_NUMPY = {
    "BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
    "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64, "FP16": np.float16,
    "FP32": np.float32, "FP64": np.float64,
}
NUMPY_TO_OIP = {np.dtype(v): k for k, v in OIP_TO_NUMPY.items()}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str  # OIP v2 datatype
    shape: tuple[int, ...]  # -1 for a dynamic dimension

    def metadata(self) -> dict:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


def _tensor_spec(arg) -> TensorSpec:
    shape = tuple(d if isinstance(d, int) and d > 0 else -1 for d in (arg.shape or []))
    return TensorSpec(arg.name, ORT_TO_OIP.get(arg.type, arg.type), shape)


class LoadedModel:
    """One artifact, verified and loaded. Immutable once built: a hot swap builds a new one."""

    def __init__(self, artifact: str | Path, expected_sha256: str | None = None):
        import onnxruntime as ort

        self.artifact = Path(artifact)
        self.manifest = verify_artifact(self.artifact, expected_sha256)
        revision = self.manifest.get("revision", 0)
        if not isinstance(revision, int) or isinstance(revision, bool) or revision < 0:
            raise UserError(f"{self.artifact}: manifest revision must be a non-negative integer, got {revision!r}")
        self.revision = revision
        self.version = str(revision)
        self.sha256 = self.manifest["files"][MODEL_FILE]
        # The same rule as the evaluation Job's latency measurement (runtime.session_options): threads from
        # $KOMPRESSOR_ORT_THREADS, else this Pod's CPU limit (spec.serving.resources.limits.cpu), else one per
        # core; and no spinning.
        self.threads = ort_threads()
        options = session_options(self.threads)
        try:
            self.session = ort.InferenceSession(str(self.artifact / MODEL_FILE), options,
                                                providers=["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime raises its own exception types for a bad graph
            raise UserError(f"{self.artifact}: ONNX Runtime cannot load {MODEL_FILE}: {err}") from None
        self.inputs = [_tensor_spec(i) for i in self.session.get_inputs()]
        self.outputs = [_tensor_spec(o) for o in self.session.get_outputs()]
        self.output_names = [o.name for o in self.outputs]

    def warm_up(self) -> None:
        """One batch-1 run, so the first real request does not pay for lazy initialisation."""
        feeds = {}
        for spec in self.inputs:
            if spec.datatype not in OIP_TO_NUMPY:
                return
            shape = [1 if d < 0 else d for d in spec.shape]
            feeds[spec.name] = np.zeros(shape, dtype=OIP_TO_NUMPY[spec.datatype])
        self.session.run(None, feeds)

    def run(self, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> list[np.ndarray]:
        return self.session.run(outputs or self.output_names, feeds)

    def metadata(self, name: str) -> dict:
        return {
            "name": name,
            "versions": [self.version],
            "platform": "onnxruntime_onnx",
            "inputs": [i.metadata() for i in self.inputs],
            "outputs": [o.metadata() for o in self.outputs],
        }
