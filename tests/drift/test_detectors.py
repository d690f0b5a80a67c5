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
