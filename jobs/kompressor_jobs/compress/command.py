"""`kompressor prune`: compress a model and write an ONNX artifact folder with its manifest.

Steps: load the CompressedModel, the source model and the data; export the uncompressed baseline once
per source digest (revision 0); prune + fine-tune (or search the sparsity); export to ONNX and check
parity; quantize; write ``--out`` atomically (temp folder + rename).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from kompressor.api import load_manifests
from kompressor.api.manifest import CompressedModel
from kompressor.api.report import Probe
from kompressor.api.spec import CompressionSpec, GatesSpec
from kompressor.api.status import Gates, Metrics
from kompressor.api.wire import to_wire
from kompressor.console import log, progress
from kompressor.errors import UserError
from kompressor.store import MODEL_FILE, ArtifactError, verify_artifact, write_manifest
from kompressor_jobs.data import Dataset, load_dataset
from kompressor_jobs.staging import staged_folder

if TYPE_CHECKING:  # torch-heavy; imported when the command runs
    from kompressor_jobs.models import SourceModel

PROBES_FILE = "probes.json"
PARITY_ROWS = 64


def load_resource(spec_path: str) -> CompressedModel:
    if not Path(spec_path).is_file():
        raise UserError(f"{spec_path}: spec file not found")
    return load_manifests(spec_path)[0]


def cache_root() -> Path:
    from kompressor_jobs.models import cache_dir

    return cache_dir()


@dataclass
class Candidate:
    """One compressed model, exported (and quantized) into ``folder/model.onnx``."""

    folder: Path
    sparsity: float
    facts: dict = field(default_factory=dict)
    fine_tune_seconds: float = 0.0

    @property
    def model(self) -> Path:
        return self.folder / MODEL_FILE


@dataclass
class Context:
    resource: CompressedModel
    source: SourceModel
    train: Dataset
    eval: Dataset
    device: str
    baseline_dir: Path
    baseline_sha256: str


def versions() -> dict:
    import onnx
    import onnxruntime
    import sklearn
    import torch
    import torch_pruning

    from kompressor import __version__

    return {"kompressor": __version__, "python": sys.version.split()[0], "torch": torch.__version__,
            "torchPruning": torch_pruning.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "numpy": np.__version__, "scikitLearn": sklearn.__version__}


# --- baseline (revision 0) ---------------------------------------------------------------------

def ensure_baseline(source: SourceModel, cache: Path, parity_batch: np.ndarray) -> tuple[Path, str]:
    """The uncompressed model as ONNX, exported once per source-model digest. Returns (folder, sha256)."""
    from kompressor_jobs.compress.export import check_parity, export_onnx
    from kompressor_jobs.runtime import io_signature

    folder = cache / source.digest[:16]
    if folder.is_dir():
        try:
            manifest = verify_artifact(folder)
            if manifest.get("model", {}).get("sha256") == source.digest:
                return folder, manifest["files"][MODEL_FILE]
        except ArtifactError as err:
            log("rebuilding a damaged baseline", level="warning", reason=str(err))
        shutil.rmtree(folder, ignore_errors=True)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cache, prefix=f".{folder.name}."))
    tmp.chmod(0o755)
    try:
        export_onnx(source.module, source.input_shape, tmp / MODEL_FILE)
        parity = check_parity(source.module, tmp / MODEL_FILE, parity_batch)
        write_manifest(tmp, {
            "revision": 0, "role": "baseline", "createdAt": _now(),
            "model": {"uri": source.uri, "sha256": source.digest, "inputShape": source.input_shape,
                      "numClasses": source.num_classes},
            "parityMaxAbsDiff": parity, **io_signature(tmp / MODEL_FILE), "versions": versions(),
        })
        try:
            os.rename(tmp, folder)
        except OSError:  # another job exported the same baseline meanwhile: use theirs
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    manifest = verify_artifact(folder)
    log("baseline ready", folder=str(folder), sha256=manifest["files"][MODEL_FILE][:12])
    return folder, manifest["files"][MODEL_FILE]


# --- one compression ---------------------------------------------------------------------------

def compress(ctx: Context, config: CompressionSpec, sparsity: float, folder: Path) -> Candidate:
    from kompressor_jobs.compress.export import PARITY_ATOL, PARITY_RTOL, check_parity, export_onnx
    from kompressor_jobs.compress.pruning import prune_model
    from kompressor_jobs.compress.quantization import quantize
    from kompressor_jobs.runtime import graph_sparsity, run, session

    folder.mkdir(parents=True, exist_ok=True)
    p = config.pruning
    module = copy.deepcopy(ctx.source.module)
    result = prune_model(module, p.method, sparsity, p.schedule, p.steps, p.fine_tune_epochs, ctx.train,
                         ctx.device, ctx.source.input_shape)
    batch = ctx.eval.X[:PARITY_ROWS]
    fp32 = folder / "fp32.onnx"
    export_onnx(result.module, ctx.source.input_shape, fp32)
    parity = check_parity(result.module, fp32, batch)
    facts = {
        "method": p.method, "targetSparsity": round(sparsity, 6),
        "stepSparsities": [round(s, 6) for s in result.step_sparsities],
        "weightSparsity": round(result.weight_sparsity, 6),
        "parametersBefore": result.params_before, "parametersAfter": result.params_after,
        "parityMaxAbsDiff": parity, "parityTolerance": {"atol": PARITY_ATOL, "rtol": PARITY_RTOL, "rows": len(batch)},
        "fineTuneSeconds": round(result.fine_tune_seconds, 3),
    }
    if config.quantization.mode == "none":
        os.replace(fp32, folder / MODEL_FILE)
    else:
        calibration = ctx.train.X[np.random.default_rng(0).permutation(len(ctx.train))]
        quantize(fp32, folder / MODEL_FILE, config.quantization.mode, calibration)
        agree = run(session(folder / MODEL_FILE, threads=1), batch).argmax(1) == run(
            session(fp32, threads=1), batch).argmax(1)
        facts["quantization"] = {"mode": config.quantization.mode, "top1AgreementWithFp32": float(agree.mean()),
                                 "rows": len(batch)}
        fp32.unlink()
    facts["graphSparsity"] = round(graph_sparsity(folder / MODEL_FILE)[0], 6)
    log("compressed", sparsity=round(sparsity, 4), graph_sparsity=facts["graphSparsity"],
        parameters=f"{result.params_before}->{result.params_after}", parity=f"{parity:.2g}")
    return Candidate(folder, sparsity, facts, result.fine_tune_seconds)


# --- accuracy-aware search ---------------------------------------------------------------------

def search(ctx: Context, config: CompressionSpec, gates: GatesSpec, work: Path) -> tuple[Candidate, list[Probe], dict]:
    """Bisection over sparsity: probe the top of the range, then the bottom, then halve the interval
    between the largest passing and the smallest failing sparsity. The largest passing probe wins."""
    from kompressor_jobs.evaluate.gates import check_gates
    from kompressor_jobs.evaluate.metrics import QUICK, measure

    s = config.search
    baseline_model = ctx.baseline_dir / MODEL_FILE
    baseline = measure(baseline_model, ctx.eval, timing=QUICK)  # measured once, reused by every probe
    lo, hi = min(s.min_sparsity, s.max_sparsity), max(s.min_sparsity, s.max_sparsity)
    probes: list[Probe] = []
    tried: list[tuple[Candidate, Metrics, Gates]] = []
    best: Candidate | None = None
    passing_lo, failing_hi = None, None
    with progress("sparsity search", total=s.max_probes) as bar:
        for i in range(s.max_probes):
            if i == 0:
                sparsity = hi
            elif i == 1 and lo < hi:
                sparsity = lo
            elif passing_lo is None or failing_hi is None:
                break  # the whole range passed (stopped at i=1) or nothing can pass below the bottom
            else:
                sparsity = (passing_lo + failing_hi) / 2
            sparsity = round(sparsity, 4)
            if any(abs(c.sparsity - sparsity) < 1e-4 for c, _, _ in tried):
                break
            candidate = compress(ctx, config, sparsity, work / f"probe-{i}")
            metrics = measure(candidate.model, ctx.eval, baseline_size=baseline.size_bytes, timing=QUICK)
            verdict = check_gates(gates, metrics, baseline)
            probes.append(Probe(sparsity=sparsity, metrics=metrics, gates=verdict))
            tried.append((candidate, metrics, verdict))
            bar.advance(sparsity=sparsity, passed=verdict.passed, accuracy=metrics.accuracy)
            if verdict.passed:
                passing_lo = sparsity
                if best is None or sparsity > best.sparsity:
                    best = candidate
                if i == 0:
                    break  # the top of the range passes: nothing larger to find
            else:
                failing_hi = sparsity if failing_hi is None else min(failing_hi, sparsity)
                if i == 1:
                    break  # even the bottom of the range fails
    summary = {"range": [lo, hi], "maxProbes": s.max_probes, "probes": len(probes)}
    if best is not None:
        summary.update(passed=True, chosenSparsity=best.sparsity)
        return best, probes, summary
    # Nothing passed: keep the candidate that failed the fewest gates (then the most accurate), flagged.
    candidate, metrics, verdict = max(
        tried, key=lambda t: (sum(r.outcome == "Successful" for r in t[2].results), t[1].accuracy or 0.0))
    failed = [f"{r.gate}: {r.message}" for r in verdict.results if r.outcome != "Successful"]
    summary.update(passed=False, chosenSparsity=candidate.sparsity,
                   reason=f"no probed sparsity in [{lo}, {hi}] passed every gate; best candidate "
                          f"{candidate.sparsity} fails " + "; ".join(failed))
    log("sparsity search found no passing candidate", level="warning", reason=summary["reason"])
    return candidate, probes, summary


# --- the command -------------------------------------------------------------------------------

def main(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    from kompressor_jobs.hardware import hardware, select_device

    resource = load_resource(args.spec)
    spec = resource.spec
    device = select_device(args.device)
    out = Path(args.out).absolute()
    if args.retrain and not spec.data.retrain:
        raise UserError("--retrain: spec.data.retrain is not set, so there is no retraining data")
    train_uri = spec.data.retrain if args.retrain else spec.data.train

    from kompressor_jobs.models import load_source

    source = load_source(spec.model.uri, spec.model.input_shape)
    train = load_dataset(train_uri, source.input_shape, source.num_classes)
    evaluation = load_dataset(spec.data.eval, source.input_shape, source.num_classes)
    if len(train) == 0 or len(evaluation) == 0:
        raise UserError("the training and eval datasets must not be empty")
    log("prune started", resource=resource.key, model=source.uri, device=device, train=train_uri,
        train_rows=len(train), eval_rows=len(evaluation))

    baseline_cache = Path(args.baseline_cache) if args.baseline_cache else cache_root() / "baselines"
    baseline_dir, baseline_sha = ensure_baseline(source, baseline_cache.absolute(), evaluation.X[:PARITY_ROWS])
    ctx = Context(resource, source, train, evaluation, device, baseline_dir, baseline_sha)

    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.work-"))
    try:
        with staged_folder(out) as staging:
            config = spec.compression
            search_summary, probes = None, []
            if config.search.enabled:
                candidate, probes, search_summary = search(ctx, config, spec.gates, work)
            else:
                candidate = compress(ctx, config, config.pruning.sparsity, work / "candidate")
            shutil.copy2(candidate.model, staging / MODEL_FILE)
            if probes:
                (staging / PROBES_FILE).write_text(json.dumps(
                    [{"sparsity": p.sparsity, "metrics": to_wire(p.metrics), "gates": to_wire(p.gates)}
                     for p in probes], indent=2))
            _write_candidate_manifest(staging, args, ctx, train_uri, candidate, search_summary, hardware(device),
                                      time.perf_counter() - started)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log("prune finished", out=str(out), sparsity=candidate.sparsity, seconds=round(time.perf_counter() - started, 2))
    return 0


def _write_candidate_manifest(folder: Path, args, ctx: Context, train_uri: str, candidate: Candidate,
                              search_summary: dict | None, hw: dict, seconds: float) -> None:
    from kompressor_jobs.runtime import io_signature

    spec = ctx.resource.spec
    manifest = {
        "revision": args.revision, "role": "candidate", "createdAt": _now(),
        "resource": ctx.resource.key, "generation": ctx.resource.generation,
        "model": {"uri": ctx.source.uri, "sha256": ctx.source.digest, "inputShape": ctx.source.input_shape,
                  "numClasses": ctx.source.num_classes},
        "data": {"train": {"uri": train_uri, "sha256": ctx.train.digest, "rows": len(ctx.train)},
                 "eval": {"uri": spec.data.eval, "sha256": ctx.eval.digest, "rows": len(ctx.eval)},
                 "retrain": bool(args.retrain)},
        "compression": to_wire(spec.compression),
        "achieved": candidate.facts,
        "versions": versions(), "hardware": hw, "wallSeconds": round(seconds, 3),
        "baseline": {"uri": ctx.baseline_dir.as_uri(), "sha256": ctx.baseline_sha256},
        **io_signature(folder / MODEL_FILE),
    }
    if search_summary is not None:
        manifest["search"] = search_summary
    write_manifest(folder, manifest)


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
