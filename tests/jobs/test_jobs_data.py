"""load_dataset: builtin splits and .npz files, and a clear UserError for every kind of bad data."""

from __future__ import annotations

import numpy as np
import pytest
import sklearn.datasets

from kompressor.errors import UserError
from kompressor_jobs.models.builtin import BUILTIN_MODELS, builtin_model
from kompressor_jobs.data import BUILTIN_DATA, load_dataset


@pytest.mark.parametrize("name", sorted(BUILTIN_DATA))
def test_builtin_split_is_stratified_deterministic_and_scaled_by_train(name):
    train = load_dataset(f"builtin://{name}?split=train")
    evaluation = load_dataset(f"builtin://{name}?split=eval")
    raw = getattr(sklearn.datasets, BUILTIN_DATA[name].loader)()
    assert len(train) + len(evaluation) == len(raw.target)
    assert abs(len(evaluation) / len(raw.target) - 0.25) < 0.01
    # stratified: class proportions agree between the splits
    for label in np.unique(raw.target):
        assert abs((train.y == label).mean() - (evaluation.y == label).mean()) < 0.03
    # standardised with train statistics: the train split is centred, eval only roughly
    assert np.abs(train.X.mean(axis=0)).max() < 1e-4
    assert train.X.dtype == np.float32 and train.y.dtype == np.int64
    again = load_dataset(f"builtin://{name}?split=train")
    assert again.digest == train.digest and np.array_equal(again.X, train.X)
    assert train.digest != evaluation.digest
    # every row carries a slice label, and both slices are populated
    assert train.slices is not None and len(set(train.slices.tolist())) == 2


def test_digits_slices_are_label_parity_and_reshape_for_the_cnn():
    data = load_dataset("builtin://digits?split=eval", input_shape=[1, 8, 8])
    assert data.X.shape == (len(data), 1, 8, 8)
    assert set(data.slices[data.y % 2 == 0]) == {"even"} and set(data.slices[data.y % 2 == 1]) == {"odd"}


def test_builtin_models_name_their_dataset():
    for name, model in BUILTIN_MODELS.items():
        assert builtin_model(f"builtin://{name}") is model
        data = load_dataset(model.data_uri("eval"), list(model.input_shape))
        assert data.y.max() < model.num_classes


def test_npz_roundtrip_with_slices(tmp_path):
    path = tmp_path / "data.npz"
    X = np.random.default_rng(0).normal(size=(30, 4)).astype(np.float64)
    y = np.arange(30) % 3
    np.savez(path, X=X, y=y, slice=np.array(["a", "b"] * 15))
    data = load_dataset(f"file://{path}", input_shape=[4], num_classes=3)
    assert data.X.dtype == np.float32 and np.allclose(data.X, X)
    assert data.y.tolist() == y.tolist() and data.slices.tolist() == ["a", "b"] * 15
    import hashlib

    assert data.digest == hashlib.sha256(path.read_bytes()).hexdigest()


def test_pvc_uri_resolves_under_the_mount_root(tmp_path, monkeypatch):
    (tmp_path / "claim").mkdir()
    np.savez(tmp_path / "claim" / "d.npz", X=np.ones((5, 2)), y=np.zeros(5, dtype=int))
    monkeypatch.setenv("KOMPRESSOR_PVC_ROOT", str(tmp_path))
    assert len(load_dataset("pvc://claim/d.npz")) == 5


def _bad(tmp_path, name, **arrays):
    path = tmp_path / name
    np.savez(path, **arrays)
    return f"file://{path}"


BAD_DATA = {
    "missing file": (lambda p: f"file://{p}/nope.npz", "not found"),
    "not an npz": (lambda p: (p.joinpath("x.npz").write_text("hello"), f"file://{p}/x.npz")[1], "not a readable"),
    "a bare npy": (lambda p: (np.save(p / "x.npy", np.ones(3)), f"file://{p}/x.npy")[1], "not an .npz"),
    "missing y": (lambda p: _bad(p, "d.npz", X=np.ones((3, 2))), "no y"),
    "missing X and y": (lambda p: _bad(p, "d.npz", Z=np.ones(3)), "no X and no y"),
    "empty": (lambda p: _bad(p, "d.npz", X=np.ones((0, 2)), y=np.ones(0, dtype=int)), "empty"),
    "NaN features": (lambda p: _bad(p, "d.npz", X=np.array([[1.0, np.nan], [0, 0]]), y=np.zeros(2, int)), "NaN"),
    "inf features": (lambda p: _bad(p, "d.npz", X=np.array([[1.0, np.inf]]), y=np.zeros(1, int)), "infinite"),
    "negative labels": (lambda p: _bad(p, "d.npz", X=np.ones((2, 2)), y=np.array([0, -1])), ">= 0"),
    "fractional labels": (lambda p: _bad(p, "d.npz", X=np.ones((2, 2)), y=np.array([0.5, 1.0])), "integer"),
    "length mismatch": (lambda p: _bad(p, "d.npz", X=np.ones((3, 2)), y=np.zeros(2, int)), "3 rows but y has 2"),
    "string features": (lambda p: _bad(p, "d.npz", X=np.array([["a", "b"]]), y=np.zeros(1, int)), "numeric"),
    "slice length": (lambda p: _bad(p, "d.npz", X=np.ones((3, 2)), y=np.zeros(3, int), slice=np.array(["a"])),
                     "one label per row"),
    "unknown builtin": (lambda p: "builtin://mnist", "unknown builtin dataset"),
    "bad split": (lambda p: "builtin://digits?split=test", "split=train|eval"),
    "s3 data": (lambda p: "s3://bucket/d.npz", "unsupported data URI"),
}


@pytest.mark.parametrize("case", sorted(BAD_DATA))
def test_bad_data_is_a_clear_user_error(tmp_path, case):
    make, message = BAD_DATA[case]
    with pytest.raises(UserError, match=message):
        load_dataset(make(tmp_path))


def test_shape_and_label_range_are_checked(tmp_path):
    uri = _bad(tmp_path, "d.npz", X=np.ones((4, 3)), y=np.array([0, 1, 2, 3]))
    with pytest.raises(UserError, match=r"shape \[3\], but the model expects input shape \[5\]"):
        load_dataset(uri, input_shape=[5])
    with pytest.raises(UserError, match="label 3 is out of range for a model with 3 classes"):
        load_dataset(uri, input_shape=[3], num_classes=3)
    with pytest.raises(UserError, match="model expects input shape"):
        load_dataset("builtin://digits?split=eval", input_shape=[63])
