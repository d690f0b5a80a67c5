"""Datasets the jobs train, calibrate, evaluate and watch drift on.

``load_dataset(uri, input_shape)`` reads ``builtin://digits|wine|breast_cancer?split=train|eval``
(scikit-learn's bundled data: a fixed 75/25 stratified split, features standardised with the
train split's statistics) or an ``.npz`` file (``file://`` or ``pvc://``) holding ``X``, ``y``
and optionally ``slice``. Bad data raises ``UserError`` with a message naming the problem.

This module imports numpy and (for builtin data) scikit-learn only, never torch: the drift
watcher and the embedded mode use it too.
"""

from __future__ import annotations

import hashlib
import zipfile
from dataclasses import dataclass
from functools import lru_cache
from urllib.parse import parse_qs, urlparse

import numpy as np

from kompressor.errors import UserError

SPLITS = ("train", "eval")
SPLIT_SEED = 0
EVAL_FRACTION = 0.25


@dataclass
class Dataset:
    X: np.ndarray  # float32, [n, *input_shape]
    y: np.ndarray  # int64, [n]
    slices: np.ndarray | None  # str, [n]: one slice label per row, or None
    uri: str
    digest: str  # sha256 of the file (npz) or of the arrays (builtin)

    @property
    def input_shape(self) -> list[int]:
        return list(self.X.shape[1:])

    def __len__(self) -> int:
        return len(self.y)


@dataclass(frozen=True)
class BuiltinData:
    loader: str  # sklearn.datasets function name
    num_classes: int
    slice_feature: int | None  # None: slices by label parity
    slice_names: tuple[str, str]  # (at or below the train median, above it) / (even, odd)


BUILTIN_DATA = {
    # digits: even vs odd digits (a label-group slice: do both halves keep their accuracy?)
    "digits": BuiltinData("load_digits", 10, None, ("even", "odd")),
    # wine: low vs high alcohol content (feature 0)
    "wine": BuiltinData("load_wine", 3, 0, ("low-alcohol", "high-alcohol")),
    # breast_cancer: small vs large mean radius (feature 0)
    "breast_cancer": BuiltinData("load_breast_cancer", 2, 0, ("small-radius", "large-radius")),
}


def num_classes_of(uri: str) -> int | None:
    """Number of classes of a builtin dataset URI; None for files (taken from the labels)."""
    parsed = urlparse(uri)
    if parsed.scheme == "builtin" and parsed.netloc in BUILTIN_DATA:
        return BUILTIN_DATA[parsed.netloc].num_classes
    return None


def load_dataset(uri: str, input_shape: list[int] | None = None, num_classes: int | None = None) -> Dataset:
    """Load and validate a dataset. ``input_shape`` (one sample, no batch dimension) reshapes builtin
    data (e.g. digits to [1, 8, 8]) and is checked against file data; ``num_classes`` bounds the labels."""
    parsed = urlparse(uri)
    if parsed.scheme == "builtin":
        X, y, slices, digest = _builtin(uri, parsed)
    elif parsed.scheme in ("file", "pvc"):
        X, y, slices, digest = _npz(uri)
    else:
        raise UserError(f"{uri}: unsupported data URI (use builtin://, file:// or pvc://)")
    if input_shape is not None:
        X = _shape(uri, X, list(input_shape), reshape=parsed.scheme == "builtin")
    _check_labels(uri, y, num_classes if num_classes is not None else num_classes_of(uri))
    return Dataset(X=X, y=y, slices=slices, uri=uri, digest=digest)


def _builtin(uri: str, parsed) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    name = parsed.netloc
    if name not in BUILTIN_DATA or parsed.path not in ("", "/"):
        raise UserError(f"{uri}: unknown builtin dataset (known: {', '.join(BUILTIN_DATA)})")
    query = parse_qs(parsed.query)
    split = query.get("split", ["train"])[0]
    if split not in SPLITS or set(query) - {"split"}:
        raise UserError(f"{uri}: the only query parameter is split=train|eval")
    X, y, slices = (a.copy() for a in _builtin_split(name, split))
    digest = hashlib.sha256(b"".join(a.tobytes() for a in (X, y, slices.astype("U")))).hexdigest()
    return X, y, slices, digest


@lru_cache(maxsize=8)
def _builtin_split(name: str, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    import sklearn.datasets
    from sklearn.model_selection import train_test_split

    info = BUILTIN_DATA[name]
    bunch = getattr(sklearn.datasets, info.loader)()
    X_all = np.asarray(bunch.data, dtype=np.float64)
    y_all = np.asarray(bunch.target, dtype=np.int64)
    idx_train, idx_eval = train_test_split(
        np.arange(len(y_all)), test_size=EVAL_FRACTION, random_state=SPLIT_SEED, stratify=y_all)
    idx = idx_train if split == "train" else idx_eval
    train = X_all[idx_train]
    mean, std = train.mean(axis=0), train.std(axis=0)
    std[std == 0] = 1.0  # constant pixels (digits' borders) stay 0 after centring
    X = ((X_all[idx] - mean) / std).astype(np.float32)
    y = y_all[idx]
    if info.slice_feature is None:
        slices = np.where(y % 2 == 0, info.slice_names[0], info.slice_names[1])
    else:
        median = np.median(train[:, info.slice_feature])
        slices = np.where(X_all[idx, info.slice_feature] <= median, info.slice_names[0], info.slice_names[1])
    return X, y, slices.astype(str)


def _npz(uri: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, str]:
    from kompressor.store import resolve_local, sha256_file

    path = resolve_local(uri)
    if not path.is_file():
        raise UserError(f"{uri}: data file not found ({path})")
    try:
        npz = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        raise UserError(f"{uri}: not a readable .npz archive: {err}") from None
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise UserError(f"{uri}: not an .npz archive (a single .npy array?); expected arrays X and y")
    with npz:
        missing = [k for k in ("X", "y") if k not in npz.files]
        if missing:
            raise UserError(f"{uri}: the archive has no {' and no '.join(missing)} array "
                            f"(found: {', '.join(npz.files) or 'nothing'})")
        try:
            X_raw, y_raw = npz["X"], npz["y"]
            slices_raw = npz["slice"] if "slice" in npz.files else None
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
            raise UserError(f"{uri}: not a readable .npz archive: {err}") from None
    if X_raw.dtype.kind not in "biuf":
        raise UserError(f"{uri}: X must be numeric, got dtype {X_raw.dtype}")
    if X_raw.ndim < 2:
        raise UserError(f"{uri}: X must be [rows, *input_shape], got shape {list(X_raw.shape)}")
    if len(X_raw) == 0:
        raise UserError(f"{uri}: the dataset is empty (X has 0 rows)")
    X = X_raw.astype(np.float32)
    if not np.isfinite(X).all():
        bad = int((~np.isfinite(X)).reshape(len(X), -1).any(axis=1).sum())
        raise UserError(f"{uri}: X holds NaN or infinite values in {bad} row(s)")
    if y_raw.ndim != 1:
        raise UserError(f"{uri}: y must be one label per row (1-D), got shape {list(y_raw.shape)}")
    if len(y_raw) != len(X):
        raise UserError(f"{uri}: X has {len(X)} rows but y has {len(y_raw)} labels")
    if y_raw.dtype.kind == "f":
        if not np.isfinite(y_raw).all() or (y_raw != np.round(y_raw)).any():
            raise UserError(f"{uri}: y must hold integer class labels")
    elif y_raw.dtype.kind not in "biu":
        raise UserError(f"{uri}: y must hold integer class labels, got dtype {y_raw.dtype}")
    y = y_raw.astype(np.int64)
    slices = None
    if slices_raw is not None:
        if slices_raw.ndim != 1 or len(slices_raw) != len(X):
            raise UserError(f"{uri}: slice must hold one label per row ({len(X)}), got shape {list(slices_raw.shape)}")
        slices = slices_raw.astype(str)
    return X, y, slices, sha256_file(path)


def _shape(uri: str, X: np.ndarray, shape: list[int], reshape: bool) -> np.ndarray:
    if list(X.shape[1:]) == shape:
        return X
    if reshape and int(np.prod(X.shape[1:])) == int(np.prod(shape)):
        return X.reshape(len(X), *shape)
    raise UserError(f"{uri}: samples have shape {list(X.shape[1:])}, but the model expects input shape {shape}")


def _check_labels(uri: str, y: np.ndarray, num_classes: int | None) -> None:
    if len(y) and y.min() < 0:
        raise UserError(f"{uri}: labels must be >= 0, found {int(y.min())}")
    if num_classes is not None and len(y) and y.max() >= num_classes:
        raise UserError(f"{uri}: label {int(y.max())} is out of range for a model with {num_classes} classes "
                        f"(labels must be 0..{num_classes - 1})")
