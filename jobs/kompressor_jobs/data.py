"""Datasets the jobs train, calibrate, evaluate and watch drift on.

``load_dataset(uri, inputs, task, num_classes)`` reads ``builtin://digits|wine|breast_cancer?split=train|eval``
(scikit-learn's bundled data: a fixed 75/25 stratified split, features standardised with the train split's
statistics) or an ``.npz`` file (``file://`` or ``pvc://``) holding one array per declared input name (``X`` for
the single-input ``inputShape`` shorthand), ``y`` (class labels; float targets for regression; absent for
embedding) and optionally ``slice``. Every array is checked against the declared inputs (name, dtype, shape);
bad data raises ``UserError`` with a message naming the input, the dtype and the file.

This module imports numpy and (for builtin data and the stratified split) scikit-learn only, never torch: the
drift watcher and the embedded mode use it too.
"""

from __future__ import annotations

import hashlib
import zipfile
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Iterable, Sequence
from urllib.parse import parse_qs, urlparse

import numpy as np

from kompressor.api.spec import InputSpec
from kompressor.errors import UserError

SPLITS = ("train", "eval")
SPLIT_SEED = 0
EVAL_FRACTION = 0.25
# The array of a single-input model in a data file (the inputShape shorthand), and that input's name.
SHORTHAND_ARRAY = "X"
SHORTHAND_INPUT = "input"
RESERVED_ARRAYS = ("y", "slice")
TASKS = ("classification", "regression", "embedding")

# Which array dtypes may be fed to a declared input dtype (cast losslessly or as the old X -> float32 did).
_ACCEPTS = {
    "float32": "fiub",  # any number: features stored as float64 or integers are cast, as before
    "float16": "fiub",
    "int64": "iub",  # token ids: integers only; a float array is refused rather than truncated
    "int32": "iub",
    "bool": "biu",  # bool, or integers holding 0/1 only
}


@dataclass
class Dataset:
    inputs: dict[str, np.ndarray]  # ordered like the model's inputs; each [n, *shape] in its declared dtype
    y: np.ndarray | None  # int64 [n] labels; float32 [n] or [n, k] targets (regression); None (embedding)
    slices: np.ndarray | None  # str, [n]: one slice label per row, or None
    uri: str
    digest: str  # sha256 of the file (npz) or of the arrays (builtin); subsets derive theirs from it

    @property
    def X(self) -> np.ndarray:
        """The single input of a one-input model (what ``inputShape`` models and ``.npz`` ``X`` arrays are)."""
        if len(self.inputs) != 1:
            raise UserError(f"{self.uri}: the model has {len(self.inputs)} inputs ({', '.join(self.inputs)}); "
                            "this step needs a model with one input")
        return next(iter(self.inputs.values()))

    @property
    def input_names(self) -> list[str]:
        return list(self.inputs)

    @property
    def input_shape(self) -> list[int]:
        return list(self.X.shape[1:])

    def __len__(self) -> int:
        return len(next(iter(self.inputs.values()))) if self.inputs else 0

    def feed(self, start: int = 0, stop: int | None = None) -> dict[str, np.ndarray]:
        """Rows ``start:stop`` as an ONNX Runtime feed (input name -> array)."""
        return {name: a[start:stop] for name, a in self.inputs.items()}

    def subset(self, indices: Sequence[int] | np.ndarray) -> "Dataset":
        idx = np.asarray(indices, dtype=np.int64)
        digest = hashlib.sha256(self.digest.encode() + b":" + idx.tobytes()).hexdigest()
        return replace(self, inputs={k: v[idx] for k, v in self.inputs.items()},
                       y=None if self.y is None else self.y[idx],
                       slices=None if self.slices is None else self.slices[idx], digest=digest)


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


def as_inputs(inputs) -> list[InputSpec] | None:
    """Normalise what callers pass as the model's inputs: None (undeclared), a shape (the ``inputShape``
    shorthand: one float32 input), InputSpecs, or their wire form (dicts, as manifests record them)."""
    if inputs is None:
        return None
    inputs = list(inputs)
    if not inputs:
        return None
    if all(isinstance(d, (int, np.integer)) for d in inputs):
        return [InputSpec(name=SHORTHAND_INPUT, dtype="float32", shape=[int(d) for d in inputs])]
    out = []
    for i in inputs:
        if isinstance(i, dict):
            i = InputSpec(name=i["name"], dtype=i.get("dtype", "float32"), shape=list(i["shape"]))
        out.append(i)
    return out


def load_dataset(uri: str, inputs=None, task: str = "classification", num_classes: int | None = None, *,
                 input_shape: list[int] | None = None) -> Dataset:
    """Load and validate a dataset against the model's declared ``inputs`` (InputSpecs, or a shape for the
    one-float32-input shorthand; None: take the file's arrays as they are). Builtin data is reshaped to the
    declared shape (e.g. digits to [1, 8, 8]); file data must match it. ``num_classes`` bounds the labels."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}")
    declared = as_inputs(inputs if inputs is not None else input_shape)
    parsed = urlparse(uri)
    if parsed.scheme == "builtin":
        arrays, y, slices, digest = _builtin(uri, parsed, task)
        if declared is not None and len(declared) != 1:
            raise UserError(f"{uri}: builtin data has one input (X), but the model declares {len(declared)} "
                            f"({', '.join(i.name for i in declared)})")
    elif parsed.scheme in ("file", "pvc"):
        arrays, y, slices, digest = _npz(uri, task, need_x=declared is None)
    else:
        raise UserError(f"{uri}: unsupported data URI (use builtin://, file:// or pvc://)")
    features = _match_inputs(uri, arrays, declared, reshape=parsed.scheme == "builtin")
    n = len(next(iter(features.values())))
    if n == 0:
        raise UserError(f"{uri}: the dataset is empty (0 rows)")
    for name, a in features.items():
        if len(a) != n:
            raise UserError(f"{uri}: input {name} has {len(a)} rows but {next(iter(features))} has {n}")
    if y is not None and len(y) != n:
        what = "X" if list(features) == [SHORTHAND_INPUT] and SHORTHAND_ARRAY in arrays else next(iter(features))
        raise UserError(f"{uri}: {what} has {n} rows but y has {len(y)} labels")
    if slices is not None and len(slices) != n:
        raise UserError(f"{uri}: slice must hold one label per row ({n}), got shape {list(slices.shape)}")
    if task == "classification":
        _check_labels(uri, y, num_classes if num_classes is not None else num_classes_of(uri))
    elif task == "regression" and num_classes is not None and y.ndim == 2 and y.shape[1] != num_classes:
        raise UserError(f"{uri}: y has {y.shape[1]} targets per row, but the model has {num_classes} outputs")
    return Dataset(inputs=features, y=y, slices=slices, uri=uri, digest=digest)


def split_validation(train: Dataset, fraction: float, seed: int = 0,
                     stratify: bool | None = None) -> tuple[Dataset, Dataset]:
    """A seeded hold-out of ``fraction`` of ``train`` as validation: (rest of train, validation). Stratified by
    label for classification data (integer y) when every class has at least two rows; a plain shuffle otherwise."""
    n = len(train)
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"validation fraction must be in (0, 1), got {fraction}")
    n_val = int(round(n * fraction))
    if n < 2 or n_val < 1 or n_val >= n:
        raise UserError(f"{train.uri}: {n} training rows are too few to hold out {fraction:.0%} as validation; "
                        "set spec.data.validation")
    y = train.y
    if stratify is None:
        stratify = y is not None and y.ndim == 1 and y.dtype.kind in "iu"
    labels = None
    if stratify:
        _, counts = np.unique(y, return_counts=True)
        if counts.min() >= 2 and n_val >= len(counts) and n - n_val >= len(counts):
            labels = y
    from sklearn.model_selection import train_test_split

    idx_train, idx_val = train_test_split(np.arange(n), test_size=n_val, random_state=seed, stratify=labels)
    return train.subset(np.sort(idx_train)), train.subset(np.sort(idx_val))


# --- builtin data ----------------------------------------------------------------------------------

def _builtin(uri: str, parsed, task: str) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, str]:
    name = parsed.netloc
    if name not in BUILTIN_DATA or parsed.path not in ("", "/"):
        raise UserError(f"{uri}: unknown builtin dataset (known: {', '.join(BUILTIN_DATA)})")
    query = parse_qs(parsed.query)
    split = query.get("split", ["train"])[0]
    if split not in SPLITS or set(query) - {"split"}:
        raise UserError(f"{uri}: the only query parameter is split=train|eval")
    X, y, slices = (a.copy() for a in _builtin_split(name, split))
    digest = hashlib.sha256(b"".join(a.tobytes() for a in (X, y, slices.astype("U")))).hexdigest()
    if task == "regression":
        y = y.astype(np.float32)
    elif task == "embedding":
        y = None
    return {SHORTHAND_ARRAY: X}, y, slices, digest


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


# --- .npz files ------------------------------------------------------------------------------------

def _npz(uri: str, task: str, need_x: bool) -> tuple[dict[str, np.ndarray], np.ndarray | None, np.ndarray | None, str]:
    from kompressor.store import resolve_local, sha256_file

    path = resolve_local(uri)
    if not path.is_file():
        raise UserError(f"{uri}: data file not found ({path})")
    try:
        npz = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        raise UserError(f"{uri}: not a readable .npz archive: {err}") from None
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise UserError(f"{uri}: not an .npz archive (a single .npy array?); expected one array per input and y")
    with npz:
        names = list(npz.files)
        features = [k for k in names if k not in RESERVED_ARRAYS]
        needs_y = task != "embedding"
        missing = ([SHORTHAND_ARRAY] if (need_x and SHORTHAND_ARRAY not in names) or not features else []) + (["y"] if needs_y and "y" not in names else [])
        if missing:
            raise UserError(f"{uri}: the archive has no {' and no '.join(missing)} array "
                            f"(found: {', '.join(names) or 'nothing'})")
        try:
            arrays = {k: npz[k] for k in features}
            y_raw = npz["y"] if "y" in names and needs_y else None
            slices_raw = npz["slice"] if "slice" in names else None
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
            raise UserError(f"{uri}: not a readable .npz archive: {err}") from None
    y = None if y_raw is None else _targets(uri, y_raw, task)
    slices = None
    if slices_raw is not None:
        if slices_raw.ndim != 1:
            raise UserError(f"{uri}: slice must hold one label per row, got shape {list(slices_raw.shape)}")
        slices = slices_raw.astype(str)
    return arrays, y, slices, sha256_file(path)


def _targets(uri: str, y_raw: np.ndarray, task: str) -> np.ndarray:
    if task == "regression":
        if y_raw.dtype.kind not in "fiub" or y_raw.ndim not in (1, 2):
            raise UserError(f"{uri}: y must hold real regression targets, [rows] or [rows, outputs], got dtype "
                            f"{y_raw.dtype} and shape {list(y_raw.shape)}")
        y = y_raw.astype(np.float32)
        if not np.isfinite(y).all():
            raise UserError(f"{uri}: y holds NaN or infinite values")
        return y
    if y_raw.ndim != 1:
        raise UserError(f"{uri}: y must be one label per row (1-D), got shape {list(y_raw.shape)}")
    if y_raw.dtype.kind == "f":
        if not np.isfinite(y_raw).all() or (y_raw != np.round(y_raw)).any():
            raise UserError(f"{uri}: y must hold integer class labels")
    elif y_raw.dtype.kind not in "biu":
        raise UserError(f"{uri}: y must hold integer class labels, got dtype {y_raw.dtype}")
    return y_raw.astype(np.int64)


def _match_inputs(uri: str, arrays: dict[str, np.ndarray], declared: list[InputSpec] | None,
                  reshape: bool) -> dict[str, np.ndarray]:
    """The arrays for the declared inputs, in their order, checked and cast to their dtypes."""
    if declared is None:  # undeclared: the shorthand's X, as it is, named "input"
        return {SHORTHAND_INPUT: _checked(uri, SHORTHAND_ARRAY, arrays[SHORTHAND_ARRAY], None, reshape)}
    out = {}
    for spec in declared:
        key = spec.name
        if key not in arrays and len(declared) == 1 and SHORTHAND_ARRAY in arrays:
            key = SHORTHAND_ARRAY  # one input: X stands for it, whatever the model calls it
        if key not in arrays:
            found = ", ".join(k for k in arrays) or "nothing"
            raise UserError(f"{uri}: the archive has no array for input {spec.name} (dtype {spec.dtype}, shape "
                            f"[rows, {', '.join(map(str, spec.shape))}]); found: {found}")
        out[spec.name] = _checked(uri, key, arrays[key], spec, reshape)
    return out


def _checked(uri: str, key: str, a: np.ndarray, spec: InputSpec | None, reshape: bool) -> np.ndarray:
    label = key if spec is None or spec.name == key else f"{key} (input {spec.name})"
    if a.dtype.kind not in "biuf":
        raise UserError(f"{uri}: {label} must be numeric, got dtype {a.dtype}")
    if a.ndim < 2:
        raise UserError(f"{uri}: {label} must be [rows, *shape], got shape {list(a.shape)}")
    if spec is None:  # undeclared: floats as float32 (as the shorthand always did), integers and bools kept
        dtype = np.dtype(np.float32) if a.dtype.kind == "f" else a.dtype
    else:
        dtype = np.dtype(spec.dtype)
        if a.dtype.kind not in _ACCEPTS[spec.dtype]:
            raise UserError(f"{uri}: {label} has dtype {a.dtype}, but the model's input {spec.name} is "
                            f"{spec.dtype} (store it as {spec.dtype})")
        shape = list(spec.shape)
        if list(a.shape[1:]) != shape:
            if reshape and int(np.prod(a.shape[1:])) == int(np.prod(shape)):
                a = a.reshape(len(a), *shape)
            else:
                raise UserError(f"{uri}: {label} samples have shape {list(a.shape[1:])}, but the model expects "
                                f"input shape {shape} for {spec.name}")
    if a.dtype.kind == "f" and len(a) and not np.isfinite(a).all():
        bad = int((~np.isfinite(a)).reshape(len(a), -1).any(axis=1).sum())
        raise UserError(f"{uri}: {label} holds NaN or infinite values in {bad} row(s)")
    if dtype.kind in "iub" and a.dtype.kind in "iu" and a.size:
        lo, hi = (0, 1) if dtype.kind == "b" else (np.iinfo(dtype).min, np.iinfo(dtype).max)
        if a.min() < lo or a.max() > hi:
            raise UserError(f"{uri}: {label} holds values in [{a.min()}, {a.max()}], outside what {dtype.name} "
                            f"holds{' (0 or 1)' if dtype.kind == 'b' else ''}")
    return a.astype(dtype, copy=False)


def _check_labels(uri: str, y: np.ndarray, num_classes: int | None) -> None:
    if len(y) and y.min() < 0:
        raise UserError(f"{uri}: labels must be >= 0, found {int(y.min())}")
    if num_classes is not None and len(y) and y.max() >= num_classes:
        raise UserError(f"{uri}: label {int(y.max())} is out of range for a model with {num_classes} classes "
                        f"(labels must be 0..{num_classes - 1})")


def input_names(inputs: Iterable[InputSpec]) -> list[str]:
    return [i.name for i in inputs]
