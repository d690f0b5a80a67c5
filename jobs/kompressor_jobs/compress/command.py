"""`kompressor prune`: compress a model and write an ONNX artifact folder with its manifest.

Steps: load the CompressedModel, the source model and the data; export the uncompressed baseline once
per source digest (revision 0); prune + fine-tune (or search the sparsity); export to ONNX and check
parity; quantize; write ``--out`` atomically (temp folder + rename).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
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
from kompressor.api.spec import CompressionSpec
from kompressor.api.wire import to_wire
from kompressor.console import log
from kompressor.errors import UserError
from kompressor.store import MODEL_FILE, ArtifactError, verify_artifact, write_manifest
from kompressor_jobs.data import Dataset, load_dataset
from kompressor_jobs.staging import staged_folder

if TYPE_CHECKING:  # torch-heavy; imported when the command runs
    from kompressor_jobs.models import SourceModel

from kompressor_jobs.compress.search import PROBES_FILE  # noqa: E402,F401  (evaluate reads it)
PARITY_ROWS = 64  # the first rows of the validation split: the ONNX export's parity check (never eval)


def parity_rows(validation: Dataset) -> tuple[dict[str, np.ndarray], dict]:
    """The parity check's feed (the first PARITY_ROWS validation rows) and its manifest record: the role, the
    rows and a sha256 of exactly the arrays checked (each input in the model's order, C-order bytes)."""
    feed = validation.feed(0, PARITY_ROWS)
    digest = hashlib.sha256()
    for array in feed.values():
        digest.update(np.ascontiguousarray(array).tobytes())
    rows = len(next(iter(feed.values()))) if feed else 0
    return feed, {"data": "validation", "rows": rows, "sha256": digest.hexdigest(),
                  "digestOf": "sha256 of the rows' input arrays, in the model's input order, C-order bytes"}


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
    validation: Dataset | None = None  # judges search probes and early stopping; never the eval split
    validation_info: dict = field(default_factory=dict)  # how it was made, for the manifest (data.validation)


def versions() -> dict:
    """Versions of the libraries that made the artifact (torch and Torch-Pruning: None where not installed, as
    in an ONNX-only image)."""
    from importlib import metadata

    from kompressor import __version__

    def version(distribution: str) -> str | None:  # read from the installed metadata: imports nothing
        try:
            return metadata.version(distribution)
        except metadata.PackageNotFoundError:
            return None

    return {"kompressor": __version__, "python": sys.version.split()[0], "torch": version("torch"),
            "torchPruning": version("torch-pruning"), "onnx": version("onnx"),
            "onnxruntime": version("onnxruntime"), "numpy": np.__version__, "scikitLearn": version("scikit-learn")}


# --- baseline (revision 0) ---------------------------------------------------------------------

def ensure_baseline(source: SourceModel, cache: Path, parity_batch: dict[str, np.ndarray],
                    parity_record: dict | None = None) -> tuple[Path, str]:
    """The uncompressed model as ONNX, exported once per source-model digest (an ONNX source is copied as it
    is); ``parity_batch``: validation rows to trace and check it with (``parity_record`` says which). Returns
    (folder, sha256)."""
    from kompressor_jobs.runtime import io_signature

    # One baseline per source file and per way of reading it: a Hugging Face folder read as a classifier or as an
    # embedding model, or with another sequence length, exports another graph.
    variant = hashlib.sha256(json.dumps([source.task, source.inputs_wire()], sort_keys=True).encode()).hexdigest()
    folder = cache / f"{source.digest[:16]}-{variant[:8]}"
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
        if source.onnx_path is not None:  # an ONNX source is its own baseline
            shutil.copyfile(source.onnx_path, tmp / MODEL_FILE)
            parity = 0.0
        else:
            from kompressor_jobs.compress.export import check_parity, export_onnx  # torch: not for ONNX sources

            export_onnx(source.module, source.inputs, tmp / MODEL_FILE, task=source.task, example=parity_batch)
            parity = check_parity(source.module, tmp / MODEL_FILE, parity_batch)
        write_manifest(tmp, {
            "revision": 0, "role": "baseline", "createdAt": _now(), "model": model_record(source),
            "parityMaxAbsDiff": parity, **({"parityRows": parity_record} if parity_record else {}),
            **io_signature(tmp / MODEL_FILE), "versions": versions(),
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
    """One candidate in ``folder``: the float graph (pruned, fine-tuned and exported; an ONNX source's own
    graph), then quantized as configured."""
    from kompressor_jobs.compress.quantization import CALIBRATION_ROWS, quantize_with_spec, transformer_config
    from kompressor_jobs.runtime import graph_sparsity

    folder.mkdir(parents=True, exist_ok=True)
    if config.pruning.method == "none":
        sparsity = 0.0
    fp32 = folder / "fp32.onnx"
    if ctx.source.module is None:
        facts = _copy_onnx_source(ctx, fp32)
    else:
        facts = _prune_and_export(ctx, config, sparsity, fp32)
    # True zeros: the float graph's, before int8 rounding adds zeros of its own (evaluate reads this).
    facts["graphSparsity"] = round(graph_sparsity(fp32)[0], 6)
    if config.quantization.mode == "none":
        os.replace(fp32, folder / MODEL_FILE)
    else:
        # Calibrated on training rows; fidelity judged on the whole validation split (never eval). When even the
        # node-wise fallback misses minAgreement, the candidate is kept with fidelity.passed false: the
        # quantization.minAgreement gate rejects it (a search probe fails like any other).
        rows = np.random.default_rng(0).permutation(len(ctx.train))[:CALIBRATION_ROWS]
        validation = ctx.validation if ctx.validation is not None else ctx.train
        heads, hidden = transformer_config(ctx.source.path) if ctx.source.format == "huggingface" else (0, 0)
        result = quantize_with_spec(fp32, folder / MODEL_FILE, config.quantization, ctx.train.subset(rows).inputs,
                                    validation.inputs, task=ctx.source.task, kind=ctx.source.kind,
                                    num_heads=heads, hidden_size=hidden, raise_on_failure=False)
        facts["quantization"] = result.facts
        fp32.unlink()
        facts["quantizedZeroFraction"] = round(graph_sparsity(folder / MODEL_FILE)[0], 6)  # incl. rounding zeros
    log("compressed", sparsity=round(sparsity, 4), graph_sparsity=facts["graphSparsity"],
        parameters=facts.pop("parametersSummary", "unchanged"), parity=f"{facts['parityMaxAbsDiff']:.2g}")
    return Candidate(folder, sparsity, facts, facts.get("fineTuneSeconds", 0.0))


def _copy_onnx_source(ctx: Context, fp32: Path) -> dict:
    """An ONNX source is not pruned (refused up front): its graph is the float model to quantize."""
    shutil.copyfile(ctx.source.onnx_path, fp32)
    return {"method": "none", "targetSparsity": 0.0, "stepSparsities": [], "source": "onnx graph, copied",
            "parametersBefore": None, "parametersAfter": None, "parityMaxAbsDiff": 0.0, "fineTuneSeconds": 0.0,
            "structuredSparsity": 0.0}


def _prune_and_export(ctx: Context, config: CompressionSpec, sparsity: float, fp32: Path) -> dict:
    """Prune and fine-tune a copy of the source module, export it to ``fp32`` and check parity; the facts."""
    from kompressor_jobs.compress.export import PARITY_ATOL, PARITY_RTOL, check_parity, export_onnx
    from kompressor_jobs.compress.finetune import example_inputs, fine_tuner
    from kompressor_jobs.compress.pruning import prune_model

    p = config.pruning
    module = copy.deepcopy(ctx.source.module)
    tuner = None if p.method == "none" else fine_tuner(config, ctx.source, ctx.train, ctx.validation, ctx.device,
                                                        task=ctx.resource.spec.model.task)
    result = prune_model(module, p.method, sparsity, schedule=p.schedule, steps=p.steps, fine_tune=tuner,
                         example=example_inputs(ctx.train), importance=p.importance)
    # Validation rows (never eval: eval is left to the gates alone); train only if a caller gave no validation.
    batch, checked = parity_rows(ctx.validation if ctx.validation is not None else ctx.train)
    export_onnx(result.module, ctx.source.inputs, fp32, task=ctx.source.task, example=batch)
    parity = check_parity(result.module, fp32, batch)
    facts = {
        "method": p.method, "targetSparsity": round(sparsity, 6),
        "stepSparsities": [round(s, 6) for s in result.step_sparsities],
        "weightSparsity": round(result.weight_sparsity, 6),
        "parametersBefore": result.params_before, "parametersAfter": result.params_after,
        "parityMaxAbsDiff": parity, "parityTolerance": {"atol": PARITY_ATOL, "rtol": PARITY_RTOL,
                                                  "rows": checked["rows"]},
        "parityRows": checked if ctx.validation is not None else {**checked, "data": "train"},
        "fineTuneSeconds": round(result.fine_tune_seconds, 3),
        # The fraction of parameters removed (structured pruning; 0 for methods that keep every tensor).
        "structuredSparsity": round(result.structured_sparsity, 6),
        "fineTuning": [{k: v for k, v in r.items() if k != "history"} for r in result.fine_tuning],
    }
    if p.method == "structured":
        facts["importance"] = p.importance
        if result.attention:
            facts["attention"] = result.attention
    if tuner is not None:
        facts["distillation"] = {"enabled": tuner.distil, "alpha": tuner.alpha,
                                 "temperature": tuner.config.temperature}
    facts["parametersSummary"] = f"{result.params_before}->{result.params_after}"
    return facts


# --- accuracy-aware search: compress/search.py (judged on the validation split) ---------------------

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
    if args.retrain and spec.model.task != "embedding" and spec.compression.distillation.enabled:
        # The teacher learned the data that drifted away: distilling from it would pull the retrained model
        # back to the old labels. Embedding models have no labels, so they keep distilling.
        spec.compression.distillation.enabled = False
        log("distillation off for a retrain: the recent data's labels are the target", level="warning")

    from kompressor_jobs.models import load_model

    source = load_model(spec.model)
    check_source_can_be_compressed(source, spec.compression)

    def load(uri: str) -> Dataset:
        return load_dataset(uri, source.inputs, source.task, source.num_classes)

    train = load(train_uri)
    evaluation = load(spec.data.eval)
    if len(train) == 0 or len(evaluation) == 0:
        raise UserError("the training and eval datasets must not be empty")
    train, validation, validation_info = resolve_validation(spec.data, train, load)
    log("prune started", resource=resource.key, model=source.uri, device=device, train=train_uri,
        train_rows=len(train), validation_rows=len(validation), eval_rows=len(evaluation))

    baseline_cache = Path(args.baseline_cache) if args.baseline_cache else cache_root() / "baselines"
    # The export's parity check reads validation rows: prune reads eval only to record which data the gates use.
    baseline_dir, baseline_sha = ensure_baseline(source, baseline_cache.absolute(), *parity_rows(validation))
    ctx = Context(resource, source, train, evaluation, device, baseline_dir, baseline_sha, validation,
                  validation_info)

    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.work-"))
    try:
        with staged_folder(out) as staging:
            config = spec.compression
            search_summary = None
            if config.search.enabled:
                from kompressor_jobs.compress.search import search, write_outputs

                found = search(ctx, config, spec.gates, work, compress, ctx.validation)
                candidate, search_summary = found.chosen, found.summary
                write_outputs(staging, found, lambda folder, alt: _write_candidate_manifest(
                    folder, args, ctx, train_uri, alt, {**found.summary, "alternate": True}, hardware(device),
                    time.perf_counter() - started))
            else:
                candidate = compress(ctx, config, config.pruning.sparsity, work / "candidate")
            shutil.copy2(candidate.model, staging / MODEL_FILE)
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
        "model": model_record(ctx.source),
        "data": {"train": {"uri": train_uri, "sha256": ctx.train.digest, "rows": len(ctx.train),
                           "usedFor": "fine-tuning and INT8 calibration"},
                 "validation": ctx.validation_info,
                 "eval": {"uri": spec.data.eval, "sha256": ctx.eval.digest, "rows": len(ctx.eval),
                          "usedFor": "the gates only (the evaluate Job); prune reads it only to record this digest"},
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


def model_record(source: SourceModel) -> dict:
    """What the manifests say about the source model (evaluate and serving read inputs, task and outputDim)."""
    record = {"uri": source.uri, "sha256": source.digest, "format": source.format, "task": source.task,
              "kind": source.kind, "inputs": source.inputs_wire(), "outputDim": source.output_dim,
              "numClasses": source.num_classes}
    if len(source.inputs) == 1 and source.inputs[0].dtype == "float32":
        record["inputShape"] = list(source.inputs[0].shape)
    return record


def check_source_can_be_compressed(source: SourceModel, compression: CompressionSpec) -> None:
    """An ONNX source can be quantized, not pruned (nor searched over sparsity): refused before anything runs."""
    if source.module is not None:
        return
    from kompressor_jobs.models.onnx_source import PRUNING_REFUSED

    if compression.pruning.method != "none":
        raise UserError(f"{source.uri}: compression.pruning.method is {compression.pruning.method}, but "
                        + PRUNING_REFUSED)
    if compression.search.enabled:
        raise UserError(f"{source.uri}: compression.search searches over pruning sparsity, but " + PRUNING_REFUSED)


def resolve_validation(data_spec, train: Dataset, load) -> tuple[Dataset, Dataset, dict]:
    """(train, validation, manifest record): spec.data.validation when set, else a seeded, stratified
    validationFraction of train held out (those rows are then not trained on). ``load(uri)`` loads a dataset
    the way the training data was loaded."""
    from kompressor.api import defaults as d
    from kompressor_jobs.data import split_validation

    used = "search probes, early stopping, the INT8 fidelity check and the ONNX parity check"
    if data_spec.validation:
        validation = load(data_spec.validation)
        if len(validation) == 0:
            raise UserError(f"{data_spec.validation}: the validation dataset is empty")
        return train, validation, {"uri": data_spec.validation, "sha256": validation.digest,
                                   "rows": len(validation), "usedFor": used}
    fraction, seed = data_spec.validation_fraction, d.VALIDATION_SEED
    rest, validation = split_validation(train, fraction, seed)
    return rest, validation, {
        "heldOutOf": train.uri, "fraction": fraction, "seed": seed, "rows": len(validation),
        "stratified": validation.y is not None and validation.y.ndim == 1 and validation.y.dtype.kind in "iu",
        "sha256": validation.digest, "digestOf": "sha256(train sha256 + ':' + the held-out row indices, int64)",
        "usedFor": used, "note": "these rows of the training data were held out: not trained on"}


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
