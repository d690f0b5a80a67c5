"""Alibi Detect detectors behind one small interface of ours.

``build_detector(drift_spec, x_ref)`` returns a ``Detector``: ``check(rows) -> Check`` tests rows
(window mode: the newest ``windowSize`` of them; ``test(window)`` exactly the rows of one window, as the
watcher consumes the capture; online mode: fed one at a time) and
``save_state(folder)`` / ``load_state(folder)`` persist what an online detector has seen.
Every detector answers in the same ``Check`` shape.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kompressor.api.spec import DriftSpec
from kompressor.errors import UserError

SEED = 0
# MMD and LSDD on wider inputs first project to this many dimensions (fixed-seed Gaussian random
# projection, one of the dimensionality reductions Alibi Detect documents for high-dimensional data).
PROJECT_ABOVE = 64
PROJECTED_DIMS = 32
PERMUTATIONS = 100  # permutation-test size of the window-mode MMD and LSDD
# The fewest rows a window-mode test is run on (the API's smallest windowSize): a partial window tested for
# its age (spec.drift.maxWindowAgeSeconds) with fewer rows is Inconclusive.
MIN_WINDOW_ROWS = 10


@dataclass
class Check:
    """What one check found. ``p_value`` is the smallest feature-wise p-value after the multiple-testing
    correction (or the multivariate test's p-value) and is compared with ``threshold``; online detectors
    compare the ``distance`` (their test statistic) with a distance ``threshold`` instead.
    ``feature_p_values`` are in the order of the features the test looked at."""

    outcome: str  # Drift, NoDrift or Inconclusive
    samples: int
    p_value: float | None = None
    distance: float | None = None
    threshold: float | None = None
    feature_p_values: list[float] | None = None

    @property
    def is_drift(self) -> bool:
        return self.outcome == "Drift"


class RandomProjection:
    """x -> x @ W with W ~ N(0, 1/k), seeded: the same projection for reference and live rows."""

    def __init__(self, n_in: int, n_out: int = PROJECTED_DIMS, seed: int = SEED):
        rng = np.random.default_rng(seed)
        self.weights = (rng.standard_normal((n_in, n_out)) / math.sqrt(n_out)).astype(np.float32)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(x, dtype=np.float32).reshape(len(x), -1) @ self.weights


class ColumnSelect:
    """Keeps only the listed columns (chisquare on the declared categorical features)."""

    def __init__(self, columns: list[int]):
        self.columns = list(columns)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(x).reshape(len(x), -1)[:, self.columns]


def _seed() -> None:
    import torch

    np.random.seed(SEED)
    torch.manual_seed(SEED)


def _corrected_min_p(p: np.ndarray, correction: str) -> float:
    """Smallest adjusted p-value: Bonferroni (n * p) or Benjamini-Hochberg (min over i of n * p_(i) / i).
    ``adjusted < p_val`` exactly when Alibi Detect's corrected test flags drift."""
    n = len(p)
    if correction == "fdr":
        ranked = np.sort(p)
        return float(min(1.0, np.min(ranked * n / np.arange(1, n + 1))))
    return float(min(1.0, np.min(p) * n))


class Detector:
    name: str
    rows_needed: int

    def check(self, rows: np.ndarray) -> Check:  # pragma: no cover - interface
        raise NotImplementedError

    def save_state(self, folder: str | Path) -> None:
        """Window detectors keep no state between checks."""

    def load_state(self, folder: str | Path) -> bool:
        return False


class WindowDetector(Detector):
    """Tests the newest ``window_size`` rows against the reference with an Alibi batch detector."""

    def __init__(self, name: str, alibi, window_size: int, p_val: float, correction: str, univariate: bool):
        self.name, self._cd, self.rows_needed = name, alibi, window_size
        self._p_val, self._correction, self._univariate = p_val, correction, univariate

    def check(self, rows: np.ndarray) -> Check:
        """Tests the newest ``window_size`` of ``rows`` (Inconclusive when fewer)."""
        n = 0 if rows is None else len(rows)
        if n < self.rows_needed:
            return Check("Inconclusive", samples=n)
        return self.test(rows[-self.rows_needed:])

    def test(self, window: np.ndarray) -> Check:
        """Tests exactly these rows: a full window, or a partial one (``maxWindowAgeSeconds``), which is
        Inconclusive below ``MIN_WINDOW_ROWS``."""
        if window is None or len(window) < MIN_WINDOW_ROWS:
            return Check("Inconclusive", samples=0 if window is None else len(window))
        _seed()
        data = self._cd.predict(window, return_p_val=True, return_distance=True)["data"]
        outcome = "Drift" if int(data["is_drift"]) else "NoDrift"
        if self._univariate:
            p = np.atleast_1d(np.asarray(data["p_val"], dtype=np.float64))
            dist = np.atleast_1d(np.asarray(data["distance"], dtype=np.float64))
            return Check(outcome, samples=len(window), p_value=_corrected_min_p(p, self._correction),
                         distance=float(np.max(dist)), threshold=self._p_val,
                         feature_p_values=[float(v) for v in p])
        return Check(outcome, samples=len(window), p_value=float(data["p_val"]), distance=float(data["distance"]),
                     threshold=self._p_val)


class OnlineDetector(Detector):
    """Feeds rows one at a time to an Alibi online detector; the verdict is the one after the newest row
    (is the current window of ``window_size`` rows drifting?). Inconclusive until a full window was seen.
    ``samples`` counts every row fed since the stream (re)started, across restarts."""

    def __init__(self, name: str, alibi, window_size: int):
        self.name, self._cd, self.rows_needed = name, alibi, window_size
        self._last: dict | None = None

    @property
    def t(self) -> int:
        return int(self._cd.t)

    def check(self, rows: np.ndarray) -> Check:
        for row in ([] if rows is None else rows):
            self._last = self._cd.predict(row, return_test_stat=True)["data"]
        if self._last is None or self.t < self.rows_needed:
            return Check("Inconclusive", samples=self.t)
        stat = np.asarray(self._last["test_stat"], dtype=np.float64)
        threshold = np.asarray(self._last["threshold"], dtype=np.float64)
        # CVM online gives one statistic per feature (and per window size): report the worst margin
        margin = stat - threshold.reshape(threshold.shape + (1,) * (stat.ndim - threshold.ndim))
        worst = np.unravel_index(np.argmax(margin), margin.shape)
        threshold_at = threshold.reshape(-1)[worst[0]] if threshold.ndim else float(threshold)
        return Check("Drift" if int(self._last["is_drift"]) else "NoDrift", samples=self.t,
                     distance=float(stat[worst]), threshold=float(threshold_at))

    def reset_state(self) -> None:
        """Start a new stream (the calibration is kept)."""
        self._cd.reset_state()
        self._last = None

    def save_state(self, folder: str | Path) -> None:
        self._cd.save_state(str(folder))

    def load_state(self, folder: str | Path) -> bool:
        if not Path(folder).is_dir() or not any(Path(folder).iterdir()):
            return False
        self._cd.load_state(str(folder))
        return True


def _ks_two_sided(sorted_ref: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """scipy's two-sided asymptotic ``ks_2samp`` for every column at once: the same statistic (empirical CDFs
    via searchsorted) and the same p-value (``kstwo.sf(d, round(n1 n2 / (n1 + n2)))``), given the reference
    columns sorted once. Returns (p-values, statistics) as float32, like Alibi's ``feature_score``."""
    from scipy.stats import kstwo

    xs = np.sort(x, axis=0)
    n1, n2 = len(sorted_ref), len(xs)
    dist = np.empty(sorted_ref.shape[1])
    for f in range(sorted_ref.shape[1]):
        pooled = np.concatenate([sorted_ref[:, f], xs[:, f]])
        diff = (np.searchsorted(sorted_ref[:, f], pooled, side="right") / n1
                - np.searchsorted(xs[:, f], pooled, side="right") / n2)
        dist[f] = max(diff.max(), min(max(-diff.min(), 0.0), 1.0))
    m, n = sorted([float(n1), float(n2)], reverse=True)
    p_val = np.clip(kstwo.sf(dist, np.round(m * n / (m + n))), 0, 1)
    return p_val.astype(np.float32), dist.astype(np.float32)


def _vectorised_ks():
    """Alibi's KSDrift (thresholds, corrections, output) with a faster ``feature_score``: ``_ks_two_sided``,
    with the reference sorted once instead of per call. scipy's per-call overhead made the plain loop miss
    the throughput target; tests/drift checks the numbers equal alibi's KSDrift's."""
    from alibi_detect.cd import KSDrift

    class VectorisedKSDrift(KSDrift):
        _sorted_ref: tuple | None = None

        def feature_score(self, x_ref: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            if self.alternative != "two-sided":
                return super().feature_score(x_ref, x)
            if self._sorted_ref is None or self._sorted_ref[0] is not x_ref:
                self._sorted_ref = (x_ref, np.sort(x_ref.reshape(x_ref.shape[0], -1), axis=0))
            return _ks_two_sided(self._sorted_ref[1], x.reshape(x.shape[0], -1))

    return VectorisedKSDrift


# Cochran's rule for the chi-square test: expected counts below 5 make its asymptotic p-values liberal.
MIN_EXPECTED_COUNT = 5.0


def pooled_chi_square(ref_counts: np.ndarray, counts: np.ndarray,
                      min_expected: float = MIN_EXPECTED_COUNT) -> tuple[float, float]:
    """(statistic, p-value) of the chi-square test of homogeneity of two samples' category counts, with
    the cells whose expected count (in the smaller sample, from the pooled counts) is below ``min_expected``
    pooled into one cell, and that cell, if it is itself still below ``min_expected``, added to the smallest
    other cell (Cochran's rule). Cells empty in both samples are dropped. Where nothing is pooled,
    this is scipy's ``chi2_contingency`` (Yates' correction at one degree of freedom), as Alibi Detect runs
    it. Fewer than two cells left: nothing to test (0, 1). The pooling looks only at the pooled counts,
    so a rare category that surges in the window is no longer small and keeps its own cell."""
    from scipy.stats import chi2

    ref_counts, counts = np.asarray(ref_counts, np.float64), np.asarray(counts, np.float64)
    total = ref_counts + counts
    n_ref, n = ref_counts.sum(), counts.sum()
    if n_ref == 0 or n == 0:
        return 0.0, 1.0
    share = min(n_ref, n) / (n_ref + n)
    small = total * share < min_expected
    if small.any():
        keep = ~small
        rare_ref, rare = ref_counts[small].sum(), counts[small].sum()
        ref_counts, counts, total = ref_counts[keep], counts[keep], total[keep]
        if (rare_ref + rare) * share < min_expected and len(total):
            smallest = int(np.argmin(total))
            ref_counts[smallest] += rare_ref
            counts[smallest] += rare
        else:
            ref_counts, counts = np.append(ref_counts, rare_ref), np.append(counts, rare)
        total = ref_counts + counts
    present = total > 0
    ref_counts, counts, total = ref_counts[present], counts[present], total[present]
    if len(total) < 2:
        return 0.0, 1.0
    observed = np.stack([ref_counts, counts])
    expected = np.stack([total * n_ref, total * n]) / (n_ref + n)
    dof = len(total) - 1
    if dof == 1:  # Yates' continuity correction, as scipy's chi2_contingency applies it
        diff = expected - observed
        observed = observed + np.minimum(0.5, np.abs(diff)) * np.sign(diff)
    stat = float(((observed - expected) ** 2 / expected).sum())
    return stat, float(chi2.sf(stat, dof))


class _CategoryCounts:
    """Per-feature category counts of the reference (counted once) and of a window, over the union of the
    reference's categories and the window's values, as Alibi Detect's chi-square tests count them."""

    def __init__(self, x_ref: np.ndarray, categories: dict[int, list]):
        self.categories = {f: np.asarray(sorted(v), dtype=np.float64) for f, v in categories.items()}
        self.ref_counts = {f: self._count(x_ref[:, f], cats) for f, cats in self.categories.items()}

    @staticmethod
    def _count(column: np.ndarray, cats: np.ndarray) -> np.ndarray:
        at = np.searchsorted(cats, column)
        hit = (at < len(cats)) & (cats[np.minimum(at, len(cats) - 1)] == column)
        return np.bincount(at[hit], minlength=len(cats)).astype(np.float64)

    def test(self, f: int, column: np.ndarray) -> tuple[float, float]:
        cats, ref = self.categories[f], self.ref_counts[f]
        column = np.asarray(column, dtype=np.float64)
        new = np.setdiff1d(column, cats)  # values the reference never had: cells of their own
        counts = self._count(column, cats)
        if len(new):
            ref = np.append(ref, np.zeros(len(new)))
            counts = np.append(counts, [np.sum(column == v) for v in new])
        return pooled_chi_square(ref, counts)


def _pooled_chisquare_drift():
    """Alibi's ChiSquareDrift (categories, thresholds, corrections, output) whose per-feature test is
    ``pooled_chi_square``: Cochran's rule applied, the reference counted once."""
    from alibi_detect.cd import ChiSquareDrift

    class PooledChiSquareDrift(ChiSquareDrift):
        _counts: tuple | None = None

        def feature_score(self, x_ref: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            x_ref, x = x_ref.reshape(x_ref.shape[0], -1), x.reshape(x.shape[0], -1)
            if self._counts is None or self._counts[0] is not x_ref:
                self._counts = (x_ref, _CategoryCounts(x_ref, self.x_ref_categories))
            counts = self._counts[1]
            scores = [counts.test(f, x[:, f]) for f in range(self.n_features)]
            return (np.array([p for _, p in scores], dtype=np.float32),
                    np.array([d for d, _ in scores], dtype=np.float32))

    return PooledChiSquareDrift


def _pooled_tabular_drift():
    """Alibi's TabularDrift whose categorical features get ``pooled_chi_square`` (Cochran's rule) and whose
    continuous features get ``_ks_two_sided`` (the two-sided asymptotic ``ks_2samp`` Alibi runs)."""
    from alibi_detect.cd import TabularDrift

    class PooledTabularDrift(TabularDrift):
        _cached: tuple | None = None

        def feature_score(self, x_ref: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            if self.alternative != "two-sided":
                return super().feature_score(x_ref, x)
            x_ref, x = x_ref.reshape(x_ref.shape[0], -1), x.reshape(x.shape[0], -1)
            continuous = [f for f in range(self.n_features) if f not in self.cat_vars]
            if self._cached is None or self._cached[0] is not x_ref:
                self._cached = (x_ref, _CategoryCounts(x_ref, {f: self.x_ref_categories[f] for f in self.cat_vars}),
                                np.sort(x_ref[:, continuous], axis=0))
            _, counts, sorted_ref = self._cached
            p_val = np.zeros(self.n_features, dtype=np.float32)
            dist = np.zeros_like(p_val)
            for f in self.cat_vars:
                dist[f], p_val[f] = counts.test(f, x[:, f])
            if continuous:
                p_val[continuous], dist[continuous] = _ks_two_sided(sorted_ref, x[:, continuous])
            return p_val, dist

    return PooledTabularDrift


def _batched_permutation_mmd():
    """Alibi's PyTorch MMDDrift with its permutation test batched. A permutation's MMD² needs the sums of
    the kernel matrix K over its x-block, y-block and xy-block; with s the 0/1 indicator of the rows a
    permutation puts in the test block, those are s'Ks, s'K1 - s'Ks and 1'K1 - 2 s'K1 + s'Ks. One matrix
    product K S' gives them for every permutation, instead of Alibi's re-indexing of the whole matrix per
    permutation. Same kernel, same permutations (``torch.randperm`` drawn in the same order, its last n
    indices the test block, as Alibi's ``K[idx][:, idx]`` has it), same p-value and threshold;
    tests/drift checks them against Alibi's ``MMDDrift``."""
    from alibi_detect.cd.pytorch.mmd import MMDDriftTorch
    from alibi_detect.utils.pytorch.distance import mmd2_from_kernel_matrix

    class BatchedMMDDrift(MMDDriftTorch):
        def score(self, x):
            import torch

            x_ref, x = self.preprocess(x)
            x_ref = torch.from_numpy(x_ref).to(self.device)
            x = torch.from_numpy(x).to(self.device)
            n = x.shape[0]
            kernel_mat = self.kernel_matrix(x_ref, x)
            kernel_mat.fill_diagonal_(0)  # a fresh matrix (torch.cat): Alibi's K - diag(K)
            mmd2 = mmd2_from_kernel_matrix(kernel_mat, n, permute=False, zero_diag=False)
            size = kernel_mat.shape[0]
            tests = torch.stack([torch.randperm(size)[-n:] for _ in range(self.n_permutations)])
            indicator = torch.zeros(self.n_permutations, size, dtype=kernel_mat.dtype).scatter_(1, tests, 1.0)
            ks = indicator @ kernel_mat  # [permutations, rows]: s'K
            yy = (ks * indicator).sum(1).double()
            row = ks.sum(1).double()
            xy, xx = row - yy, kernel_mat.sum(dtype=torch.float64) - 2 * row + yy
            m = size - n
            mmd2_permuted = (xx / (m * (m - 1)) + yy / (n * (n - 1)) - 2 * xy / (m * n)).float()
            p_val = (mmd2 <= mmd2_permuted).float().mean()
            idx_threshold = int(self.p_val * len(mmd2_permuted))
            distance_threshold = torch.sort(mmd2_permuted, descending=True).values[idx_threshold]
            return p_val.numpy().item(), mmd2.numpy().item(), distance_threshold.numpy().item()

    return BatchedMMDDrift


def build_detector(spec: DriftSpec, x_ref: np.ndarray) -> Detector:
    """The Alibi Detect detector ``spec`` describes, fitted on ``x_ref`` (any shape; flattened here)."""
    from alibi_detect import cd

    x_ref = np.ascontiguousarray(np.asarray(x_ref, dtype=np.float32).reshape(len(x_ref), -1))
    n_features = x_ref.shape[1]
    categorical = {c.feature: c.categories for c in spec.categorical_features}
    bad = [f for f in categorical if f >= n_features]
    if bad:
        raise UserError(f"spec.drift.categoricalFeatures: feature(s) {bad} do not exist; inputs have "
                        f"{n_features} features")
    window = spec.window_size
    name = spec.detector
    _seed()
    projection = RandomProjection(n_features) if n_features > PROJECT_ABOVE else None
    # Cramer-von Mises assumes continuous data (ties wreck its p-values): declared categorical
    # features are left out of it; tabular is the detector for mixed data.
    continuous = ColumnSelect([f for f in range(n_features) if f not in categorical]) if categorical else None
    if name == "cvm" and continuous is not None and not continuous.columns:
        raise UserError("spec.drift: cvm needs at least one feature that is not categorical")
    if spec.mode == "online":
        if name not in ("mmd", "lsdd", "cvm"):
            raise UserError(f"spec.drift: detector {name} has no online mode (online: mmd, lsdd, cvm)")
        if len(x_ref) <= window:
            raise UserError(f"online {name} needs more reference rows ({len(x_ref)}) than windowSize ({window})")
        if name == "cvm":
            beta = 1 - (1 - 1 / spec.ert) ** (1 / (len(continuous.columns) if continuous else n_features))
            # enough simulated streams to estimate the per-feature (1 - beta)-quantile
            alibi = cd.CVMDriftOnline(x_ref, ert=spec.ert, window_sizes=[window], verbose=False,
                                      preprocess_fn=continuous, n_bootstraps=max(10000, math.ceil(2 / beta)))
        else:
            cls = cd.MMDDriftOnline if name == "mmd" else cd.LSDDDriftOnline
            alibi = cls(x_ref, ert=spec.ert, window_size=window, backend="pytorch", preprocess_fn=projection,
                        verbose=False, device="cpu")
        return OnlineDetector(name, alibi, window)
    p_val, correction = spec.p_value, spec.correction
    if name == "ks":
        alibi = _vectorised_ks()(x_ref, p_val=p_val, correction=correction)
    elif name == "cvm":
        alibi = cd.CVMDrift(x_ref, p_val=p_val, correction=correction, preprocess_fn=continuous)
    elif name == "chisquare":
        chisquare = _pooled_chisquare_drift()
        if categorical:
            columns = sorted(categorical)
            alibi = chisquare(x_ref, p_val=p_val, correction=correction, preprocess_fn=ColumnSelect(columns),
                              categories_per_feature={i: categorical[f] for i, f in enumerate(columns)})
        else:  # every feature categorical; categories taken from the reference data
            alibi = chisquare(x_ref, p_val=p_val, correction=correction)
    elif name == "tabular":
        alibi = _pooled_tabular_drift()(x_ref, p_val=p_val, correction=correction,
                                        categories_per_feature=categorical or None)
    elif name == "mmd":
        from alibi_detect.utils.pytorch.kernels import GaussianRBF

        alibi = _batched_permutation_mmd()(x_ref, p_val=p_val, preprocess_fn=projection, kernel=GaussianRBF,
                                           n_permutations=PERMUTATIONS, device="cpu")
        return WindowDetector(name, alibi, window, p_val, correction, univariate=False)
    elif name == "lsdd":
        alibi = cd.LSDDDrift(x_ref, backend="pytorch", p_val=p_val, preprocess_fn=projection,
                             n_permutations=PERMUTATIONS, device="cpu")
        return WindowDetector(name, alibi, window, p_val, correction, univariate=False)
    else:
        raise UserError(f"spec.drift.detector: unknown detector {name!r}")
    return WindowDetector(name, alibi, window, p_val, correction, univariate=True)
