"""What the drift watcher tests (``spec.drift.signal``) and the reference it tests it against.

- ``inputs``: the request inputs, every input flattened and concatenated (float32), against the
  reference data's inputs.
- ``outputs``: prediction drift. For a classification model, the predicted classes (one categorical
  feature: chisquare) or the class probabilities (softmax of the logits: KS, CVM, MMD ...); for other
  tasks the output values. The reference is the served model's outputs on the reference data, computed
  here with ONNX Runtime from ``--artifact`` (no torch).
- ``embeddings``: the model's output vectors as they are (an embedding model's embeddings; a classifier's
  logits), against the served model's output vectors on the reference data.

Unset, the signal is ``inputs`` for models whose inputs are all floating point and ``outputs`` otherwise
(a KS test on token ids means nothing).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from kompressor.api.manifest import CompressedModel
from kompressor.api.spec import DriftSpec
from kompressor.errors import UserError
from kompressor_jobs import capture

FLOAT_DTYPES = ("float32", "float16")
REFERENCE_BATCH = 256
MODEL_FILE = "model.onnx"


@dataclass
class Signal:
    name: str  # inputs | outputs | embeddings
    x_ref: np.ndarray  # what the detector is fitted on, float32 [n, features]
    reference_uri: str
    drift_spec: DriftSpec  # spec.drift, with the categorical feature of predicted classes for chisquare
    capture_signal: str  # which captured values are read: inputs, or outputs
    transform: Callable[[np.ndarray], np.ndarray] | None = None  # captured values -> what is tested


def resolve_signal(cm: CompressedModel) -> str:
    chosen = cm.spec.drift.signal
    if chosen:
        return chosen
    declared = cm.spec.model.inputs or []
    return "outputs" if any(i.dtype not in FLOAT_DTYPES for i in declared) else "inputs"


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def predicted_classes(logits: np.ndarray) -> np.ndarray:
    return np.argmax(logits, axis=1).astype(np.float32)[:, None]


def flat_inputs(arrays: dict[str, np.ndarray], order: list[str] | None = None) -> np.ndarray:
    """As the capture flattens a request's inputs: each flattened, concatenated in input order, float32."""
    names = [n for n in (order or []) if n in arrays] or list(arrays)
    flat = [np.asarray(arrays[n]).reshape(len(arrays[n]), -1).astype(np.float32) for n in names]
    return np.ascontiguousarray(flat[0] if len(flat) == 1 else np.concatenate(flat, axis=1))


def model_outputs(artifact: Path, arrays: dict[str, np.ndarray]) -> np.ndarray:
    """The model's outputs on ``arrays`` (every output flattened and concatenated, as the capture keeps
    them), with ONNX Runtime."""
    from kompressor_jobs import runtime

    path = artifact / MODEL_FILE if artifact.is_dir() else artifact
    if not path.exists():
        raise UserError(f"--artifact {artifact}: no {MODEL_FILE} there (spec.drift.signal outputs/embeddings "
                        "needs the served model to compute the reference outputs)")
    sess = runtime.session(path)
    n = len(next(iter(arrays.values())))
    chunks = []
    for start in range(0, n, REFERENCE_BATCH):
        feed = runtime.feed_for(sess, {k: v[start:start + REFERENCE_BATCH] for k, v in arrays.items()})
        outs = sess.run(None, feed)
        chunks.append(np.concatenate([np.asarray(o).reshape(len(o), -1).astype(np.float32) for o in outs], axis=1))
    return np.concatenate(chunks, axis=0)


def _input_order(artifact: Path | None) -> list[str] | None:
    if artifact is None:
        return None
    import json

    try:
        manifest = json.loads((artifact / "manifest.json").read_text())
        return [i["name"] for i in manifest["inputs"]]  # runtime.io_signature: the graph's inputs, in order
    except (OSError, ValueError, KeyError, TypeError):
        return None


def prepare_signal(cm: CompressedModel, args) -> Signal:
    from kompressor_jobs.data import load_dataset

    spec = cm.spec.drift
    name = resolve_signal(cm)
    uri = getattr(args, "reference", None) or cm.spec.data.reference or cm.spec.data.eval
    artifact = Path(args.artifact) if getattr(args, "artifact", None) else None
    data = load_dataset(uri, inputs=cm.spec.model.inputs or None, task=cm.spec.model.task)
    if name == "inputs":
        return Signal(name, flat_inputs(data.inputs, _input_order(artifact)), uri, spec, capture.SIGNAL_INPUTS)
    if artifact is None:
        raise UserError(f"spec.drift.signal {name}: the watcher needs --artifact (the served model) to compute "
                        "the reference outputs")
    ref = model_outputs(artifact, data.inputs)
    if name == "outputs" and cm.spec.model.task == "classification":
        if spec.detector == "chisquare":
            # One categorical feature, the predicted class. Its categories are taken from the reference's and the
            # window's classes (Alibi's ChiSquareDrift without categories_per_feature): a class neither predicts
            # would be an empty column of the contingency table, which chi-square cannot test.
            drift_spec = dataclasses.replace(spec, categorical_features=[])
            return Signal(name, predicted_classes(ref), uri, drift_spec, "outputs", predicted_classes)
        drift_spec = dataclasses.replace(spec, categorical_features=[])
        return Signal(name, softmax(ref), uri, drift_spec, "outputs", softmax)
    # regression outputs, embeddings: the output values as they are
    return Signal(name, ref, uri, dataclasses.replace(spec, categorical_features=[]), "outputs")
