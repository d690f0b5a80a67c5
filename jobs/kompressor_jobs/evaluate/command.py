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


def serving_cpu_limit(spec):
    """The serving Pod's CPU limit (spec.serving.resources, else the defaults), a Kubernetes quantity or None."""
    from kompressor.api import defaults as d

    resources = spec.serving.resources or d.SERVING_RESOURCES
    return ((resources or {}).get("limits") or {}).get("cpu")


def main(args: argparse.Namespace) -> int:
    from kompressor_jobs.data import load_dataset
    from kompressor_jobs.evaluate.gates import check_gates
    from kompressor_jobs.evaluate.metrics import measure, measure_pair
    from kompressor_jobs.runtime import ort_threads

    resource = load_resource(args.spec)
    spec = resource.spec
    task = spec.model.task
    candidate_dir = Path(args.candidate).absolute()
    if not candidate_dir.is_dir():
        raise UserError(f"--candidate {args.candidate}: no such artifact folder")
    manifest = verify_artifact(candidate_dir)
    model = manifest.get("model") or {}
    data = load_dataset(spec.data.eval, model.get("inputs") or model.get("inputShape"), task,
                        model.get("numClasses") if task == "classification" else None)
    if len(data) == 0:
        raise UserError(f"{spec.data.eval}: the eval dataset is empty")
    # Latency is measured as it is served: ONNX Runtime's threads follow the serving Pod's CPU limit.
    threads = ort_threads(serving_cpu_limit(spec), own_cgroup=False)

    def true_zeros(m: dict) -> float | None:
        """For an int8 artifact, the zeros of its float graph before quantization (no rounding zeros)."""
        achieved = m.get("achieved") or {}
        quantized = (achieved.get("quantization") or {}).get("mode", "none") != "none"
        value = achieved.get("graphSparsity") if quantized and "quantizedZeroFraction" in achieved else None
        return float(value) if isinstance(value, (int, float)) else None

    baseline_artifact, baseline_metrics, reference = None, None, None
    baseline_ref = manifest.get("baseline")
    if baseline_ref:
        baseline_dir = resolve_local(baseline_ref["uri"])
        verify_artifact(baseline_dir, baseline_ref["sha256"])
        baseline_artifact = Artifact(uri=baseline_ref["uri"], sha256=baseline_ref["sha256"])
        log("measuring the candidate beside its baseline", artifact=str(candidate_dir), baseline=baseline_ref["uri"],
            threads=threads)
        metrics, reference = measure_pair(candidate_dir / MODEL_FILE, baseline_dir / MODEL_FILE, data, task=task,
                                          threads=threads, true_zero_fraction=true_zeros(manifest))
        baseline_metrics = reference.metrics
    else:
        log("the candidate names no baseline: gates that compare with it are judged Error", level="warning")
        metrics = measure(candidate_dir / MODEL_FILE, data, task=task, threads=threads,
                          true_zero_fraction=true_zeros(manifest))

    def judge(m: Metrics, man: dict) -> Gates:
        return check_gates(spec.gates, m, baseline_metrics, task=task, manifest=man,
                           int8_min_agreement=spec.compression.quantization.min_agreement)

    gates = judge(metrics, manifest)
    artifact = Artifact(uri=candidate_dir.as_uri(), sha256=manifest["files"][MODEL_FILE])
    search_report = None
    if manifest.get("search"):  # confirm the search's choice on eval; on disagreement try the next passing probe
        from kompressor_jobs.compress.search import confirm_on_eval

        metrics, gates, artifact, manifest, search_report = confirm_on_eval(
            candidate_dir, manifest, metrics, gates, artifact,
            lambda path: measure(path / MODEL_FILE, data, task=task, reference=reference, threads=threads,
                                 true_zero_fraction=true_zeros(verify_artifact(path))),
            judge)
    report = EvalReport(
        metrics=metrics, gates=gates, artifact=artifact,
        baseline_artifact=baseline_artifact, baseline_metrics=baseline_metrics,
        probes=_read_probes(candidate_dir), search=search_report,
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
    from kompressor_jobs.hardware import cpu_model

    task = resource.spec.model.task
    inputs = model.get("inputs") or model.get("inputShape")
    intended = INTENDED_USE.get(builtin.dataset) if builtin else (
        f"The {task} task of the source model {uri}, on inputs like its training data ({json.dumps(inputs)}).")
    metrics = to_wire(report.metrics)
    m = report.metrics
    measurement = {
        "onnxruntimeThreads": m.latency_threads, "servingCpuLimit": serving_cpu_limit(resource.spec),
        "cpuModel": cpu_model(), "visibleCores": os.cpu_count(), "latencyRuns": m.latency_runs,
        "throughputBatch": m.throughput_batch, "baselineTimedAlongside": report.baseline_metrics is not None,
    }
    threads = ("one per core" if not m.latency_threads else f"{m.latency_threads}")
    limitations = [
        f"Metrics are measured on {len(data)} rows of {data.uri}; they hold for data distributed like it. "
        "The drift watcher checks live traffic against the reference data.",
        f"Latency and throughput were measured with ONNX Runtime on CPU ({measurement['cpuModel']}, "
        f"{os.cpu_count()} visible cores) with {threads} intra-op threads, as the serving Pod runs under its CPU "
        f"limit ({measurement['servingCpuLimit'] or 'none'}), from {m.latency_runs} timed batch-1 runs, the "
        "baseline timed alongside in the same process; other hardware gives other numbers.",
    ]
    if task != "classification":
        limitations.append(f"A {task} model: fidelity is the mean cosine similarity of its outputs to the "
                           "uncompressed model's on the same rows" + (
                               "; no labels are used." if task == "embedding" else "."))
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
        if (report.search or {}).get("message"):
            limitations.append(f"Sparsity search: {report.search['message']}.")
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
        "probes": len(report.probes),  # judged on validation
        "probesOnEval": (report.search or {}).get("probesOnEval", 1),  # how many candidates touched the eval data
        "search": report.search,
        "gains": gains(report),
        "measurement": measurement,
        "hardware": manifest.get("hardware"),
        "versions": manifest.get("versions"),
        "limitations": limitations,
    }


GAINS = (  # (label, metric key, format)
    ("Size on disk (bytes)", "sizeBytes", "{:,}"),
    ("Compressed artifact, gzip (bytes)", "compressedSizeBytes", "{:,}"),
    ("Parameters", "parameters", "{:,}"),
    ("MACs at batch 1", "macs", "{:,}"),
    ("p50 latency, batch 1 (ms)", "latencyP50Ms", "{:.4g}"),
    ("p95 latency, batch 1 (ms)", "latencyP95Ms", "{:.4g}"),
    ("Throughput (rows/s)", "throughputRps", "{:,.0f}"),
)


def gains(report: EvalReport) -> list[dict]:
    """The candidate beside its baseline, one row per measure, with the ratio."""
    c, b = to_wire(report.metrics), to_wire(report.baseline_metrics) if report.baseline_metrics else {}
    rows = []
    for label, key, fmt in GAINS:
        cv, bv = c.get(key), b.get(key)
        ratio = round(cv / bv, 4) if isinstance(cv, (int, float)) and isinstance(bv, (int, float)) and bv else None
        rows.append({"what": label, "key": key, "candidate": fmt.format(cv) if cv is not None else None,
                     "baseline": fmt.format(bv) if bv is not None else None, "ratio": ratio})
    rows.append({"what": "Speed-up (baseline p50 / candidate p50)", "key": "speedup", "candidate": c.get("speedup"),
                 "baseline": 1.0 if b else None, "ratio": c.get("speedup")})
    return rows


def _parity_rows(achieved: dict) -> str:
    """`` on 64 validation rows``: which rows the export's parity check read (never eval)."""
    rows = achieved.get("parityRows") or {}
    return f" on {rows.get('rows')} {rows.get('data')} rows" if rows else ""


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
            where = (f"`{info['uri']}`" if info.get("uri") else f"{info.get('fraction')} of `{info.get('heldOutOf')}` "
                     f"held out (seed {info.get('seed')})")
            used = f"; used for {info['usedFor']}" if info.get("usedFor") else ""
            lines.append(f"- {role}: {where} (sha256 `{info.get('sha256')}`, {info.get('rows')} rows{used})")
    cfg = card["compression"]["config"] or {}
    ach = card["compression"]["achieved"] or {}
    lines += [
        "",
        "## Compression",
        "",
        f"- Pruning: {json.dumps(cfg.get('pruning'))}",
        f"- Quantization: {json.dumps(cfg.get('quantization'))}",
        f"- Achieved: sparsity {m.get('sparsity')} of the baseline's weights removed or zero (structured: "
        f"{ach.get('structuredSparsity')} of the parameters removed; zeros in the float graph "
        f"{ach.get('graphSparsity')}), parameters {ach.get('parametersBefore')} -> "
        f"{ach.get('parametersAfter')}, ONNX parity max |diff| {ach.get('parityMaxAbsDiff')}" + _parity_rows(ach),
    ]
    if card["compression"].get("search"):
        lines.append(f"- Sparsity search: {json.dumps(card['compression']['search'])}")
        lines.append(f"- Search probes judged on validation: {card['probes']}; candidates measured on eval: "
                     f"{card['probesOnEval']}" + (f" (eval disagreed with validation on sparsity "
                                                  f"{', '.join(map(str, card['search']['evalDisagreed']))})"
                                                  if (card.get("search") or {}).get("evalDisagreed") else ""))
        if (card.get("search") or {}).get("message"):
            lines.append(f"- {card['search']['message']}")
    lines += ["", "## Gains vs the uncompressed baseline (measured in this evaluation)", "",
              "| | candidate | baseline | candidate / baseline |", "| --- | --- | --- | --- |"]
    for row in card.get("gains") or []:
        lines.append(f"| {row['what']} | {row['candidate']} | {row['baseline']} | {row['ratio']} |")
    meas = card.get("measurement") or {}
    lines += ["", f"Timing: {meas.get('latencyRuns')} batch-1 runs, ONNX Runtime threads {meas.get('onnxruntimeThreads')} "
              f"(0: one per core; serving CPU limit {meas.get('servingCpuLimit')}), CPU {meas.get('cpuModel')}, "
              f"throughput at batch {meas.get('throughputBatch')}."]
    task = m.get("task") or "classification"
    keys = {"classification": ("accuracy", "f1", "precision", "recall", "ece", "agreement", "klDivergence",
                               "cosineSimilarity"),
            "regression": ("mae", "rmse", "r2", "cosineSimilarity"),
            "embedding": ("cosineSimilarity",)}[task]
    lines += ["", f"## Quality and fidelity ({task}; eval data, ONNX Runtime)", "",
              "| metric | candidate | baseline |", "| --- | --- | --- |"]
    for key in keys:
        lines.append(f"| {key} | {m.get(key)} | {b.get(key, '')} |")
    if card["slices"]:
        cols = {"classification": ("accuracy", "f1"), "regression": ("mae", "r2")}.get(task, ()) + ("cosineSimilarity",)
        lines += ["", "## Slices", "", "| slice | " + " | ".join(cols) + " | rows |",
                  "| --- | " + " | ".join("---" for _ in cols) + " | --- |"]
        for name, s in card["slices"].items():
            lines.append(f"| {name} | " + " | ".join(str(s.get(c)) for c in cols) + f" | {s.get('samples')} |")
    lines += ["", "## Gates", "", "| gate | value | threshold | outcome | why |", "| --- | --- | --- | --- | --- |"]
    for r in card["gates"].get("results", []):
        lines.append(f"| {r['gate']}{' (default)' if r.get('default') else ''} | {r.get('value')} "
                     f"| {r.get('threshold')} | {r['outcome']} | {r.get('message', '')} |")
    lines += ["", "## Limitations", ""] + [f"- {text}" for text in card["limitations"]] + [""]
    return "\n".join(lines)
