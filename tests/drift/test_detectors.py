"""The detector interface against Alibi Detect itself: our fast KS gives Alibi's numbers."""

import numpy as np
import pytest

from kompressor.api.spec import DriftSpec
from kompressor_jobs.drift.detectors import build_detector


@pytest.mark.parametrize("shift", [0.0, 0.3])
def test_ks_feature_p_values_equal_alibi_ksdrift(shift):
    from alibi_detect.cd import KSDrift

    rng = np.random.default_rng(4)
    x_ref = rng.normal(size=(300, 6)).astype(np.float32)
    x = rng.normal(size=(120, 6)).astype(np.float32)
    x[:, :2] += shift
    x_ref[:, 5] = np.round(x_ref[:, 5])  # ties too
    x[:, 5] = np.round(x[:, 5])
    ours = build_detector(DriftSpec(detector="ks", window_size=120), x_ref).check(x)
    alibi = KSDrift(x_ref, p_val=0.05).predict(x, return_p_val=True, return_distance=True)["data"]
    np.testing.assert_array_equal(np.asarray(ours.feature_p_values, np.float32), alibi["p_val"])
    assert ours.is_drift == bool(alibi["is_drift"])
    assert ours.distance == pytest.approx(float(np.max(alibi["distance"])))


@pytest.mark.parametrize("detector", ["mmd", "lsdd"])
def test_wide_image_inputs_are_flattened_and_projected(detector):
    """[n, 1, 12, 12] images (144 features, above the projection threshold) work end to end."""
    from kompressor_jobs.drift.detectors import PROJECT_ABOVE

    rng = np.random.default_rng(6)
    images = lambda n, shift=0.0: (rng.normal(size=(n, 1, 12, 12)) + shift).astype(np.float32)  # noqa: E731
    assert 144 > PROJECT_ABOVE
    det = build_detector(DriftSpec(detector=detector, window_size=100), images(300))
    calm, shifted = det.check(images(100)), det.check(images(100, shift=0.5))
    assert calm.outcome == "NoDrift" and shifted.outcome == "Drift"
    assert shifted.p_value < shifted.threshold <= calm.p_value


def _categorical_spec(n_features: int, categories: int, window: int = 200) -> DriftSpec:
    from kompressor.api.spec import CategoricalFeature

    return DriftSpec(detector="chisquare", window_size=window,
                     categorical_features=[CategoricalFeature(feature=f, categories=categories)
                                           for f in range(n_features)])


@pytest.mark.parametrize("shift", [0.0, 0.4])
def test_chisquare_equals_alibi_chisquaredrift_when_no_expected_count_is_small(shift):
    """No cell is pooled when every expected count is at least 5: then the p-values are Alibi's own."""
    from alibi_detect.cd import ChiSquareDrift

    rng = np.random.default_rng(7)
    quantise = lambda x: np.clip(np.round(x), -2, 2) + 2  # noqa: E731  # 5 levels, the rarest ~6.7 %
    x_ref = quantise(rng.normal(size=(1000, 6))).astype(np.float32)
    x = quantise(rng.normal(size=(200, 6)) + shift).astype(np.float32)
    ours = build_detector(_categorical_spec(6, 5), x_ref).check(x)
    alibi = ChiSquareDrift(x_ref, p_val=0.05, categories_per_feature={f: 5 for f in range(6)}).predict(x)["data"]
    np.testing.assert_allclose(np.asarray(ours.feature_p_values, np.float32), alibi["p_val"], rtol=1e-6)
    assert ours.is_drift == bool(alibi["is_drift"])


RARE = np.array([0.97, 0.01, 0.01, 0.005, 0.005])  # expected counts in a 200-row window: 194, 2, 2, 1, 1


@pytest.mark.slow
def test_chisquare_false_alarms_on_rare_categories_are_at_most_p():
    """Small expected counts make the chi-square test's asymptotic p-values liberal (Alibi's ChiSquareDrift
    false-alarms on about 9 % of these windows at p = 0.05); with Cochran's rule (cells expected below 5
    pooled) the rate is at most p. Each window gets a fresh reference, so the rate is the test's own, not
    one reference sample's luck. 2,000 seeded windows: tolerance 0.01 (about 2 standard errors at p)."""
    rng = np.random.default_rng(11)
    draw = lambda n: rng.choice(len(RARE), size=(n, 8), p=RARE).astype(np.float32)  # noqa: E731
    spec, windows = _categorical_spec(8, len(RARE)), 2000
    alarms = sum(build_detector(spec, draw(1000)).test(draw(200)).is_drift for _ in range(windows))
    rate = alarms / windows
    print(f"false alarms per window {rate:.4f} at p = {spec.p_value}")
    assert rate <= spec.p_value + 0.01


def test_chisquare_pooling_keeps_a_rare_category_that_surges():
    """The pooling looks at the pooled counts: a category rare in the reference that surges in the window is
    no longer small and is tested in its own cell, so the surge is caught."""
    rng = np.random.default_rng(12)
    x_ref = rng.choice(len(RARE), size=(1000, 1), p=RARE).astype(np.float32)
    surge = np.array([0.87, 0.01, 0.01, 0.005, 0.105])
    x = rng.choice(len(RARE), size=(200, 1), p=surge).astype(np.float32)
    found = build_detector(_categorical_spec(1, 5), x_ref).check(x)
    assert found.is_drift and found.p_value < 1e-4


def test_chisquare_declared_categories_seen_in_neither_sample_are_dropped():
    """Alibi's ChiSquareDrift raises on a declared category neither sample has (a zero expected count);
    ours drops the empty cell and tests the rest."""
    from alibi_detect.cd import ChiSquareDrift

    rng = np.random.default_rng(13)
    x_ref = rng.integers(0, 3, size=(500, 2)).astype(np.float32)  # declared: 6 categories, 3 used
    x = rng.integers(0, 3, size=(200, 2)).astype(np.float32)
    with pytest.raises(ValueError):
        ChiSquareDrift(x_ref, p_val=0.05, categories_per_feature={0: 6, 1: 6}).predict(x)
    found = build_detector(_categorical_spec(2, 6), x_ref).check(x)
    assert found.outcome == "NoDrift" and len(found.feature_p_values) == 2


def test_tabular_equals_alibi_tabulardrift_when_no_expected_count_is_small():
    from alibi_detect.cd import TabularDrift

    from kompressor.api.spec import CategoricalFeature

    rng = np.random.default_rng(14)
    x_ref, x = rng.normal(size=(800, 5)).astype(np.float32), rng.normal(size=(200, 5)).astype(np.float32)
    x[:, 3] += 0.3
    for data in (x_ref, x):
        data[:, :2] = np.clip(np.round(data[:, :2]), -1, 1) + 1
    spec = DriftSpec(detector="tabular", window_size=200,
                     categorical_features=[CategoricalFeature(feature=f, categories=3) for f in range(2)])
    ours = build_detector(spec, x_ref).check(x)
    alibi = TabularDrift(x_ref, p_val=0.05, categories_per_feature={0: 3, 1: 3}).predict(x)["data"]
    np.testing.assert_allclose(np.asarray(ours.feature_p_values, np.float32), alibi["p_val"], rtol=1e-6)
    assert ours.is_drift == bool(alibi["is_drift"])


def test_mmd_batched_permutation_test_equals_alibi_mmddrift():
    """Same permutations, same kernel: the batched permutation test gives Alibi's MMDDrift's p-values and
    distances, window after window."""
    from alibi_detect.cd import MMDDrift

    from kompressor_jobs.drift.detectors import PERMUTATIONS, _seed

    rng = np.random.default_rng(15)
    x_ref = rng.normal(size=(300, 4)).astype(np.float32)
    ours = build_detector(DriftSpec(detector="mmd", window_size=100), x_ref)
    alibi = MMDDrift(x_ref, backend="pytorch", p_val=0.05, n_permutations=PERMUTATIONS, device="cpu")
    p_values = []
    for shift in (0.0, 0.0, 0.1, 0.2, 0.0, 0.5):
        x = (rng.normal(size=(100, 4)) + shift).astype(np.float32)
        got = ours.test(x)
        _seed()  # ours seeds before every test
        want = alibi.predict(x)["data"]
        assert got.p_value == pytest.approx(float(want["p_val"]), abs=1e-9)
        assert got.distance == pytest.approx(float(want["distance"]), rel=1e-5)
        assert got.is_drift == bool(want["is_drift"])
        p_values.append(got.p_value)
    assert len(set(p_values)) > 2  # not all 0 or 1: the permutation test's ranks are compared
