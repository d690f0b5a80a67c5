"""Data and spec helpers of the drift tests."""

from pathlib import Path

import numpy as np
import yaml

from serving_support import N_FEATURES

CATEGORICAL = {0: 4, 1: 3}  # feature -> categories
ROWS_PER_REVISION = 200
SHIFT = 1.0  # in standard deviations, on features 2 and 3 (plus a skewed category on feature 0)


def tabular_rows(rng: np.random.Generator, n: int, shifted: bool = False) -> np.ndarray:
    """Rows with two categorical features (0 and 1) and six standard-normal ones."""
    x = rng.normal(size=(n, N_FEATURES)).astype(np.float32)
    x[:, 0] = rng.integers(0, CATEGORICAL[0], n)
    x[:, 1] = rng.integers(0, CATEGORICAL[1], n)
    if shifted:
        x[:, 2:4] += SHIFT
        x[:, 0] = np.where(rng.random(n) < 0.5, CATEGORICAL[0] - 1, x[:, 0])
    return x


def write_spec(folder: Path, reference_uri: str, name: str = "tab", **drift) -> Path:
    doc = {
        "apiVersion": "kompressor.io/v1alpha1", "kind": "CompressedModel",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"model": {"uri": "builtin://wine-mlp"},
                 "data": {"train": reference_uri, "eval": reference_uri},
                 "drift": {"categoricalFeatures": [{"feature": f, "categories": c} for f, c in CATEGORICAL.items()],
                           **drift}},
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}-{abs(hash(str(drift)))}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path
