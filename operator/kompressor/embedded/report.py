"""The run report: one self-contained HTML file (plots embedded as PNG) from a workdir's files.

It reads only what the embedded runner and the jobs leave on disk (status.json, the eval
folders' metrics.json and model cards, drift.jsonl, events.jsonl, serving.jsonl), so it can
be produced for any `kompressor run` workdir, not just the demo's. matplotlib is imported
here, lazily: the light package does not need it to run models.
"""

from __future__ import annotations

import base64
import html
import io
import json
import shutil
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from kompressor.core import names
from kompressor.embedded.layout import ModelDir, read_json, read_jsonl, store_root, write_atomic

REPORT_FILE = "report.html"
MODEL_CARDS_DIR = "model-cards"


@dataclass
class ModelRecord:
    namespace: str
    name: str
    status: dict
    spec: dict
    reports: dict[int, dict]  # revision -> metrics.json
    verdicts: list[dict]
    events: list[dict]
    serving: list[dict]
    cards: dict[int, Path] = field(default_factory=dict)
    serving_windows: list[dict] = field(default_factory=list)  # every verdict the watcher wrote (one per window)
    online: list[dict] = field(default_factory=list)  # the online stage's evidence as it moved (online.jsonl)

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


def collect(workdir: Path) -> list[ModelRecord]:
    records = []
    for status_file in sorted(Path(workdir).glob("*/*/status.json")):
        files = ModelDir(status_file.parent)
        namespace, name = status_file.parent.parent.name, status_file.parent.name
        status = read_json(status_file, {}) or {}
        reports, cards = {}, {}
        for eval_dir in sorted((store_root(workdir) / namespace / name).glob("r*/eval")):
            revision = int(eval_dir.parent.name[1:])
            if eval_dir != store_root(workdir) / names.eval_key(namespace, name, revision):
                continue
            data = read_json(eval_dir / "metrics.json")
            if isinstance(data, dict):
                reports[revision] = data
            if (eval_dir / "model_card.md").is_file():
                cards[revision] = eval_dir / "model_card.md"
        records.append(ModelRecord(
            namespace=namespace, name=name, status=status, spec=(read_json(files.object, {}) or {}).get("spec", {}),
            reports=reports, verdicts=read_jsonl(files.drift_history), events=read_jsonl(files.events),
            serving=read_jsonl(files.serving_history), cards=cards,
            serving_windows=read_jsonl(files.verdict_history), online=read_jsonl(files.online_history),
        ))
    return records


def write_report(workdir: Path, demo: dict | None = None, out: Path | None = None) -> Path:
    """Write ``workdir/report.html`` (and copy the model cards next to it). Returns its path."""
    workdir = Path(workdir)
    out = out or workdir / REPORT_FILE
    records = collect(workdir)
    body = [f"<h1>Kompressor run report</h1><p class=dim>{_e(str(workdir))} &middot; "
            f"generated {datetime.now().astimezone().strftime('%Y-%m-%d %H:%M:%S %Z')}</p>"]
    if demo:
        body.append(_demo_summary(demo))
    if not records:
        body.append("<p>No CompressedModel has a status yet in this workdir.</p>")
    for record in records:
        body.append(_model_section(record, out.parent, demo))
    write_atomic(out, _PAGE.format(body="\n".join(body)))
    return out


# -- sections -------------------------------------------------------------------------------

def _demo_summary(demo: dict) -> str:
    rows = "".join(f"<tr><th>{_e(k)}</th><td>{_e(str(v))}</td></tr>" for k, v in demo.get("summary", {}).items())
    steps = "".join(f"<li><b>{_e(_clock(s['time']))}</b> {_e(s['what'])}</li>" for s in demo.get("steps", []))
    return f"<h2>What the demo did</h2><ol class=steps>{steps}</ol><table class=kv>{rows}</table>"


def _model_section(record: ModelRecord, out_dir: Path, demo: dict | None) -> str:
    status = record.status
    parts = [f"<h2>{_e(record.key)}</h2>", _status_summary(status)]
    parts.append("<h3>Accuracy and latency vs sparsity</h3>")
    parts.append("<p class=dim>Every candidate sparsity the search tried (green: passed every gate; red: failed "
                 "at least one). The star is the revision that was kept, as its evaluation Job measured it again "
                 "(so its latency can differ a little from the probe's). Dashed: the uncompressed baseline; "
                 "dotted: the accuracy floors the gates allow. Latencies are ONNX Runtime on this machine's CPU, "
                 "batch 1; below a tenth of a millisecond they are mostly timer noise.</p>")
    parts.append(_img(_plot_probes(record)) + _probes_table(record))
    parts.append("<h3>Gains vs the uncompressed baseline</h3>")
    parts.append("<p class=dim>Each revision's evaluation measured it beside the baseline (revision 0) in the same "
                 "process, on the same rows, with ONNX Runtime's threads pinned as the serving Pod runs them. Bars are "
                 "the candidate as a fraction of the baseline: below the dashed line (1.0) is smaller or faster. "
                 "Latency is batch 1; the gzip size is what pulling the artifact costs.</p>")
    parts.append(_img(_plot_gains(record)) + _gains_table(record))
    parts.append("<h3>Gate verdicts</h3>" + _gates_table(record))
    parts.append("<h3>Drift p-value over time</h3>")
    parts.append("<p class=dim>One point per window of served traffic tested for drift (each window is fresh, "
                 "disjoint traffic; the configured Alibi Detect "
                 "detector; for feature-wise tests such as KS, the smallest feature-wise p-value after correction). "
                 "Below the dashed threshold the check finds drift (red points); p-values under 1e-12 are drawn at "
                 "1e-12. The shaded bands show which revision was serving. A new revision's watcher starts "
                 "afresh, hence the gap after a swap. Hollow markers, where the watcher had the served model "
                 "(classifiers): prediction drift of the same windows, the predicted classes (chi-square, squares) "
                 "and the top-1 score (KS, triangles) against the model's predictions on the reference data; "
                 "informational, the drift policy acts on the filled points.</p>")
    parts.append(_img(_plot_drift(record, demo)))
    if record.online or any(r.get("online") for r in status.get("revisions") or []):
        parts.append("<h3>Online stage: candidates on live traffic</h3>")
        parts.append("<p class=dim>Each candidate judged in shadow or canary (spec.promotion.strategy) against the "
                     "revision serving then: its mean agreement with that revision on the same live requests (top-1 "
                     "for classifiers), its accuracy on requests that got a ground-truth label, and (canary) the "
                     "share of traffic it answered, as the operator folded the serving process' counts. The table "
                     "gives how each stage ended and, for a rejected candidate, which online gate failed.</p>")
        parts.append(_img(_plot_online(record)) + _online_table(record))
    parts.append("<h3>Revision timeline</h3>" + _img(_plot_timeline(record, demo)) + _revisions_table(record))
    parts.append("<h3>Events</h3>" + _events_table(record.events))
    parts.append("<h3>Model cards</h3>" + _model_cards(record, out_dir))
    return "\n".join(parts)


def _status_summary(status: dict) -> str:
    drift = status.get("drift") or {}
    current = status.get("currentRevision")
    items = {
        "Phase": status.get("phase"), "Message": status.get("message"),
        "Serving revision": None if current is None else f"r{current}" + (" (baseline)" if current == 0 else ""), "Sparsity": _fmt(status.get("sparsity")),
        "Accuracy": _fmt(status.get("accuracy")),
        "Latest drift verdict": drift.get("outcome"),
        "Latest prediction drift": _prediction_summary(drift.get("prediction")),
        "Automatic actions": status.get("autoActions"),
    }
    rows = "".join(f"<tr><th>{_e(k)}</th><td>{_e(str(v))}</td></tr>" for k, v in items.items() if v is not None)
    return f"<table class=kv>{rows}</table>"


def _prediction_summary(prediction: dict | None) -> str | None:
    if not prediction:
        return None
    tests = [f"{name} p={_fmt(prediction[key])}" for name, key in (("classes", "classPValue"), ("score", "scorePValue"))
             if prediction.get(key) is not None]
    return " ".join([str(prediction.get("outcome")), *(["(" + ", ".join(tests) + ")"] if tests else [])])


def _probes_table(record: ModelRecord) -> str:
    rows = []
    for revision, report in sorted(record.reports.items()):
        for number, probe in enumerate(report.get("probes") or [], 1):
            m, gates = probe.get("metrics") or {}, probe.get("gates") or {}
            failed = [r.get("gate", "") for r in gates.get("results", []) if r.get("outcome") != "Successful"]
            rows.append(f"<tr><td>r{revision} #{number}</td><td>{_fmt(probe.get('sparsity'))}</td><td>{_fmt(m.get('accuracy'))}"
                        f"</td><td>{_fmt(m.get('latencyP95Ms'))}</td><td class='{'successful' if gates.get('passed') else 'failed'}'>"
                        f"{'passed' if gates.get('passed') else 'failed: ' + _e(', '.join(failed))}</td></tr>")
    if not rows:
        return ""
    return ("<table><tr><th>Probe (in search order)</th><th>Sparsity</th><th>Accuracy</th><th>p95 latency (ms)</th><th>Gates</th>"
            "</tr>" + "".join(rows) + "</table>")


def _gates_table(record: ModelRecord) -> str:
    rows = []
    for rev in record.status.get("revisions", []):
        gates = rev.get("gates") or {}
        for result in gates.get("results", []):
            outcome = result.get("outcome", "")
            rows.append(
                f"<tr><td>r{rev['revision']}</td><td><code>{_e(result.get('gate', ''))}</code></td>"
                f"<td>{_fmt(result.get('value'))}</td><td>{_fmt(result.get('threshold'))}</td>"
                f"<td class='{outcome.lower()}'>{_e(outcome)}</td><td>{_e(result.get('message', ''))}</td></tr>")
    if not rows:
        return "<p>No gate was evaluated.</p>"
    return ("<table><tr><th>Revision</th><th>Gate</th><th>Measured</th><th>Threshold</th><th>Outcome</th>"
            "<th>Why</th></tr>" + "".join(rows) + "</table>")


def _revisions_table(record: ModelRecord) -> str:
    rows = []
    current = record.status.get("currentRevision")
    for rev in record.status.get("revisions", []):
        m = rev.get("metrics") or {}
        gates = rev.get("gates")
        passed = "baseline" if rev["revision"] == 0 and not gates else ("passed" if (gates or {}).get("passed")
                                                                         else "failed")
        mark = " &larr; serving" if rev["revision"] == current else ""
        rows.append(
            f"<tr><td>r{rev['revision']}{mark}</td><td>{_e(rev.get('reason') or ('baseline' if rev['revision'] == 0 else ''))}</td>"
            f"<td>{_fmt(m.get('sparsity'))}</td><td>{_fmt(m.get('accuracy'))}</td><td>{_fmt(m.get('f1'))}</td>"
            f"<td>{_fmt(m.get('latencyP95Ms'))}</td><td>{_fmt(m.get('sizeRatio'))}</td><td>{passed}</td>"
            f"<td>{_e(_clock(rev['promotedAt']) if rev.get('promotedAt') else '')}</td></tr>")
    if not rows:
        return "<p>No revision yet.</p>"
    return ("<table><tr><th>Revision</th><th>Reason</th><th>Sparsity</th><th>Accuracy</th><th>Macro-F1</th>"
            "<th>p95 latency (ms)</th><th>Size vs baseline</th><th>Gates</th><th>Last promoted</th></tr>"
            + "".join(rows) + "</table>")


def _events_table(events: list[dict]) -> str:
    if not events:
        return "<p>No events.</p>"
    rows = "".join(
        f"<tr><td>{_e(_clock(ev.get('time', '')))}</td><td class='{ev.get('type', '').lower()}'>{_e(ev.get('type', ''))}"
        f"</td><td>{_e(ev.get('reason', ''))}</td><td>{_e(ev.get('message', ''))}</td></tr>" for ev in events)
    return f"<table><tr><th>Time</th><th>Type</th><th>Reason</th><th>Message</th></tr>{rows}</table>"


def _model_cards(record: ModelRecord, out_dir: Path) -> str:
    if not record.cards:
        return "<p>No model card was written.</p>"
    folder = out_dir / MODEL_CARDS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    parts = []
    for revision, card in sorted(record.cards.items()):
        target = folder / f"{record.namespace}-{record.name}-r{revision}.md"
        shutil.copyfile(card, target)
        for extra in ("model_card.json",):
            if (card.parent / extra).is_file():
                shutil.copyfile(card.parent / extra, target.with_suffix(".json"))
        rel = target.relative_to(out_dir).as_posix()
        parts.append(f"<details><summary>Revision {revision}: <a href='{_e(rel)}'>{_e(rel)}</a></summary>"
                     f"<pre>{_e(card.read_text())}</pre></details>")
    return "".join(parts)


# -- plots ----------------------------------------------------------------------------------

def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plot_probes(record: ModelRecord) -> bytes | None:
    points, chosen, baseline = [], [], None
    for revision, report in sorted(record.reports.items()):
        baseline = baseline or (report.get("baseline") or {}).get("metrics")
        probes = report.get("probes") or []
        for probe in probes:
            m = probe.get("metrics") or {}
            points.append((probe["sparsity"], m.get("accuracy"), m.get("latencyP50Ms"), m.get("latencyP95Ms"),
                           (probe.get("gates") or {}).get("passed", False), revision))
        if not probes and report.get("sparsity") is not None:
            points.append((report["sparsity"], report.get("accuracy"), report.get("latencyP50Ms"),
                           report.get("latencyP95Ms"), (report.get("gates") or {}).get("passed", False), revision))
        chosen.append((report.get("sparsity"), report.get("accuracy"), report.get("latencyP95Ms"), revision))
    if not points:
        return None
    plt = _pyplot()
    fig, (ax_acc, ax_lat) = plt.subplots(1, 2, figsize=(11, 4))
    for ax in (ax_acc, ax_lat):
        ax.set_xlabel("sparsity (fraction of the baseline's weights removed or zero)")
        ax.grid(alpha=0.3)
    from matplotlib.lines import Line2D

    colour = ["tab:green" if p[4] else "tab:red" for p in points]
    ax_acc.scatter([p[0] for p in points], [p[1] for p in points], c=colour, s=40, zorder=3)
    ax_lat.scatter([p[0] for p in points], [p[3] for p in points], c=colour, s=40, zorder=3)
    ax_lat.scatter([p[0] for p in points], [p[2] for p in points], c=colour, s=15, marker="x", zorder=3)
    passed = Line2D([], [], ls="", marker="o", c="tab:green", label="probe: passed the gates")
    failed = Line2D([], [], ls="", marker="o", c="tab:red", label="probe: failed a gate")
    for ax, where in ((ax_acc, "center left"), (ax_lat, "lower right")):  # away from the points
        ax.add_artist(ax.legend(handles=[passed, failed], fontsize=8, loc=where))
    ax_lat.scatter([], [], c="grey", s=40, label="p95")
    ax_lat.scatter([], [], c="grey", s=15, marker="x", label="p50")
    for sparsity, accuracy, p95, revision in chosen:
        if sparsity is None:
            continue
        ax_acc.scatter([sparsity], [accuracy], marker="*", s=250, facecolor="none", edgecolor="black", zorder=4,
                       label=f"kept: revision {revision}")
        ax_lat.scatter([sparsity], [p95], marker="*", s=250, facecolor="none", edgecolor="black", zorder=4)
    if baseline:
        if baseline.get("accuracy") is not None:
            ax_acc.axhline(baseline["accuracy"], ls="--", c="grey", label="baseline (r0)")
            drop = ((record.spec.get("gates") or {}).get("maxAccuracyDrop"))
            if drop is not None:
                ax_acc.axhline(baseline["accuracy"] - drop, ls=":", c="tab:red", label=f"floor (drop ≤ {drop:g})")
        if baseline.get("latencyP95Ms") is not None:
            ax_lat.axhline(baseline["latencyP95Ms"], ls="--", c="grey", label="baseline p95")
    floor = (record.spec.get("gates") or {}).get("minAccuracy")
    if floor is not None:
        ax_acc.axhline(floor, ls=":", c="tab:orange", label=f"minAccuracy {floor:g}")
    ax_acc.set_ylabel("accuracy on the eval set")
    ax_acc.set_title("Accuracy vs sparsity")
    ax_lat.set_ylabel("latency at batch 1 (ms)")
    ax_lat.set_title("Latency vs sparsity (ONNX Runtime, CPU)")
    ax_lat.set_ylim(bottom=0)
    ax_acc.legend(fontsize=8, loc="lower left")
    ax_lat.legend(fontsize=8, loc="lower left")
    return _png(fig)


GAIN_BARS = (("sizeBytes", "size on disk"), ("compressedSizeBytes", "gzip size (pull)"),
             ("parameters", "parameters"), ("macs", "MACs"), ("latencyP50Ms", "p50 latency"),
             ("latencyP95Ms", "p95 latency"))


def _gain_reports(record: ModelRecord) -> list[tuple[int, dict, dict]]:
    """(revision, candidate metrics, baseline metrics) of the newest evaluated revisions (at most 4)."""
    out = []
    for revision, report in sorted(record.reports.items()):
        base = (report.get("baseline") or {}).get("metrics")
        if revision > 0 and base:
            out.append((revision, report, base))
    return out[-4:]


def _ratio(c: dict, b: dict, key: str) -> float | None:
    cv, bv = c.get(key), b.get(key)
    return cv / bv if isinstance(cv, (int, float)) and isinstance(bv, (int, float)) and bv else None


def _plot_gains(record: ModelRecord) -> bytes | None:
    reports = _gain_reports(record)
    if not reports:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(11, 3.8))
    width = 0.8 / len(reports)
    for i, (revision, c, b) in enumerate(reports):
        xs = [j + (i - (len(reports) - 1) / 2) * width for j in range(len(GAIN_BARS))]
        ratios = [_ratio(c, b, key) for key, _ in GAIN_BARS]
        bars = ax.bar([x for x, r in zip(xs, ratios) if r is not None], [r for r in ratios if r is not None],
                      width=width * 0.95, label=f"r{revision}" + ("" if (c.get("gates") or {}).get("passed")
                                                                     else " (failed its gates)"))
        for bar, r in zip(bars, [r for r in ratios if r is not None]):
            ax.annotate(f"{r:.2f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                        va="bottom", fontsize=7, xytext=(0, 2), textcoords="offset points")
    ax.axhline(1.0, ls="--", c="grey", label="baseline (r0) = 1.0")
    ax.set_xticks(range(len(GAIN_BARS)))
    ax.set_xticklabels([label for _, label in GAIN_BARS])
    ax.set_ylabel("candidate / baseline")
    ax.set_ylim(bottom=0)
    ax.set_title("Smaller and faster than the baseline? (lower is better)")
    ax.legend(fontsize=8, loc="upper right")
    ax.grid(alpha=0.3, axis="y")
    return _png(fig)


def _gains_table(record: ModelRecord) -> str:
    rows = []
    for revision, c, b in _gain_reports(record):
        cells = [f"r{revision}"]
        for key in ("sizeBytes", "compressedSizeBytes", "parameters", "macs", "latencyP50Ms", "latencyP95Ms",
                    "throughputRps"):
            cells.append(f"{_fmt(c.get(key))} <span class=dim>/ {_fmt(b.get(key))}</span>")
        cells.append(_fmt(c.get("speedup")))
        cells.append(_fmt(c.get("sparsity")))
        threads = c.get("latencyThreads")
        cells.append(f"{'one per core' if threads == 0 else _fmt(threads)}, {_fmt(c.get('latencyRuns'))} runs")
        rows.append("<tr>" + "".join(f"<td>{cell}</td>" for cell in cells) + "</tr>")
    if not rows:
        return ""
    return ("<table><tr><th>Revision</th><th>Size (bytes) / baseline</th><th>gzip size</th><th>Parameters</th>"
            "<th>MACs</th><th>p50 (ms)</th><th>p95 (ms)</th><th>Throughput (rows/s)</th><th>Speed-up (p50)</th>"
            "<th>Sparsity</th><th>Timing</th></tr>" + "".join(rows) + "</table>")


def _times(values: list[str]) -> list[datetime]:
    return [datetime.fromisoformat(v.replace("Z", "+00:00")).astimezone() for v in values]


def _serving_spans(record: ModelRecord, end: datetime) -> list[tuple[datetime, datetime, int]]:
    changes = [(t, s["revision"]) for t, s in zip(_times([s["time"] for s in record.serving]), record.serving)]
    spans = []
    for i, (start, revision) in enumerate(changes):
        stop = changes[i + 1][0] if i + 1 < len(changes) else end
        spans.append((start, max(stop, start), revision))
    return spans


# Events worth a line on the time plots: what the drift policy decided, when.
_EVENT_MARKS = {"DriftDetected": ("drift confirmed", "tab:orange"), "RolledBack": ("rolled back", "tab:green"),
                "Retraining": ("retraining", "tab:purple"), "Promoted": ("promoted", "tab:blue"),
                "FlappingPrevented": ("paused (flapping)", "black"), "AutoActionsExhausted": ("paused", "black")}


def _markers(record: ModelRecord, demo: dict | None) -> list[tuple[datetime, str, str]]:
    out = [(_times([mark["time"]])[0], mark["label"], mark.get("colour", "black"))
           for mark in (demo or {}).get("marks", [])]
    promoted_once = False
    for event in record.events:
        if event.get("reason") not in _EVENT_MARKS:
            continue
        if event["reason"] == "Promoted" and not promoted_once:  # the first promotion starts the timeline
            promoted_once = True
            continue
        label, colour = _EVENT_MARKS[event["reason"]]
        out.append((_times([event["time"]])[0], label, colour))
    return out


def _draw_markers(ax, record: ModelRecord, demo: dict | None) -> None:
    """Vertical lines for the demo's moments and the drift policy's events, in time order, labels
    stepped down so that close ones stay readable."""
    for i, (when, label, col) in enumerate(sorted(_markers(record, demo), key=lambda m: m[0])):
        ax.axvline(when, c=col, lw=1.5)
        ax.annotate(label, (when, 1.0 - 0.09 * i), xytext=(4, -4), textcoords="offset points", va="top",
                    fontsize=8, color=col, xycoords=("data", "axes fraction"),
                    bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.8})


def drift_points(record: ModelRecord) -> list[dict]:
    """One verdict per tested window, in order: from the watcher's own history (every window, even several
    tested between two reads of the verdict file), else the runner's copies; a window seen twice (the same
    revision, first and last capture sequence) is drawn once."""
    source = record.serving_windows or record.verdicts
    points: dict[tuple, dict] = {}
    for v in source:
        if v.get("pValue") is None or not v.get("checkedAt"):
            continue
        key = ((v.get("revision"), v.get("servingSinceSequence"), v.get("firstSequence"), v.get("lastSequence"))
               if v.get("lastSequence") is not None else (v.get("checkedAt"), id(v)))
        points[key] = v
    return sorted(points.values(), key=lambda v: v["checkedAt"])


def _plot_drift(record: ModelRecord, demo: dict | None) -> bytes | None:
    verdicts = drift_points(record)
    if not verdicts:
        return None
    plt = _pyplot()
    import matplotlib.dates as mdates

    times = _times([v["checkedAt"] for v in verdicts])
    fig, ax = plt.subplots(figsize=(11, 4))
    _shade_revisions(ax, record, times[0], times[-1])
    p_values = [max(v["pValue"], 1e-12) for v in verdicts]
    colour = ["tab:red" if v.get("isDrift") else "tab:blue" for v in verdicts]
    ax.plot(times, p_values, c="lightgrey", zorder=2)
    ax.scatter(times, p_values, c=colour, s=25, zorder=3)
    predicted = [(t, v["prediction"]) for t, v in zip(times, verdicts) if isinstance(v.get("prediction"), dict)]
    for key, marker, label in (("classPValue", "s", "prediction drift: predicted classes (chi-square)"),
                               ("scorePValue", "^", "prediction drift: top-1 score (KS)")):
        shown = [(t, max(p[key], 1e-12), p.get("outcome")) for t, p in predicted if p.get(key) is not None]
        if shown:
            ax.scatter([t for t, _, _ in shown], [v for _, v, _ in shown], marker=marker, s=30, facecolor="none",
                       edgecolor=["tab:red" if o == "Drift" else "tab:orange" for _, _, o in shown], zorder=3,
                       label=label)
    threshold = next((v.get("threshold") for v in reversed(verdicts) if v.get("threshold") is not None), None)
    if threshold:
        ax.axhline(threshold, ls="--", c="tab:red", label=f"threshold {threshold:g}")
    _draw_markers(ax, record, demo)
    ax.set_yscale("log")
    ax.set_ylabel("p-value (log scale)")
    ax.set_xlabel("time")
    ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M:%S"))
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    return _png(fig)


def _plot_online(record: ModelRecord) -> bytes | None:
    points = [p for p in record.online if p.get("time")]
    if not points:
        return None
    plt = _pyplot()
    import matplotlib.dates as mdates

    fig, (ax, share) = plt.subplots(2, 1, figsize=(11, 5), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    for revision in sorted({p["revision"] for p in points}):
        mine = [p for p in points if p["revision"] == revision]
        times = _times([p["time"] for p in mine])
        label = f"revision {revision} ({mine[-1]['strategy']}) vs revision {mine[-1].get('servingRevision')}"
        agreement = [(t, p["agreement"]) for t, p in zip(times, mine) if p.get("agreement") is not None]
        if agreement:
            ax.plot(*zip(*agreement), marker="o", ms=3, label=f"{label}: agreement")
        accuracy = [(t, p["accuracy"]) for t, p in zip(times, mine) if p.get("accuracy") is not None]
        if accuracy:
            ax.plot(*zip(*accuracy), marker="s", ms=3, ls="--", label=f"{label}: online accuracy")
        share.step(times, [p["weight"] for p in mine], where="post", label=f"revision {revision}")
    gate = (record.spec.get("promotion") or {}).get("onlineGates", {}).get("minAgreement")
    if gate is not None:
        ax.axhline(gate, ls=":", c="tab:red", label=f"minAgreement {gate:g}")
    ax.set_ylabel("agreement / accuracy")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    share.set_ylabel("canary %")
    share.set_ylim(0, 100)
    share.grid(alpha=0.3)
    share.set_xlabel("time")
    share.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M:%S"))
    return _png(fig)


def _online_table(record: ModelRecord) -> str:
    rows = []
    for revision in record.status.get("revisions") or []:
        online = revision.get("online")
        if not online:
            continue
        failing = "; ".join(f"{r['gate']} {_fmt(r.get('value'))} vs {_fmt(r.get('threshold'))} ({r['outcome']})"
                            for r in online.get("results") or [] if r.get("outcome") != "Successful")
        rows.append(f"<tr><td>{revision['revision']}</td><td>{_e(online['strategy'])}</td>"
                    f"<td>{_e(online['outcome'])}</td><td>{online.get('requests', 0)}</td>"
                    f"<td>{online.get('stepsPassed', 0)}</td><td>{_e(failing or '-')}</td></tr>")
    stage = record.status.get("online")
    if stage:
        rows.append(f"<tr><td>{stage['revision']}</td><td>{_e(stage['strategy'])}</td><td>in progress "
                    f"({_e(str(stage.get('outcome') or 'no verdict yet'))})</td>"
                    f"<td>{(stage.get('totals') or {}).get('requests', 0)}</td><td>{stage.get('step', 0)}</td>"
                    f"<td>-</td></tr>")
    if not rows:
        return ""
    return ("<table><tr><th>revision</th><th>strategy</th><th>outcome</th><th>live requests</th>"
            "<th>canary steps passed</th><th>gates not passed</th></tr>" + "".join(rows) + "</table>")


def _shade_revisions(ax, record: ModelRecord, first: datetime, last: datetime) -> None:
    cmap = ["#e8f0fe", "#fdf0e0", "#e6f4ea", "#f3e8fd", "#fce8e6"]
    for start, stop, revision in _serving_spans(record, last):
        if stop < first:
            continue
        ax.axvspan(max(start, first), stop, color=cmap[revision % len(cmap)], zorder=0)
        ax.annotate(f"serving r{revision}", (max(start, first), 0.02), xycoords=("data", "axes fraction"),
                    xytext=(3, 0), textcoords="offset points", fontsize=8, color="dimgrey")


def _plot_timeline(record: ModelRecord, demo: dict | None) -> bytes | None:
    if not record.serving:
        return None
    plt = _pyplot()
    import matplotlib.dates as mdates

    times = _times([s["time"] for s in record.serving])
    revisions = [s["revision"] for s in record.serving]
    end = max([times[-1], *[t for t, _, _ in _markers(record, demo)],
               *_times([v["checkedAt"] for v in record.verdicts if v.get("checkedAt")][-1:])])
    fig, ax = plt.subplots(figsize=(11, 2.8))
    ax.step(times + [end], revisions + [revisions[-1]], where="post", c="tab:blue", lw=2)
    ax.scatter(times, revisions, c="tab:blue", zorder=3)
    for when, revision in zip(times, revisions):
        ax.annotate(f"r{revision}", (when, revision), xytext=(4, 6), textcoords="offset points", fontsize=9)
    _draw_markers(ax, record, demo)
    ax.set_yticks(sorted(set(revisions)))
    ax.set_yticklabels([f"r{r}" + (" (baseline)" if r == 0 else "") for r in sorted(set(revisions))])
    ax.set_ylim(min(revisions) - 0.5, max(revisions) + 0.8)
    ax.set_ylabel("serving revision")
    ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M:%S"))
    ax.grid(alpha=0.3)
    return _png(fig)


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=100)
    _pyplot().close(fig)
    return buffer.getvalue()


def _img(png: bytes | None) -> str:
    if png is None:
        return "<p class=dim>(no data for this plot)</p>"
    return f"<img alt='plot' src='data:image/png;base64,{base64.b64encode(png).decode()}'>"


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return _e(str(value))


def _clock(value: str) -> str:
    try:
        return _times([value])[0].strftime("%H:%M:%S")
    except (ValueError, TypeError):
        return str(value)


def _e(text: str) -> str:
    return html.escape(text, quote=True)


def load_demo_record(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (FileNotFoundError, ValueError):
        return None


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Kompressor report</title>
<style>
body {{ font-family: system-ui, -apple-system, Segoe UI, sans-serif; max-width: 1150px; margin: 2em auto;
       padding: 0 1em; color: #222; }}
h1 {{ margin-bottom: 0.2em; }} h2 {{ border-bottom: 2px solid #ddd; padding-bottom: 0.2em; margin-top: 2em; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1em; font-size: 0.92em; }}
th, td {{ border: 1px solid #ddd; padding: 4px 8px; text-align: left; vertical-align: top; }}
th {{ background: #f6f6f6; }}
table.kv th {{ width: 12em; }}
img {{ max-width: 100%; border: 1px solid #eee; }}
.dim {{ color: #666; font-size: 0.9em; }}
.successful {{ color: #137333; font-weight: 600; }} .failed {{ color: #c5221f; font-weight: 600; }}
.inconclusive, .error, .warning {{ color: #b06000; font-weight: 600; }}
pre {{ background: #f8f8f8; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }}
ol.steps li {{ margin: 0.2em 0; }}
</style></head><body>
{body}
</body></html>
"""
