"""Accuracy-aware sparsity search, judged on the validation split (never on eval).

The search does not assume that accuracy falls steadily with sparsity (it does not: a pruned and
fine-tuned model is sometimes better at 95 % than at 90 %). It probes a coarse grid from the top
of the range downwards and stops at the first sparsity that passes every gate on validation:
every sparser grid point was tried and failed. The remaining probes refine the one cell between
that pass and the failed grid point above it. When nothing on the grid passes, the remaining
probes fill the widest untried gaps. Every probe's result is kept (``probes.json``); the kept
candidate is the sparsest probe that passed on validation, and the next ``maxAlternates`` passing
probes are kept as alternates (sparsest first), each a complete artifact folder (a full copy of the
model: the cap bounds the artifact's size), so the evaluate Job can confirm the choice on eval and
fall back to the next kept passing probe when eval disagrees. Passing probes beyond the cap are
listed in ``probes.json`` with no artifact.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from kompressor.api.report import Probe
from kompressor.api.spec import CompressionSpec, GatesSpec
from kompressor.api.status import Gates, Metrics
from kompressor.api.wire import to_wire
from kompressor.console import log, progress
from kompressor.store import MODEL_FILE

PROBES_FILE = "probes.json"
ALTERNATES_DIR = "alternates"  # passing probes other than the kept one: alternates/probe-<i>/ (artifact folders)


@dataclass
class ProbeRun:
    index: int
    sparsity: float
    candidate: Any  # compress.command.Candidate
    metrics: Metrics
    gates: Gates

    @property
    def passed(self) -> bool:
        return self.gates.passed


@dataclass
class SearchResult:
    chosen: Any  # the Candidate kept (the sparsest probe that passed on validation, else the least bad)
    runs: list[ProbeRun]
    summary: dict
    alternates: list[ProbeRun] = field(default_factory=list)  # passing probes kept as fallbacks, sparsest first
    dropped: list[ProbeRun] = field(default_factory=list)  # passing probes beyond maxAlternates: not kept

    @property
    def probes(self) -> list[Probe]:
        return [Probe(sparsity=r.sparsity, metrics=r.metrics, gates=r.gates) for r in self.runs]


def plan_grid(lo: float, hi: float, max_probes: int) -> list[float]:
    """The coarse grid, evenly spaced from the top of the range down to its bottom: the probe budget less two
    (at least the two ends), the two kept to refine the cell above the grid's first pass."""
    if max_probes <= 1 or hi - lo < 1e-4:
        return [round(hi, 4)]
    size = max(2, max_probes - 2)
    step = (hi - lo) / (size - 1)
    return [round(hi - i * step, 4) for i in range(size)]


def next_probe(lo: float, hi: float, results: list[tuple[float, bool]]) -> float | None:
    """The next sparsity to try after the grid, given every (sparsity, passed) so far; None when nothing new
    is left to learn."""
    tried = sorted({s for s, _ in results})
    passing = [s for s, ok in results if ok]
    if passing:
        best = max(passing)
        above = [s for s in tried if s > best]
        if not above:
            return None  # the top of the range passes
        candidate = round((best + min(above)) / 2, 4)
    else:  # nothing passed yet: the middle of the widest untried gap (the ends are on the grid)
        points = sorted(set(tried) | {round(lo, 4), round(hi, 4)})
        gaps = [(b - a, a, b) for a, b in zip(points, points[1:])]
        if not gaps:
            return None
        _, a, b = max(gaps)
        candidate = round((a + b) / 2, 4)
    if any(abs(candidate - s) < 1e-4 for s in tried):
        return None  # the interval is as narrow as the rounding allows
    return candidate


def explore(lo: float, hi: float, max_probes: int, passes: Callable[[float], bool]) -> list[tuple[float, bool]]:
    """The probing strategy alone: calls ``passes(sparsity)`` at most ``max_probes`` times, never twice for one
    sparsity, and returns every (sparsity, passed) in the order tried. The grid runs from the top down and stops
    at its first pass; the rest of the budget refines above that pass (or fills the widest gaps when nothing on
    the grid passed)."""
    tried: list[tuple[float, bool]] = []
    for sparsity in plan_grid(lo, hi, max_probes):
        if len(tried) >= max_probes:
            break
        tried.append((sparsity, passes(sparsity)))
        if tried[-1][1]:
            break  # every sparser grid point failed: refine between this one and the failed one above
    while len(tried) < max_probes:
        sparsity = next_probe(lo, hi, tried)
        if sparsity is None:
            break
        tried.append((sparsity, passes(sparsity)))
    return tried


def search(ctx, config: CompressionSpec, gates: GatesSpec, work: Path,
           compress: Callable[[Any, CompressionSpec, float, Path], Any], validation) -> SearchResult:
    """Probe sparsities with ``compress(ctx, config, sparsity, folder)``; judge each on ``validation``."""
    from kompressor_jobs.evaluate.gates import check_gates
    from kompressor_jobs.evaluate.metrics import QUICK, measure, measure_reference

    s = config.search
    task = ctx.resource.spec.model.task
    lo, hi = min(s.min_sparsity, s.max_sparsity), max(s.min_sparsity, s.max_sparsity)
    # once, reused by every probe: its metrics and outputs (fidelity gates compare each probe's with them)
    reference = measure_reference(ctx.baseline_dir / MODEL_FILE, validation, timing=QUICK, task=task)
    baseline = reference.metrics
    runs: list[ProbeRun] = []

    def probe(sparsity: float) -> ProbeRun:
        i = len(runs)
        candidate = compress(ctx, config, sparsity, work / f"probe-{i}")
        facts = getattr(candidate, "facts", None) or {}
        metrics = measure(candidate.model, validation, timing=QUICK, task=task, reference=reference,
                          true_zero_fraction=facts.get("graphSparsity") if "quantizedZeroFraction" in facts else None)
        run = ProbeRun(i, sparsity, candidate, metrics, check_gates(gates, metrics, baseline, task=task))
        runs.append(run)
        bar.advance(sparsity=sparsity, passed=run.passed, accuracy=metrics.accuracy)
        return run

    with progress("sparsity search (judged on validation)", total=s.max_probes) as bar:
        explore(lo, hi, s.max_probes, lambda sparsity: probe(sparsity).passed)

    passing = sorted((r for r in runs if r.passed), key=lambda r: (-r.sparsity, r.index))
    summary: dict[str, Any] = {
        "judgedOn": "validation", "range": [lo, hi], "maxProbes": s.max_probes, "probes": len(runs),
        "grid": plan_grid(lo, hi, s.max_probes), "passingSparsities": [r.sparsity for r in passing],
        "monotone": _monotone(runs), "maxAlternates": s.max_alternates,
    }
    if passing:
        chosen, others = passing[0], passing[1:]
        alternates, dropped = others[:s.max_alternates], others[s.max_alternates:]
        summary.update(passed=True, chosenSparsity=chosen.sparsity,
                       alternateSparsities=[r.sparsity for r in alternates],
                       notKeptSparsities=[r.sparsity for r in dropped])
        log("sparsity search chose a sparsity on validation", sparsity=chosen.sparsity,
            alternates=[r.sparsity for r in alternates], not_kept=[r.sparsity for r in dropped],
            max_alternates=s.max_alternates, probes=len(runs))
        return SearchResult(chosen.candidate, runs, summary, alternates, dropped)
    # Nothing passed: keep the probe that failed the fewest gates (then the most accurate), flagged.
    least_bad = max(runs, key=lambda r: (sum(g.outcome == "Successful" for g in r.gates.results),
                                     r.metrics.accuracy or 0.0, r.sparsity))
    failed = [f"{g.gate}: {g.message}" for g in least_bad.gates.results if g.outcome != "Successful"]
    summary.update(passed=False, chosenSparsity=least_bad.sparsity, alternateSparsities=[], notKeptSparsities=[],
                   reason=f"no probed sparsity in [{lo}, {hi}] passed every gate on validation; best candidate "
                          f"{least_bad.sparsity} fails " + "; ".join(failed))
    log("sparsity search found no passing candidate", level="warning", reason=summary["reason"])
    return SearchResult(least_bad.candidate, runs, summary, [])


def _monotone(runs: list[ProbeRun]) -> bool:
    """Whether the verdicts were consistent with "passes below some sparsity, fails above it"."""
    ordered = sorted(runs, key=lambda r: r.sparsity)
    seen_fail = False
    for r in ordered:
        if not r.passed:
            seen_fail = True
        elif seen_fail:
            return False
    return True


def write_outputs(staging: Path, result: SearchResult, write_manifest: Callable[[Path, Any], None]) -> None:
    """Into the artifact being staged: ``probes.json`` (every probe, its validation metrics and verdict,
    and where its artifact is kept) and ``alternates/probe-<i>/`` for the kept alternates (at most
    ``maxAlternates``), each a complete artifact folder written by ``write_manifest(folder, candidate)``.
    A passing probe beyond the cap is listed with ``artifact: null`` and ``notKept`` saying why."""
    rows = []
    paths: dict[int, str] = {}
    for rank, run in enumerate(result.alternates, start=1):
        folder = staging / ALTERNATES_DIR / f"probe-{run.index}"
        folder.mkdir(parents=True)
        shutil.copy2(run.candidate.model, folder / MODEL_FILE)
        write_manifest(folder, run.candidate)
        paths[run.index] = f"{ALTERNATES_DIR}/probe-{run.index}"
    order = {run.index: rank for rank, run in enumerate(result.alternates, start=1)}
    dropped = {run.index for run in result.dropped}
    cap = result.summary.get("maxAlternates")
    for run in result.runs:
        chosen = run.candidate is result.chosen
        row = {
            "index": run.index, "sparsity": run.sparsity, "judgedOn": "validation",
            "metrics": to_wire(run.metrics), "gates": to_wire(run.gates),
            "chosen": chosen, "fallbackRank": 0 if chosen and run.passed else order.get(run.index),
            "artifact": "." if chosen else paths.get(run.index),
        }
        if run.index in dropped:
            row["notKept"] = f"passed on validation, beyond compression.search.maxAlternates ({cap})"
        rows.append(row)
    (staging / PROBES_FILE).write_text(json.dumps(rows, indent=2))


def read_probes(folder: Path) -> list[dict]:
    path = Path(folder) / PROBES_FILE
    return json.loads(path.read_text()) if path.is_file() else []


def fallbacks(folder: Path) -> list[tuple[float, Path]]:
    """The alternates of a searched artifact, in the order the evaluate Job tries them on eval when the
    kept candidate fails there: (sparsity, artifact folder)."""
    rows = [r for r in read_probes(folder) if r.get("fallbackRank") and r.get("artifact")]
    rows.sort(key=lambda r: r["fallbackRank"])
    out = []
    for r in rows:
        path = (Path(folder) / r["artifact"]).resolve()
        if Path(folder).resolve() not in path.parents:
            continue  # never follow a path out of the artifact
        out.append((r["sparsity"], path))
    return out


def confirm_on_eval(candidate_dir: Path, manifest: dict, metrics: Metrics, gates: Gates, artifact,
                    measure: Callable[[Path], Metrics], judge: Callable[[Metrics, dict], Gates]):
    """The evaluate Job's half of the search: ``metrics``/``gates`` are the kept candidate's, measured on
    eval. When eval disagrees with validation (the candidate passed there and fails here), the next passing
    probe is measured on eval, and so on, until one passes or none is left. Returns
    ``(metrics, gates, artifact, manifest, report)`` of the candidate to record; ``report`` says how many
    probes touched the eval data and which disagreed. ``measure(folder)`` measures an artifact folder on eval;
    ``judge(metrics, manifest)`` checks the gates."""
    from kompressor.api.status import Artifact
    from kompressor.store import verify_artifact

    searched = manifest.get("search") or {}
    chosen = searched.get("chosenSparsity")
    report: dict[str, Any] = {"validationChoice": chosen, "passedOnValidation": bool(searched.get("passed")),
                              "probesOnEval": 1, "evalDisagreed": [], "chosenSparsity": chosen,
                              "fellBack": False}
    not_kept = list(searched.get("notKeptSparsities") or [])
    if gates.passed or not searched.get("passed"):
        return metrics, gates, artifact, manifest, report
    report["evalDisagreed"].append(chosen)
    log("eval disagrees with validation on the search's choice", level="warning", sparsity=chosen,
        failed=[g.gate for g in gates.results if g.outcome != "Successful"])
    for sparsity, folder in fallbacks(candidate_dir):
        alt_manifest = verify_artifact(folder)
        alt_metrics = measure(folder)
        alt_gates = judge(alt_metrics, alt_manifest)
        report["probesOnEval"] += 1
        if alt_gates.passed:
            report.update(chosenSparsity=sparsity, fellBack=True, artifact=str(folder.relative_to(candidate_dir)))
            log("the next passing probe passes on eval", sparsity=sparsity, probes_on_eval=report["probesOnEval"])
            return (alt_metrics, alt_gates, Artifact(uri=folder.as_uri(), sha256=alt_manifest["files"][MODEL_FILE]),
                    alt_manifest, report)
        report["evalDisagreed"].append(sparsity)
        log("eval disagrees with validation on a fallback probe too", level="warning", sparsity=sparsity)
    tried = ", ".join(map(str, report["evalDisagreed"]))
    if not_kept:
        cap = searched.get("maxAlternates")
        report["notKept"] = not_kept
        report["message"] = (f"every kept probe that passed on validation ({tried}) failed on eval; "
                             f"{len(not_kept)} more passed on validation ({', '.join(map(str, not_kept))}) but "
                             f"{'was' if len(not_kept) == 1 else 'were'} not kept (compression.search.maxAlternates: {cap}), so none is left to try")
    else:
        report["message"] = f"every probe that passed on validation ({tried}) failed on eval; none is left to try"
    log("no kept probe passes on eval", level="warning", message=report["message"])
    return metrics, gates, artifact, manifest, report
