"""`kompressor demo`: the whole loop on the bundled example, within its 5-minute budget, and its report."""

import base64
import json
import re
import subprocess
import sys

import pytest

from support.net import free_port, port_open

pytestmark = pytest.mark.slow


def test_demo_rolls_back_on_drift_and_writes_a_self_contained_report(tmp_path, job_env):
    workdir, port = tmp_path / "demo", free_port()
    result = subprocess.run([sys.executable, "-m", "kompressor.cli", "demo", "--workdir", str(workdir),
                             "--port", str(port)], env=job_env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert not port_open(port)  # the demo stopped its server

    status = json.loads((workdir / "default" / "digits" / "status.json").read_text())
    assert status["phase"] == "Serving" and status["currentRevision"] == 0 and status["autoActions"] == 1
    compressed = next(r for r in status["revisions"] if r["revision"] == 1)
    assert compressed["gates"]["passed"] and compressed["metrics"]["sparsity"] >= 0.5
    # really smaller, not only sparser: structured pruning and INT8 shrink the file itself
    assert compressed["metrics"]["sizeRatio"] < 0.5, compressed["metrics"]

    model_dir = workdir / "default" / "digits"
    copied = [json.loads(line) for line in (model_dir / "drift.jsonl").read_text().splitlines()]
    assert (1, "Drift") in [(v["revision"], v["outcome"]) for v in copied]  # what status.drift said: acted on
    # every window the watchers tested: disjoint and in order within each revision's serving stint
    windows = [json.loads(line) for line in (model_dir / "verdict.history.jsonl").read_text().splitlines()]
    outcomes = [(v["revision"], v["outcome"]) for v in windows]
    assert (1, "NoDrift") in outcomes and (1, "Drift") in outcomes and (0, "NoDrift") in outcomes
    for revision in (0, 1):
        firsts = [v["firstSequence"] for v in windows if v["revision"] == revision and v.get("firstSequence") is not None]
        assert firsts == sorted(set(firsts)) and all(b - a >= 100 for a, b in zip(firsts, firsts[1:]))

    record = json.loads((workdir / "demo.json").read_text())
    assert [m["label"] for m in record["marks"]][:2] == ["canary", "shifted traffic starts"]
    assert compressed["online"]["outcome"] == "Successful" and compressed["online"]["strategy"] == "canary"
    assert record["summary"]["Inference requests"].endswith(", 0 failed")

    html = (workdir / "report.html").read_text()
    plots = re.findall(r"src='data:image/png;base64,([^']+)'", html)
    assert len(plots) == 5  # probes, gains vs the baseline, drift p-values, the canary, revision timeline
    assert all(base64.b64decode(p).startswith(b"\x89PNG\r\n\x1a\n") for p in plots)
    assert not re.search(r"""(src|href)=['"](https?:)?//""", html)  # nothing fetched from elsewhere
    for text in ("Gate verdicts", "maxAccuracyDrop", "RolledBack", "shifted traffic", "OnlineGatesPassed",
                 "Online stage"):
        assert text in html
    card = workdir / "model-cards" / "default-digits-r1.md"
    assert card.is_file() and "model-cards/default-digits-r1.md" in html
