"""`kompressor evaluate`: measure a candidate and its baseline with ONNX Runtime, judge the gates,
and write metrics.json (the operator's contract) plus a model card, atomically.

Exit 0 whether or not the gates pass: the verdict is data in metrics.json. Bad input (a tampered
artifact, unreadable data) exits non-zero and writes nothing.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from kompressor.api.report import METRICS_FILE, EvalReport, Probe
from kompressor.api.status import Artifact, Gates, Metrics
from kompressor.api.wire import from_wire, to_wire
from kompressor.console import log
from kompressor.errors import UserError
from kompressor.store import MODEL_FILE, resolve_local, verify_artifact
from kompressor_jobs.compress.command import PROBES_FILE, load_resource
from kompressor_jobs.staging import staged_folder

MODEL_CARD_MD = "model_card.md"
MODEL_CARD_JSON = "model_card.json"


def main(args: argparse.Namespace) -> int:
    from kompressor_jobs.data import load_dataset
    from kompressor_jobs.evaluate.gates import check_gates
    from kompressor_jobs.evaluate.metrics import measure

    resource = load_resource(args.spec)
    spec = resource.spec
    candidate_dir = Path(args.candidate).absolute()
    if not candidate_dir.is_dir():
        raise UserError(f"--candidate {args.candidate}: no such artifact folder")
    manifest = verify_artifact(candidate_dir)
    model = manifest.get("model") or {}
    data = load_dataset(spec.data.eval, model.get("inputShape"), model.get("numClasses"))
    if len(data) == 0:
        raise UserError(f"{spec.data.eval}: the eval dataset is empty")

    baseline_artifact, baseline_metrics = None, None
    baseline_ref = manifest.get("baseline")
    if baseline_ref:
        baseline_dir = resolve_local(baseline_ref["uri"])
        verify_artifact(baseline_dir, baseline_ref["sha256"])
        baseline_artifact = Artifact(uri=baseline_ref["uri"], sha256=baseline_ref["sha256"])
        log("measuring the baseline", artifact=baseline_ref["uri"])
        baseline_metrics = measure(baseline_dir / MODEL_FILE, data)
    else:
        log("the candidate names no baseline: gates that compare with it are judged Error", level="warning")

    log("measuring the candidate", artifact=str(candidate_dir))
    metrics = measure(candidate_dir / MODEL_FILE, data,
                      baseline_size=baseline_metrics.size_bytes if baseline_metrics else None)
    gates = check_gates(spec.gates, metrics, baseline_metrics)
    report = EvalReport(
        metrics=metrics, gates=gates,
        artifact=Artifact(uri=candidate_dir.as_uri(), sha256=manifest["files"][MODEL_FILE]),
        baseline_artifact=baseline_artifact, baseline_metrics=baseline_metrics,
        probes=_read_probes(candidate_dir),
    )
    card = model_card(resource, manifest, report, data)

    out = Path(args.out).absolute()
    with staged_folder(out) as staging:
        (staging / METRICS_FILE).write_text(json.dumps(report.to_json(), indent=2, sort_keys=True))
        (staging / MODEL_CARD_JSON).write_text(json.dumps(card, indent=2, sort_keys=True))
        (staging / MODEL_CARD_MD).write_text(model_card_markdown(card))
    log("evaluation finished", passed=gates.passed, accuracy=metrics.accuracy, sparsity=metrics.sparsity,
        latency_p95_ms=metrics.latency_p95_ms, failed=[r.gate for r in gates.results if r.outcome != "Successful"],
        out=str(out))
    return 0


def _read_probes(folder: Path) -> list[Probe]:
    path = folder / PROBES_FILE
    if not path.is_file():
        return []
    return [Probe(sparsity=p["sparsity"], metrics=from_wire(Metrics, p["metrics"], "probes.metrics"),
                  gates=from_wire(Gates, p["gates"], "probes.gates")) for p in json.loads(path.read_text())]


# --- model card --------------------------------------------------------------------------------

INTENDED_USE = {
    "digits": "Classify 8x8 grey-scale images of handwritten digits (scikit-learn's digits) into 0-9.",
    "wine": "Classify wines into three cultivars from 13 chemical measurements (scikit-learn's wine).",
    "breast_cancer": "Classify breast-mass cell nuclei features as malignant or benign (scikit-learn's "
                     "breast_cancer). A demonstration model: not for clinical use.",
}


def model_card(resource, manifest: dict, report: EvalReport, data) -> dict:
    from kompressor_jobs.models.builtin import builtin_model

    model = manifest.get("model") or {}
    uri = model.get("uri", "")
    builtin = builtin_model(uri) if uri.startswith("builtin://") else None
    intended = INTENDED_USE.get(builtin.dataset) if builtin else (
        f"The task of the source model {uri}, on inputs shaped like its training data {model.get('inputShape')}.")
    metrics = to_wire(report.metrics)
    limitations = [
        f"Metrics are measured on {len(data)} rows of {data.uri}; they hold for data distributed like it. "
        "The drift watcher checks live traffic against the reference data.",
        f"Latency and throughput were measured with ONNX Runtime on CPU on the evaluation machine "
        f"({os.cpu_count()} visible cores); other hardware gives other numbers.",
    ]
    achieved = manifest.get("achieved") or {}
    if achieved.get("method") in ("unstructured", "global"):
        limitations.append("Unstructured sparsity zeroes weights but keeps dense tensors: neither the ONNX file "
                           "nor ONNX Runtime's dense kernels get smaller or faster (structured pruning removes "
                           "whole channels; int8 quantization shrinks the file).")
    if (manifest.get("compression") or {}).get("quantization", {}).get("mode", "none") != "none":
        limitations.append("Weights are int8: accuracy was measured after quantization; outputs differ slightly "
                           "from the float model's.")
    small = [name for name, s in (report.metrics.slices or {}).items()
             if (s.samples or 0) < resource.spec.gates.min_slice_samples]
    if small:
        limitations.append(f"Slices with too few eval rows to judge: {', '.join(small)}.")
    if not report.gates.passed:
        limitations.append("This revision did NOT pass its gates; it is not promoted.")
    return {
        "model": {"resource": resource.key, "revision": manifest.get("revision"), "source": model,
                  "artifact": to_wire(report.artifact)},
        "intendedUse": intended,
        "data": manifest.get("data") or {"eval": {"uri": data.uri, "sha256": data.digest}},
        "compression": {"config": manifest.get("compression"), "achieved": achieved, "search": manifest.get("search")},
        "metrics": {k: v for k, v in metrics.items() if k != "slices"},
        "baseline": {"artifact": to_wire(report.baseline_artifact) if report.baseline_artifact else None,
                     "metrics": {k: v for k, v in to_wire(report.baseline_metrics).items() if k != "slices"}
                     if report.baseline_metrics else None},
        "slices": metrics.get("slices") or {},
        "gates": to_wire(report.gates),
        "probes": len(report.probes),
        "hardware": manifest.get("hardware"),
        "versions": manifest.get("versions"),
        "limitations": limitations,
    }


def model_card_markdown(card: dict) -> str:
    m, b = card["metrics"], (card["baseline"]["metrics"] or {})
    lines = [
        f"# Model card: {card['model']['resource']} revision {card['model']['revision']}",
        "",
        f"**Verdict:** {'passed every gate' if card['gates']['passed'] else 'did not pass its gates'}",
        "",
        "## Intended use",
        "",
        card["intendedUse"],
        "",
        "## Data provenance",
        "",
        f"- Source model: `{card['model']['source'].get('uri')}` (sha256 `{card['model']['source'].get('sha256')}`)",
    ]
    for role, info in (card["data"] or {}).items():
        if isinstance(info, dict):
            lines.append(f"- {role}: `{info.get('uri')}` (sha256 `{info.get('sha256')}`, {info.get('rows')} rows)")
    cfg = card["compression"]["config"] or {}
    ach = card["compression"]["achieved"] or {}
    lines += [
        "",
        "## Compression",
        "",
        f"- Pruning: {json.dumps(cfg.get('pruning'))}",
        f"- Quantization: {json.dumps(cfg.get('quantization'))}",
        f"- Achieved: sparsity {ach.get('graphSparsity')}, parameters {ach.get('parametersBefore')} -> "
        f"{ach.get('parametersAfter')}, ONNX parity max |diff| {ach.get('parityMaxAbsDiff')}",
    ]
    if card["compression"].get("search"):
        lines.append(f"- Sparsity search: {json.dumps(card['compression']['search'])}")
    lines += ["", "## Metrics (eval data, ONNX Runtime)", "",
              "| metric | candidate | baseline |", "| --- | --- | --- |"]
    for key in ("accuracy", "f1", "precision", "recall", "ece", "latencyP50Ms", "latencyP95Ms", "latencyP99Ms",
                "throughputRps", "sizeBytes", "sizeRatio", "sparsity"):
        lines.append(f"| {key} | {m.get(key)} | {b.get(key, '')} |")
    if card["slices"]:
        lines += ["", "## Slices", "", "| slice | accuracy | F1 | rows |", "| --- | --- | --- | --- |"]
        for name, s in card["slices"].items():
            lines.append(f"| {name} | {s.get('accuracy')} | {s.get('f1')} | {s.get('samples')} |")
    lines += ["", "## Gates", "", "| gate | value | threshold | outcome | why |", "| --- | --- | --- | --- | --- |"]
    for r in card["gates"].get("results", []):
        lines.append(f"| {r['gate']} | {r.get('value')} | {r.get('threshold')} | {r['outcome']} "
                     f"| {r.get('message', '')} |")
    lines += ["", "## Limitations", ""] + [f"- {text}" for text in card["limitations"]] + [""]
    return "\n".join(lines)
