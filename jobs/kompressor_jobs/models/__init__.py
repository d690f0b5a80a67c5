"""Source models, one module per format: builtin.py (the builtin registry, light) and architectures.py
(their definitions, training and cache), torch_export.py (.pt2 programs rebuilt into real nn modules),
onnx_source.py (.onnx, no torch), huggingface.py (Transformers folders, offline), source.py (SourceModel and
the dispatch by format), training.py (plain training and layer helpers).

Names are re-exported lazily: importing this package does not import torch (ONNX sources need none).
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "SourceModel": "source", "load_source": "source", "load_model": "source", "cache_dir": "source",
    "detect_format": "source", "folder_digest": "source",
    "train": "training", "accuracy": "training", "prunable_layers": "training", "as_numpy_batch": "training",
    "input_tensors": "training", "SEED": "training", "BATCH_SIZE": "training", "LEARNING_RATE": "training",
    "MLP": "architectures", "CNN": "architectures", "ResNet": "architectures", "build_builtin": "architectures",
    "ensure_builtin": "architectures", "builtin_path": "architectures", "export_program": "architectures",
    "rebuild_module": "torch_export", "load_program": "torch_export",
    "BuiltinModel": "builtin", "builtin_model": "builtin", "BUILTIN_MODELS": "builtin",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
