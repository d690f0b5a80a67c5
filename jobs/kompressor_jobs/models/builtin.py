"""The builtin models: small architectures trained on their builtin dataset on first use.

This registry is light (no torch); ``kompressor_jobs.models.architectures`` builds and trains them.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlparse

from kompressor.errors import UserError


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    dataset: str  # builtin dataset name (see data.BUILTIN_DATA)
    input_shape: tuple[int, ...]
    num_classes: int
    arch: str  # "mlp", "cnn" or "resnet"
    hidden: tuple[int, ...]  # MLP widths, CNN (conv channels..., fc width), or ResNet stage widths
    epochs: int
    # Bumped whenever the architecture or training recipe changes: part of the cache key.
    recipe: int = 1

    def data_uri(self, split: str) -> str:
        return f"builtin://{self.dataset}?split={split}"


BUILTIN_MODELS = {
    # Wide enough that removing channels (structured pruning) shows up in ONNX Runtime latency.
    "digits-mlp": BuiltinModel("digits-mlp", "digits", (64,), 10, "mlp", (1024, 1024), epochs=8),
    "digits-cnn": BuiltinModel("digits-cnn", "digits", (1, 8, 8), 10, "cnn", (32, 64, 128), epochs=10),
    # BatchNorm, residual basic blocks (identity and 1x1-projection shortcuts), adaptive average pooling.
    "digits-resnet": BuiltinModel("digits-resnet", "digits", (1, 8, 8), 10, "resnet", (16, 32, 64), epochs=6),
    "wine-mlp": BuiltinModel("wine-mlp", "wine", (13,), 3, "mlp", (64, 64), epochs=40),
    "breast-cancer-mlp": BuiltinModel("breast-cancer-mlp", "breast_cancer", (30,), 2, "mlp", (128, 64), epochs=20),
}


def builtin_model(uri: str) -> BuiltinModel | None:
    """The builtin model a ``builtin://NAME`` URI names; None for other URIs."""
    parsed = urlparse(uri)
    if parsed.scheme != "builtin":
        return None
    if parsed.netloc not in BUILTIN_MODELS or parsed.path not in ("", "/"):
        raise UserError(f"{uri}: unknown builtin model (known: {', '.join(BUILTIN_MODELS)})")
    return BUILTIN_MODELS[parsed.netloc]
