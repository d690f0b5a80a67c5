"""Drift-watcher benchmark: throughput per detector and detection power, on 32 features.

    python bench/drift.py                 # tables on stdout
    python bench/drift.py --write-docs    # also rewrite docs/benchmarks/drift.md (every figure in it)
    python bench/drift.py --scale 0.05    # a smoke run: a twentieth of the windows and runs (not for the doc)

Throughput: rows per second through our detector interface (``Detector.check``), window mode on
windows of 1,000 rows against 1,000 reference rows; online detectors fed one row at a time (their
calibration time is reported separately). Also the rate at which captured rows are read back.

Power: a 0.5σ mean shift on a quarter of the features (8 of 32). Window mode: the fraction of shifted
windows flagged, next to the false-alarm rate on unshifted windows, at p = 0.05. Online mode: the rows
until the first false alarm on unshifted data (to compare with the ERT) and the rows until the shift is flagged.

Confirmation (what acts: ``consecutiveWindows: 2`` over disjoint windows, as the watcher consumes the
capture): the false-confirmation rate per window on clean data from the reference's distribution, with its
95 % Wilson interval, against the target p² (two false alarms in a row on independent traffic); and the
detection delay in rows: how many shifted rows were served before the drift was confirmed, when the shift
starts at a random row (so the first shifted window is usually mixed with clean rows). Beside it, the
per-window false-alarm rate with a fresh reference sample for every window (the test's own calibration, not
one reference sample's luck), and chi-square on rare categories: Alibi's ``ChiSquareDrift`` against ours
(Cochran's rule), each window with a fresh reference.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("KOMPRESSOR_JSON_LOGS", "1")
warnings.filterwarnings("ignore")

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "benchmarks" / "drift.md"
FEATURES = 32
SHIFTED = FEATURES // 4
SHIFT = 0.5
KS_TARGET = 100_000  # rows/s
WINDOW_DETECTORS = ("ks", "cvm", "chisquare", "tabular", "mmd", "lsdd")
ONLINE_DETECTORS = ("cvm", "mmd", "lsdd")
CATEGORIES = 5  # chisquare/tabular: features quantised to 5 levels (round, clip to ±2)


NOTES = """
## Notes

- The machine was loaded: 2 cores shared with other jobs during the whole run (the load averages are in the
  header). Speeds are lower bounds; the ratios in one table (ours against Alibi's own KS loop, timed
  alternately check by check) are the comparable figures.
- KS runs Alibi Detect's `KSDrift` with its per-feature loop of scipy calls replaced by one vectorised pass
  (same statistic, same `kstwo` p-value; `tests/drift/test_detectors.py` checks the p-values equal
  `KSDrift`'s bit for bit). Alibi's own loop is measured beside it in the same run (the throughput table).
  Tabular's continuous features use the same pass.
- Chi-square (and tabular's categorical features) run Alibi's `ChiSquareDrift` / `TabularDrift` with the
  reference counted once and Cochran's rule: categories whose expected count (in the smaller sample, from the
  pooled counts) is below 5 are pooled into one cell before the test, and cells empty in both samples are
  dropped (Alibi raises on them). Where no cell is small the p-values are Alibi's own (tested). Small
  expected counts make the asymptotic chi-square p-values liberal: the rare-categories table shows it.
- MMD runs Alibi's PyTorch `MMDDrift` with its permutation test batched: every permutation's MMD² from one
  product of the kernel matrix with the permutations' 0/1 test-block indicators, instead of re-indexing the
  whole kernel matrix per permutation; the same permutations are drawn, and the p-values equal Alibi's
  (tested). 100 permutations per window (`PERMUTATIONS` in `detectors.py`), the watcher's setting.
- Window throughput grows with the window (the reference is sorted or counted once); 1,000-row windows are
  the table's convention. Alibi's CVM assumes continuous data: declared categorical features are left out
  of it (ties wreck its p-values).
- Online detectors calibrate their thresholds by simulation every time the watcher starts (the calibration
  column); `--state` resumes the stream (Alibi's `save_state`), not the calibration. CVM online uses
  `n_bootstraps >= 2 / beta` (beta = the per-feature false-alarm rate Alibi targets): Alibi's default of
  10,000 simulated streams is too few to estimate that quantile on wide inputs.
- The watcher's cost per check is the detector's plus reading the rows back from the capture folder
  (capture read-back row).
- Confirmations: over disjoint windows of independent traffic, a false confirmation needs two false alarms in
  a row, so with one reference its rate is the square of the detector's false-alarm rate *given that
  reference*. That conditional rate is not p: a reference is a sample, and the further its category
  shares or quantiles lie from the population's, the more (or fewer) windows alarm. With 1,000 reference
  rows against 200-row windows that spread is wide, so one fixed reference (the confirmation table, seeded)
  can sit above or below p whichever test is calibrated; the fresh-reference column is the rate averaged
  over references, which is what the test's p-value promises. A larger reference narrows the spread.
  `tests/drift/test_drift_windows.py` checks the KS confirmation rate against p² through the watcher.
- Rows to confirm can be below 2 × windowSize: when the shift starts inside a window, that mixed window may
  already drift, and the rows counted are the shifted ones only.
"""


# The confirmation table runs thousands of windows per detector (so that the false-confirmation rate's interval
# is narrower than p^2): on 8 features, 2 of them shifted, to keep the per-window cost low.
CONFIRM_FEATURES = 8
CONFIRM_SHIFTED = 2
# Clean windows per detector for the false-confirmation rate: a 95 % Wilson interval narrower than p^2 = 0.0025
# needs about 2.5e6 x rate windows (6,200 at a rate of p^2, 8,000 at 0.0032).
CONFIRM_WINDOWS = {"ks": 10000, "chisquare": 10000, "cvm": 10000, "tabular": 10000, "lsdd": 8000, "mmd": 8000}
# Windows with a fresh reference each (the false-alarm rate averaged over references): building LSDD and MMD
# costs a kernel matrix on the reference each time, so they get fewer.
FRESH_WINDOWS = {"ks": 4000, "chisquare": 4000, "cvm": 4000, "tabular": 4000, "lsdd": 1000, "mmd": 1000}
RARE = (0.97, 0.01, 0.01, 0.005, 0.005)  # category shares of the rare-categories table
RARE_WINDOWS = 2000


def rows(rng: np.random.Generator, n: int, shifted: bool = False, features: int = FEATURES,
         shifted_features: int = SHIFTED) -> np.ndarray:
    x = rng.normal(size=(n, features)).astype(np.float32)
    if shifted:
        x[:, :shifted_features] += SHIFT
    return x


def as_input(detector: str, x: np.ndarray) -> np.ndarray:
    """chisquare tests categorical data: every feature quantised; tabular: the first 4 quantised."""
    if detector == "chisquare":
        return np.clip(np.round(x), -2, 2) + 2
    if detector == "tabular":
        x = x.copy()
        x[:, :4] = np.clip(np.round(x[:, :4]), -2, 2) + 2
    return x


def spec_for(detector: str, mode: str = "window", window: int = 1000, ert: int = 200, features: int = FEATURES):
    from kompressor.api.spec import CategoricalFeature, DriftSpec

    categorical = {"chisquare": range(features), "tabular": range(4)}.get(detector, ())
    return DriftSpec(detector=detector, mode=mode, window_size=window, ert=ert,
                     categorical_features=[CategoricalFeature(feature=f, categories=CATEGORIES) for f in categorical])


def throughput(detector: str, repeats: int) -> float:
    from kompressor_jobs.drift.detectors import build_detector

    rng = np.random.default_rng(0)
    det = build_detector(spec_for(detector), as_input(detector, rows(rng, 1000)))
    window = as_input(detector, rows(rng, 1000))
    det.check(window)  # warm-up
    started = time.perf_counter()
    for _ in range(repeats):
        det.check(window)
    return repeats * len(window) / (time.perf_counter() - started)


def paired_ks_throughput(repeats: int) -> tuple[float, float]:
    """(ours, Alibi's own KSDrift loop) rows/s on the same data, timed alternately check by check in one run, so
    load from other processes hits both alike."""
    from alibi_detect.cd import KSDrift

    from kompressor_jobs.drift.detectors import build_detector

    rng = np.random.default_rng(0)
    ref, window = rows(rng, 1000), rows(rng, 1000)
    ours, theirs = build_detector(spec_for("ks"), ref), KSDrift(ref, p_val=0.05, correction="bonferroni")
    ours.check(window), theirs.predict(window)  # warm-up
    spent = [0.0, 0.0]
    for _ in range(repeats):
        for i, call in enumerate((lambda: ours.check(window), lambda: theirs.predict(window))):
            began = time.perf_counter()
            call()
            spent[i] += time.perf_counter() - began
    return repeats * len(window) / spent[0], repeats * len(window) / spent[1]


def online_throughput(detector: str, n: int) -> tuple[float, float]:
    from kompressor_jobs.drift.detectors import build_detector

    rng = np.random.default_rng(0)
    started = time.perf_counter()
    det = build_detector(spec_for(detector, "online", window=50), rows(rng, 500))
    calibration = time.perf_counter() - started
    stream = rows(rng, n)
    started = time.perf_counter()
    det.check(stream)
    return n / (time.perf_counter() - started), calibration


def capture_read_rate(n_rows: int = 200_000) -> float:
    from kompressor_jobs.capture import CaptureWriter, read_newest

    with tempfile.TemporaryDirectory() as tmp:
        writer = CaptureWriter(tmp, 1 << 30)
        x = rows(np.random.default_rng(0), 100)
        for _ in range(n_rows // 100):
            writer.submit(x, revision=1)
        writer.close()
        started = time.perf_counter()
        got = read_newest(tmp, n_rows, revision=1)
        assert len(got) == n_rows
        return n_rows / (time.perf_counter() - started)


def window_power(detector: str, windows: int, window: int) -> tuple[float, float]:
    from kompressor_jobs.drift.detectors import build_detector

    rng = np.random.default_rng(1)
    det = build_detector(spec_for(detector, window=window), as_input(detector, rows(rng, 1000)))
    calm = sum(det.check(as_input(detector, rows(rng, window))).is_drift for _ in range(windows))
    shifted = sum(det.check(as_input(detector, rows(rng, window, shifted=True))).is_drift for _ in range(windows))
    return shifted / windows, calm / windows


def online_power(detector: str, runs: int, max_rows: int = 2000, window: int = 50) -> tuple[float, int, float]:
    """(mean rows until the first false alarm on unshifted data -- to compare with the ERT --, how many
    runs saw none within ``max_rows``, mean rows after the shift until it is flagged)."""
    from kompressor_jobs.drift.detectors import build_detector

    rng = np.random.default_rng(2)
    det = build_detector(spec_for(detector, "online", window=window), rows(rng, 500))

    def run_length(shifted: bool) -> int | None:
        det.reset_state()
        if shifted:  # the shift starts once a full window of normal traffic has been seen
            for row in rows(rng, window):
                det.check(row[None])
        for t, row in enumerate(rows(rng, max_rows, shifted=shifted), start=1):
            if det.check(row[None]).is_drift:
                return t
        return None

    calm = [run_length(False) for _ in range(runs)]
    delays = [run_length(True) for _ in range(runs)]
    seen = [c if c is not None else max_rows for c in calm]
    return float(np.mean(seen)), sum(c is None for c in calm), float(np.mean([d or max_rows for d in delays]))


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval of a binomial rate k/n."""
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * (p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5 / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def false_confirmations(detector: str, windows: int, window: int, consecutive: int = 2) -> dict:
    """Disjoint clean windows in a row, counted as the watcher counts them (``Watcher.verdict``): a
    confirmation is a window whose drifting run reaches ``consecutive``."""
    from kompressor_jobs.drift.detectors import build_detector

    rng = np.random.default_rng(3)
    det = build_detector(spec_for(detector, window=window, features=CONFIRM_FEATURES),
                         as_input(detector, rows(rng, 1000, features=CONFIRM_FEATURES)))
    run = alarms = confirmations = 0
    started = time.perf_counter()
    for _ in range(windows):
        drift = det.test(as_input(detector, rows(rng, window, features=CONFIRM_FEATURES))).is_drift
        alarms += drift
        run = run + 1 if drift else 0
        confirmations += run == consecutive
    low, high = wilson(confirmations, windows)
    return {"windows": windows, "alarms": alarms / windows, "confirmations": confirmations,
            "rate": confirmations / windows, "low": low, "high": high, "seconds": time.perf_counter() - started}


def detection_delay(detector: str, runs: int, window: int, consecutive: int = 2, max_windows: int = 50) -> dict:
    """Rows of shifted traffic served until the drift is confirmed. Each run: a clean stream whose shift starts
    at a random row within a window, consumed in disjoint windows. From a window boundary the least possible is
    consecutive x window; a mixed first window that already drifts makes it less."""
    from kompressor_jobs.drift.detectors import build_detector

    rng = np.random.default_rng(4)
    f = CONFIRM_FEATURES
    det = build_detector(spec_for(detector, window=window, features=f), as_input(detector, rows(rng, 1000, features=f)))
    delays, missed = [], 0
    for _ in range(runs):
        clean = int(rng.integers(0, window)) + window  # one clean window, then the shift starts mid-window
        stream = np.concatenate([rows(rng, clean, features=f),
                                 rows(rng, max_windows * window, shifted=True, features=f,
                                      shifted_features=CONFIRM_SHIFTED)])
        run, confirmed = 0, None
        for start in range(0, len(stream) - window + 1, window):
            run = run + 1 if det.test(as_input(detector, stream[start:start + window])).is_drift else 0
            if run >= consecutive:
                confirmed = start + window - clean
                break
        if confirmed is None:
            missed += 1
        else:
            delays.append(confirmed)
    return {"runs": runs, "mean": float(np.mean(delays)) if delays else None,
            "median": float(np.median(delays)) if delays else None, "max": max(delays) if delays else None,
            "missed": missed, "floor": consecutive * window}


def fresh_reference_alarms(detector: str, windows: int, window: int) -> dict:
    """Per-window false-alarm rate on clean data with a fresh reference sample (1,000 rows) for every window:
    the rate averaged over references, which is what the test's p-value promises."""
    from kompressor_jobs.drift.detectors import build_detector

    rng = np.random.default_rng(5)
    f = CONFIRM_FEATURES
    spec = spec_for(detector, window=window, features=f)
    alarms = sum(build_detector(spec, as_input(detector, rows(rng, 1000, features=f)))
                 .test(as_input(detector, rows(rng, window, features=f))).is_drift for _ in range(windows))
    low, high = wilson(alarms, windows)
    return {"windows": windows, "rate": alarms / windows, "low": low, "high": high}


def rare_categories(windows: int, window: int, features: int = CONFIRM_FEATURES) -> dict:
    """Chi-square on categories with small expected counts (shares ``RARE``), every window with a fresh
    reference: the false-alarm rate of Alibi's own ``ChiSquareDrift`` (plain asymptotic test per feature; it
    raises when a declared category is in neither sample: counted as no alarm, and counted) against ours."""
    from alibi_detect.cd import ChiSquareDrift

    from kompressor.api.spec import CategoricalFeature, DriftSpec
    from kompressor_jobs.drift.detectors import build_detector

    rng = np.random.default_rng(6)
    k = len(RARE)
    spec = DriftSpec(detector="chisquare", window_size=window,
                     categorical_features=[CategoricalFeature(feature=i, categories=k) for i in range(features)])
    ours = alibi = errors = 0
    for _ in range(windows):
        ref = rng.choice(k, size=(1000, features), p=RARE).astype(np.float32)
        x = rng.choice(k, size=(window, features), p=RARE).astype(np.float32)
        ours += build_detector(spec, ref).test(x).is_drift
        try:
            alibi += int(ChiSquareDrift(ref, p_val=spec.p_value, categories_per_feature={i: k for i in range(features)})
                         .predict(x)["data"]["is_drift"])
        except ValueError:
            errors += 1
    return {"windows": windows, "ours": (ours, wilson(ours, windows)), "alibi": (alibi, wilson(alibi, windows)),
            "errors": errors, "expected": [window * share for share in RARE]}


def render_throughput(results: dict) -> list[str]:
    """The throughput section: our detectors, Alibi's own KS loop beside ours (timed alternately with our KS row),
    capture read-back."""
    lines = ["## Throughput", "", "| detector | mode | rows/s | calibration at start |", "| --- | --- | --- | --- |"]
    for name in WINDOW_DETECTORS:
        lines.append(f"| {name} | window (1,000 rows vs 1,000 reference rows) | {results['tp'][name]:,.0f} | – |")
    for name in ONLINE_DETECTORS:
        rate, calibration = results["online_tp"][name]
        lines.append(f"| {name} | online (window 50, ERT 200, 500 reference rows) | {rate:,.0f} | "
                     f"{calibration:.1f} s |")
    lines.append(f"| ks, Alibi Detect's own `KSDrift.predict` (its per-feature scipy loop), called directly, timed "
                 f"alternately with ours | window "
                 f"(1,000 rows vs 1,000 reference rows) | {results['alibi_ks']:,.0f} | – |")
    lines.append(f"| capture read-back | `read_newest` | {results['read']:,.0f} | – |")
    ks = results["tp"]["ks"]
    return lines + [
        "",
        f"Target: KS ≥ {KS_TARGET:,} rows/s: measured {ks:,.0f} rows/s, "
        f"{'met' if ks >= KS_TARGET else 'missed'} ({ks / results['alibi_ks']:.1f}× Alibi's own loop, "
        f"{results['alibi_ks']:,.0f} rows/s, in the same run).",
    ]


def render(results: dict, args) -> str:
    import alibi_detect

    load = results["load"]
    lines = [
        f"Measured by `python bench/drift.py --write-docs` in one run of {results['seconds']:.0f} s on "
        f"{platform.machine()}, {os.cpu_count()} CPUs **shared with other jobs: the machine was loaded** (load "
        f"average {load[0]:.1f} at the start, {load[1]:.1f} at the end), alibi-detect {alibi_detect.__version__}, "
        f"one thread. Every figure below comes from that run. Data: {FEATURES} standard-normal features; chisquare "
        f"sees every feature quantised to {CATEGORIES} levels, tabular the first 4 (categorical) and the rest "
        f"continuous. MMD and LSDD use the PyTorch backend on CPU with {results['permutations']} permutations.",
        "",
    ] + render_throughput(results) + [
        "",
        "## Detection power",
        "",
        f"A {SHIFT}σ mean shift on {SHIFTED} of {FEATURES} features. Window mode: windows of 200 and of 50 rows "
        f"against 1,000 reference rows, {args.windows} shifted and {args.windows} unshifted windows per detector and "
        "size, p = 0.05 (Bonferroni for the feature-wise tests).",
        "",
        "| detector | shifted flagged (200 rows) | false alarms (200 rows) | shifted flagged (50 rows) "
        "| false alarms (50 rows) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name in WINDOW_DETECTORS:
        power, false_alarms = results["power"][name]
        power50, false_alarms50 = results["power50"][name]
        lines.append(f"| {name} | {power:.1%} | {false_alarms:.1%} | {power50:.1%} | {false_alarms50:.1%} |")
    lines += [
        "",
        f"Online mode (window 50, ERT 200 rows, 500 reference rows, {args.runs} runs each; a run stops at its first "
        "alarm or after 2,000 rows; shifted runs start after one window of normal rows). The run length on "
        "unshifted data is what the ERT promises on average (200); for the shift, fewer rows is better:",
        "",
        "| detector | rows until a false alarm (mean; runs with none in 2,000) "
        "| rows after the shift until flagged (mean) |",
        "| --- | --- | --- |",
    ]
    for name in ONLINE_DETECTORS:
        run_length, clean, delay = results["online_power"][name]
        lines.append(f"| {name} | {run_length:.0f} ({clean} of {args.runs}) | {delay:.0f} |")
    return "\n".join(lines + ["", render_confirm(results, args)])


def at_most(rate: float, low: float, high: float, target: float) -> str:
    """Whether a measured rate is at most ``target``, and whether its 95 % interval says so on its own."""
    if high <= target:
        return "yes (whole interval below)"
    if low > target:
        return "no (whole interval above)"
    return f"{'yes' if rate <= target else 'no'} (interval spans the target)"


def render_confirm(results: dict, args) -> str:
    target = 0.05 ** 2
    window = args.confirm_window
    lines = [
        "## Confirmed drift: false confirmations and rows to confirm",
        "",
        f"What acts on a drift is a confirmation: `consecutiveWindows: 2` drifting windows in a row, each window "
        f"fresh, disjoint traffic (the watcher consumes the capture in windows, issue 15). Windows of "
        f"{window} rows against 1,000 reference rows, p = 0.05, on {CONFIRM_FEATURES} standard-normal features "
        "(chisquare: all quantised; tabular: the first 4). False confirmations: clean windows from the reference's "
        f"distribution, one after another, against one seeded reference; the target is at most p² = {target:g} per "
        "window, with the 95 % (Wilson) interval, narrower than the target where the column says so. Beside it, "
        "the false-alarm rate with a fresh reference for every window (see the notes). Rows to confirm: "
        f"{args.delay_runs} runs per detector (MMD and LSDD: {max(1, args.delay_runs // 2)}), the {SHIFT}σ shift on "
        f"{CONFIRM_SHIFTED} of {CONFIRM_FEATURES} features starting at a random row, so the first shifted window "
        f"is usually mixed (from a window boundary the least possible is 2 × {window} = {2 * window} rows).",
        "",
        "| detector | clean windows | false alarms per window | false confirmations per window (95 % interval) "
        "| interval narrower than p²? | at most p²? | false alarms per window, fresh reference each "
        "(95 % interval; windows) | shifted rows to confirm: mean (median, max) | runs not confirmed in "
        f"{50 * window:,} rows |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name in WINDOW_DETECTORS:
        fc, dl, fr = results["confirm"][name], results["delay"][name], results["fresh"][name]
        narrow = "yes" if fc["high"] - fc["low"] < target else "no: more windows needed"
        below = at_most(fc["rate"], fc["low"], fc["high"], target)
        delay = (f"{dl['mean']:.0f} ({dl['median']:.0f}, {dl['max']})" if dl["mean"] is not None else "–")
        lines.append(f"| {name} | {fc['windows']:,} | {fc['alarms']:.4f} | {fc['rate']:.5f} "
                     f"({fc['low']:.5f}–{fc['high']:.5f}) | {narrow} | {below} | {fr['rate']:.4f} "
                     f"({fr['low']:.4f}–{fr['high']:.4f}; {fr['windows']:,}) | {delay} | {dl['missed']} of {dl['runs']} |")
    for name in WINDOW_DETECTORS:
        fc, fr = results["confirm"][name], results["fresh"][name]
        if fc["rate"] > target:
            lines += ["", f"{name} misses p² on this reference: it alarms on {fc['alarms']:.4f} of the windows tested "
                      f"against it, while with a fresh reference for each window it alarms on {fr['rate']:.4f} "
                      f"({fr['low']:.4f}–{fr['high']:.4f}), "
                      f"{'at most' if fr['rate'] <= 0.05 else 'above'} p = 0.05, which points to this reference "
                      "sample rather than the test (see the notes)."]
    rare = results["rare"]
    (ours, (ours_low, ours_high)), (alibi, (alibi_low, alibi_high)) = rare["ours"], rare["alibi"]
    n = rare["windows"]
    raised = f"; it raised on {rare['errors']} windows (counted as no alarm)" if rare["errors"] else ""
    lines += [
        "",
        "### Chi-square on rare categories",
        "",
        f"{CONFIRM_FEATURES} categorical features, each with category shares {', '.join(f'{s:g}' for s in RARE)} "
        f"(expected counts in a {window}-row window: {', '.join(f'{e:g}' for e in rare['expected'])}); {n:,} clean "
        f"windows of {window} rows, each against a fresh 1,000-row reference, p = 0.05 with Bonferroni over the "
        "features.",
        "",
        "| chi-square | false alarms per window (95 % interval) | at most p? |",
        "| --- | --- | --- |",
        f"| Alibi Detect's `ChiSquareDrift` (asymptotic test on every cell) | {alibi / n:.4f} "
        f"({alibi_low:.4f}–{alibi_high:.4f}) | {at_most(alibi / n, alibi_low, alibi_high, 0.05)}{raised} |",
        f"| ours: Cochran's rule (cells expected below 5 pooled) | {ours / n:.4f} ({ours_low:.4f}–{ours_high:.4f}) "
        f"| {at_most(ours / n, ours_low, ours_high, 0.05)} |",
    ]
    return "\n".join(lines)


def timed(label: str, fn, *args, **kwargs):
    began = time.perf_counter()
    out = fn(*args, **kwargs)
    print(f"[{time.perf_counter() - began:6.1f} s] {label}: {out}", file=sys.stderr, flush=True)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=200, help="windows per detector for the power table")
    parser.add_argument("--runs", type=int, default=20, help="online runs per detector")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="scale the windows of the confirmation, fresh-reference and rare-category tables "
                             "(a smoke run; --write-docs needs 1)")
    parser.add_argument("--confirm-window", type=int, default=200, help="rows per window (confirmation table)")
    parser.add_argument("--delay-runs", type=int, default=200, help="runs per detector for rows to confirm")
    parser.add_argument("--write-docs", action="store_true")
    parser.add_argument("--results", type=Path, help="also save the raw results here (JSON)")
    parser.add_argument("--render-from", type=Path, help="render the tables from results saved by --results")
    args = parser.parse_args()
    if args.render_from:
        saved = json.loads(args.render_from.read_text())
        vars(args).update({k: v for k, v in saved.pop("args").items() if k != "write_docs"})
        return write(saved, args)
    if args.write_docs and args.scale != 1:
        parser.error("--write-docs writes the full run only (no --scale)")
    import torch

    from kompressor_jobs.drift.detectors import PERMUTATIONS

    torch.set_num_threads(1)
    started, load_start = time.perf_counter(), os.getloadavg()[0]
    scaled = lambda n: max(2, int(n * args.scale))  # noqa: E731
    window = args.confirm_window
    results = {"confirm": {}, "delay": {}, "fresh": {}, "permutations": PERMUTATIONS}
    for name in WINDOW_DETECTORS:
        results["confirm"][name] = timed(f"{name} false confirmations", false_confirmations, name,
                                         scaled(CONFIRM_WINDOWS[name]), window)
        results["fresh"][name] = timed(f"{name} fresh-reference alarms", fresh_reference_alarms, name,
                                       scaled(FRESH_WINDOWS[name]), window)
        runs = max(1, args.delay_runs // 2) if name in ("mmd", "lsdd") else args.delay_runs
        results["delay"][name] = timed(f"{name} rows to confirm", detection_delay, name,
                                       max(1, int(runs * min(1.0, args.scale * 4))), window)
    results["rare"] = timed("rare categories", rare_categories, scaled(RARE_WINDOWS), window)
    results["tp"] = {name: timed(f"{name} throughput", throughput, name, repeats=5 if name == "mmd" else 30)
                     for name in WINDOW_DETECTORS}
    results["tp"]["ks"], results["alibi_ks"] = timed("ks against Alibi's loop", paired_ks_throughput, repeats=30)
    results["online_tp"] = {name: timed(f"{name} online throughput", online_throughput, name, 1000)
                            for name in ONLINE_DETECTORS}
    results["read"] = timed("capture read-back", capture_read_rate)
    results["power"] = {name: timed(f"{name} power 200", window_power, name, args.windows, 200)
                        for name in WINDOW_DETECTORS}
    results["power50"] = {name: timed(f"{name} power 50", window_power, name, args.windows, 50)
                          for name in WINDOW_DETECTORS}
    results["online_power"] = {name: timed(f"{name} online power", online_power, name, args.runs)
                               for name in ONLINE_DETECTORS}
    results["seconds"], results["load"] = time.perf_counter() - started, (load_start, os.getloadavg()[0])
    if args.results:
        args.results.write_text(json.dumps({**results, "args": {k: v for k, v in vars(args).items()
                                                                if k not in ("results", "render_from")}}))
    return write(results, args)


def write(results: dict, args) -> int:
    text = render(results, args)
    print(text)
    if args.write_docs:
        DOC.parent.mkdir(parents=True, exist_ok=True)
        DOC.write_text("# Drift-watcher benchmark\n\nHow fast `kompressor watch-drift`'s detectors "
                       "(Alibi Detect behind our one `Detector` interface) test traffic, how well they catch a "
                       "small shift, and how often two windows in a row confirm a drift that is not there.\n\n"
                       + text + "\n" + NOTES)
    return 0


if __name__ == "__main__":
    sys.exit(main())
