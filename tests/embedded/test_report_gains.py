"""The run report shows each revision's gains beside the baseline: a bar plot of candidate / baseline ratios
and a table of the measured values, read from the evaluation's metrics.json."""

from __future__ import annotations

import base64
import json
import re

from kompressor.embedded.report import write_report


def test_report_plots_and_tabulates_gains_vs_the_baseline(tmp_path):
    model_dir = tmp_path / "default" / "digits"
    model_dir.mkdir(parents=True)
    (model_dir / "status.json").write_text(json.dumps({"phase": "Serving", "currentRevision": 1, "revisions": [
        {"revision": 0}, {"revision": 1, "metrics": {"sparsity": 0.7}, "gates": {"passed": True, "results": []}}]}))
    baseline = {"sizeBytes": 400_000, "compressedSizeBytes": 370_000, "parameters": 100_000, "macs": 100_000,
                "latencyP50Ms": 0.20, "latencyP95Ms": 0.30, "throughputRps": 50_000.0, "accuracy": 0.97}
    candidate = {"sizeBytes": 30_000, "compressedSizeBytes": 25_000, "parameters": 30_000, "macs": 30_000,
                 "latencyP50Ms": 0.08, "latencyP95Ms": 0.12, "throughputRps": 120_000.0, "speedup": 2.5,
                 "sparsity": 0.7, "latencyThreads": 2, "latencyRuns": 1000, "accuracy": 0.965,
                 "gates": {"passed": True, "results": []}, "artifact": {"uri": "file:///x", "sha256": "0" * 64},
                 "baseline": {"metrics": baseline}}
    eval_dir = tmp_path / "store" / "default" / "digits" / "r1" / "eval"
    eval_dir.mkdir(parents=True)
    (eval_dir / "metrics.json").write_text(json.dumps(candidate))
    page = write_report(tmp_path).read_text()
    section = page[page.index("<h3>Gains vs the uncompressed baseline</h3>"):]
    section = section[:section.index("<h3>", 10)]
    png = re.search(r"data:image/png;base64,([A-Za-z0-9+/=]+)", section)
    assert png and base64.b64decode(png.group(1)).startswith(b"\x89PNG")
    row = re.search(r"<tr><td>r1</td>(.*?)</tr>", section).group(1)
    assert "<td>30000 <span class=dim>/ 400000</span></td>" in row  # size beside the baseline's
    assert "<td>2.5</td>" in row and "2, 1000 runs" in row
