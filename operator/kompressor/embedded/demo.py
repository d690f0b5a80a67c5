"""`kompressor demo`: the whole loop on the bundled digits example, then a report.

1. runs the embedded runner on the bundled manifest (demo.yaml): the builtin digits MLP is
   compressed by an accuracy-aware sparsity search and gated; the baseline serves on 127.0.0.1 while the
   compressed revision is a canary answering half of the live requests;
2. sends real OIP v2 inference requests with rows of the eval set: the canary is judged on them and promoted,
   then the drift watcher judges a few windows of this normal traffic;
3. injects drift: the same rows, shifted, until the drift watcher confirms it and the runner
   rolls back to the uncompressed baseline;
4. sends normal rows again so the recovery shows in the p-values; stops everything;
5. writes DIR/report.html (plots, gate verdicts, drift timeline, revisions, model cards).

Needs the jobs extra (numpy, scikit-learn for the bundled data; matplotlib for the report).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import Any, Callable

import yaml

from kompressor.console import log
from kompressor.embedded.layout import ModelDir, read_json, read_jsonl, write_json
from kompressor.api.manifest import parse_manifest
from kompressor.embedded.main import check_ports_free, run_until_signalled
from kompressor.embedded.runner import Runner
from kompressor.errors import UserError

MANIFEST = "demo.yaml"
NAMESPACE, NAME = "default", "digits"
EVAL_DATA = "builtin://digits?split=eval"
SHIFT = 1.5  # added to every (standardised) feature: a strong covariate shift
BATCH = 10
REQUEST_GAP_SECONDS = 0.05
NORMAL_VERDICTS = 4  # NoDrift checks of normal traffic before the drift is injected
RECOVERED_VERDICTS = 3  # NoDrift checks on the baseline before the demo stops
DEADLINE_SERVING = 240.0
DEADLINE_REACTION = 90.0
DEADLINE_RECOVERY = 45.0
DEMO_RECORD = "demo.json"


@dataclass
class Traffic:
    """Sends eval rows continuously; ``shifted`` switches to drifted rows."""

    client: Any
    X: list[list[float]]
    y: list[int]
    shifted: bool = False
    sent: int = 0
    errors: int = 0
    by_phase: dict[str, dict[str, float]] = field(default_factory=dict)
    phase: str = "normal"

    async def run(self) -> None:
        rng = random.Random(0)
        while True:
            idx = [rng.randrange(len(self.y)) for _ in range(BATCH)]
            rows = [[v + SHIFT for v in self.X[i]] if self.shifted else self.X[i] for i in idx]
            try:
                result = await self.client.infer(rows, request_id=f"demo-{self.sent}")
            except Exception as err:  # noqa: BLE001 - a failed request is counted and reported, not fatal
                self.errors += 1
                if self.errors <= 3:
                    log("request failed", level="warning", error=str(err))
                await asyncio.sleep(0.2)
                continue
            self.sent += 1
            correct = sum(int(max(range(len(s)), key=s.__getitem__) == self.y[i])
                          for s, i in zip(result.outputs, idx))
            stats = self.by_phase.setdefault(self.phase, {"rows": 0, "correct": 0, "latency_ms": 0.0, "requests": 0})
            stats["rows"] += len(idx)
            stats["correct"] += correct
            stats["latency_ms"] += result.latency_ms
            stats["requests"] += 1
            await asyncio.sleep(REQUEST_GAP_SECONDS)


class Demo:
    def __init__(self, workdir: Path, port: int):
        self.workdir = workdir
        self.port = port
        self.files = ModelDir.of(workdir, NAMESPACE, NAME)
        self.steps: list[dict] = []
        self.marks: list[dict] = []
        self.started = time.monotonic()
        self.stop = asyncio.Event()
        self._session = None

    def step(self, what: str) -> None:
        self.steps.append({"time": _now(), "what": what})
        log(f"demo: {what}")

    def mark(self, label: str, colour: str) -> None:
        self.marks.append({"time": _now(), "label": label, "colour": colour})

    def status(self) -> dict:
        return read_json(self.files.status, {}) or {}

    async def until(self, what: str, check: Callable[[], Any], deadline: float) -> Any:
        """Poll ``check`` until it returns something truthy; fail with ``what`` after ``deadline`` s."""
        end = time.monotonic() + deadline
        while time.monotonic() < end:
            if self.stop.is_set():  # SIGINT/SIGTERM: the runner is stopping its children
                raise KeyboardInterrupt
            result = check()
            if result:
                return result
            status = self.status()
            if status.get("phase") in ("Failed", "Rejected", "Paused"):
                raise UserError(f"demo: the model went {status['phase']} while waiting to {what}: "
                                f"{status.get('message')} (logs in {self.files.logs})")
            await asyncio.sleep(0.25)
        raise UserError(f"demo: gave up after {deadline:g} s waiting to {what} "
                        f"(phase {self.status().get('phase')}; logs in {self.files.logs})")

    def verdicts_since(self, since: str, revision: int | None, outcome: str) -> list[dict]:
        """Verdicts on windows tested since ``since``: from the watcher's own history (every window; the runner
        copies only the verdicts it happens to read), else the runner's copies."""
        history = read_jsonl(self.files.verdict_history)
        if history:
            after = datetime.fromisoformat(since).replace(microsecond=0)
            return [v for v in history if v.get("outcome") == outcome and v.get("revision") == revision
                    and v.get("checkedAt") and datetime.fromisoformat(v["checkedAt"].replace("Z", "+00:00")) > after]
        return [v for v in read_jsonl(self.files.drift_history)
                if v.get("outcome") == outcome and v.get("revision") == revision and v.get("seenAt", "") >= since]

    async def run(self) -> dict:
        manifest = self.workdir / "compressedmodel.yaml"
        manifest.write_text((resources.files("kompressor.embedded") / MANIFEST).read_text())
        runner = Runner(manifest, self.workdir, self.port)
        stop = self.stop
        runner_task = asyncio.create_task(run_until_signalled(runner, stop))
        traffic_task = None
        try:
            self.step("started the runner: compress digits-mlp (sparsity search), evaluate the gates")
            staged = await self.until("start the canary", lambda: self.status().get("phase") == "Canary"
                                      and self.status(), DEADLINE_SERVING)
            candidate, weight = staged["online"]["revision"], staged["online"]["weight"]
            self.step(f"revision r{candidate} passed its gates; canary: it answers {weight:g} % of live requests "
                      f"while the baseline r{staged['currentRevision']} answers the rest")
            traffic = await self._traffic(runner)
            traffic_task = asyncio.create_task(traffic.run())
            self.mark("canary", "tab:purple")
            self.step("sending normal traffic (eval rows over OIP v2 HTTP)")
            await self.until("promote the canary",
                             lambda: self.status().get("phase") == "Serving" and self.status().get("currentRevision"),
                             DEADLINE_SERVING)
            status = self.status()
            compressed = status["currentRevision"]
            online = next(r["online"] for r in status["revisions"] if r["revision"] == compressed)
            agreement = next((g["value"] for g in online["results"] if g["gate"] == "online.minAgreement"), None)
            self.step(f"canary passed on {online['requests']} live requests"
                      + (f" (agreement {agreement:.3f} with the baseline)" if agreement is not None else "")
                      + f"; serving revision r{compressed}: sparsity {status.get('sparsity', 0):.2f}, "
                      f"accuracy {status.get('accuracy', 0):.3f}")
            since = _now()
            await self.until("see the drift watcher judge normal traffic",
                             lambda: len(self.verdicts_since(since, compressed, "NoDrift")) >= NORMAL_VERDICTS,
                             DEADLINE_REACTION)
            traffic.shifted, traffic.phase = True, "shifted"
            self.mark("shifted traffic starts", "tab:red")
            self.step(f"injected drift: every feature shifted by +{SHIFT} standard deviations")
            await self.until("see the rollback to the baseline",
                             lambda: self.status().get("currentRevision") == 0
                             and self.status().get("phase") == "Serving", DEADLINE_REACTION)
            reaction = (datetime.now(timezone.utc)
                        - datetime.fromisoformat(self.marks[-1]["time"])).total_seconds()
            self.mark("normal traffic again", "tab:blue")
            self.step(f"drift confirmed and rolled back to the baseline r0, {reaction:.1f} s after the shift began")
            traffic.shifted, traffic.phase = False, "recovered"
            since = _now()
            self.step("normal traffic again: the p-values recover")
            try:
                await self.until("see normal traffic judged again",
                                 lambda: len(self.verdicts_since(since, 0, "NoDrift")) >= RECOVERED_VERDICTS,
                                 DEADLINE_RECOVERY)
            except UserError as err:  # the loop itself worked; a slow recovery is reported, not fatal
                log(str(err), level="warning")
            summary = {
                "Compressed revision": f"r{compressed} (sparsity {status.get('sparsity', 0):.2f})",
                "Canary": f"{weight:g} % of live requests, promoted after {online['requests']} of them"
                          + (f", agreement {agreement:.3f}" if agreement is not None else ""),
                "Reaction time (shift start → serving r0)": f"{reaction:.1f} s",
                "Inference requests": f"{traffic.sent} sent, {traffic.errors} failed",
                **{f"Live accuracy, {phase} traffic": f"{s['correct'] / s['rows']:.3f} on {int(s['rows'])} rows, "
                   f"mean latency {s['latency_ms'] / s['requests']:.1f} ms/request"
                   for phase, s in traffic.by_phase.items() if s["rows"]},
                "Total demo time": f"{time.monotonic() - self.started:.0f} s",
            }
            return {"steps": self.steps, "marks": self.marks, "summary": summary}
        finally:
            if traffic_task:
                traffic_task.cancel()
            stop.set()
            await runner_task
            if self._session is not None:
                await self._session.close()

    async def _traffic(self, runner: Runner) -> Traffic:
        import aiohttp

        from kompressor.embedded.oip_client import OIPClient
        from kompressor_jobs.data import load_dataset

        data = load_dataset(EVAL_DATA)
        session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        model = runner.models[f"{NAMESPACE}/{NAME}"]
        client = OIPClient(model.serving.url, NAME, session)
        self._session = session  # closed at the end of run()
        return Traffic(client=client, X=data.X.reshape(len(data.y), -1).tolist(), y=data.y.tolist())


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()


def _fresh_workdir(workdir: Path) -> None:
    """Remove what an earlier demo left in ``workdir`` (only the demo's own files)."""
    for name in (NAMESPACE, "store", "model-cards"):
        shutil.rmtree(workdir / name, ignore_errors=True)
    for name in ("report.html", DEMO_RECORD, "compressedmodel.yaml"):
        (workdir / name).unlink(missing_ok=True)


def main(args: argparse.Namespace) -> int:
    try:
        import matplotlib  # noqa: F401
        import numpy  # noqa: F401

        import kompressor_jobs.data  # noqa: F401
    except ImportError as err:
        raise UserError(f"the demo needs the jobs extra (pip install 'kompressor[jobs]'): {err}") from None
    workdir = Path(args.workdir).resolve()
    manifest = resources.files("kompressor.embedded") / MANIFEST
    check_ports_free(args.port, [parse_manifest(yaml.safe_load(manifest.read_text()))])
    workdir.mkdir(parents=True, exist_ok=True)
    _fresh_workdir(workdir)
    demo = Demo(workdir, args.port)

    from kompressor.embedded.report import write_report

    try:
        record = asyncio.run(demo.run())
    except BaseException:
        # Whatever happened, a report of what did happen helps to see why.
        record = {"steps": demo.steps, "marks": demo.marks,
                  "summary": {"Outcome": "the demo did not finish; see the steps above and the logs in "
                                         f"{demo.files.logs}"}}
        write_json(workdir / DEMO_RECORD, record)
        report = write_report(workdir, demo=record)
        log("partial report written", level="warning", report=str(report))
        raise
    write_json(workdir / DEMO_RECORD, record)
    report = write_report(workdir, demo=record)
    log("demo finished", report=str(report), **{k: v for k, v in record["summary"].items() if "Reaction" in k})
    print(f"\nReport: {report}")
    return 0
