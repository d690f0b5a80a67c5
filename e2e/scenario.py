"""The end-to-end scenario, driven from the outside only: manifests applied, OIP v2 inference
requests sent over HTTP, status read. The same steps run on every target (see targets.py):

    create ─► Serving (compressed revision) ─► normal traffic, judged NoDrift
           ─► shifted traffic ─► drift confirmed ─► rolled back to the baseline (revision 0)
           ─► back to Serving, answering as revision 0 ─► delete ─► everything gone
"""

from __future__ import annotations

import asyncio
import copy
import os
import random
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

import aiohttp

NAME = "digits"
MODEL = {
    "apiVersion": "kompressor.io/v1alpha1",
    "kind": "CompressedModel",
    "metadata": {"name": NAME, "namespace": "default"},
    "spec": {
        "model": {"uri": "builtin://digits-mlp"},
        "data": {"train": "builtin://digits?split=train", "eval": "builtin://digits?split=eval"},
        "compression": {"pruning": {"method": "unstructured", "sparsity": 0.5, "fineTuneEpochs": 0}},
        "gates": {"maxAccuracyDrop": 0.05},
        "jobs": {"backoffLimit": 1, "activeDeadlineSeconds": 300},
        "drift": {"detector": "ks", "windowSize": 50, "checkIntervalSeconds": 1, "consecutiveWindows": 2,
                  "action": "rollback", "rollbackTo": "baseline", "cooldownSeconds": 0},
    },
}
SHIFT = 1.5  # added to every standardised feature of the shifted traffic
# Seconds; a slow cluster (image pulls, PVC provisioning) scales them with KOMPRESSOR_E2E_TIMEOUT_SCALE.
_SCALE = float(os.environ.get("KOMPRESSOR_E2E_TIMEOUT_SCALE", "1"))
DEADLINES = {step: seconds * _SCALE
             for step, seconds in {"serving": 300.0, "verdict": 90.0, "rollback": 90.0, "gone": 60.0}.items()}


@dataclass
class Traffic:
    """A real OIP v2 client sending batches of eval rows until cancelled.

    ``resolve(refresh)`` gives the server's base URL; after a connection error it is asked again
    (a Deployment rolled to a new revision may answer elsewhere, e.g. on a new port-forward).
    """

    resolve: Callable[[bool], Awaitable[str]]
    rows: list[list[float]]
    labels: list[int]
    shifted: bool = False
    answers: list[dict] = field(default_factory=list)  # {version, correct, rows, shifted}
    failures: list[str] = field(default_factory=list)

    async def run(self, session: aiohttp.ClientSession) -> None:
        rng = random.Random(0)
        url, input_name, sent = await self.resolve(False), None, 0
        while True:
            try:
                if input_name is None:
                    async with session.get(f"{url}/v2/models/{NAME}") as response:
                        assert response.status == 200, await response.text()
                        input_name = (await response.json())["inputs"][0]["name"]
                idx = [rng.randrange(len(self.rows)) for _ in range(10)]
                shifted = self.shifted
                batch = [[v + SHIFT for v in self.rows[i]] if shifted else self.rows[i] for i in idx]
                body = {"id": f"e2e-{sent}", "inputs": [{"name": input_name, "shape": [len(batch), len(batch[0])],
                                                         "datatype": "FP32", "data": [v for r in batch for v in r]}]}
                sent += 1
                async with session.post(f"{url}/v2/models/{NAME}/infer", json=body) as response:
                    payload = await response.json(content_type=None)
                    if response.status != 200:
                        self.failures.append(f"HTTP {response.status}: {payload}")
                        continue
            except (aiohttp.ClientError, asyncio.TimeoutError) as err:
                self.failures.append(repr(err))
                await asyncio.sleep(0.2)
                url, input_name = await self.resolve(True), None
                continue
            assert payload["id"] == body["id"]
            out = payload["outputs"][0]
            classes = out["shape"][-1]
            assert out["shape"] == [len(batch), classes]
            scores = [out["data"][i:i + classes] for i in range(0, len(out["data"]), classes)]
            correct = sum(int(max(range(classes), key=s.__getitem__) == self.labels[i]) for s, i in zip(scores, idx))
            self.answers.append({"version": payload.get("model_version"), "correct": correct, "rows": len(idx),
                                 "shifted": shifted})
            await asyncio.sleep(0.03)

    def accuracy(self, version: str, shifted: bool) -> float:
        picked = [a for a in self.answers if a["version"] == version and a["shifted"] == shifted]
        rows = sum(a["rows"] for a in picked)
        assert rows, f"no answers from version {version} (shifted={shifted})"
        return sum(a["correct"] for a in picked) / rows


async def wait_status(target, what: str, check: Callable[[dict], Any], deadline: float) -> dict:
    """Poll the target's status until ``check`` holds; fail naming ``what`` and the last status."""
    end = time.monotonic() + deadline
    status: dict = {}
    while time.monotonic() < end:
        status = await target.status(NAME)
        if check(status):
            return status
        await asyncio.sleep(0.2)
    raise AssertionError(f"[{target.name}] timed out after {deadline:g} s waiting for {what}; "
                         f"phase {status.get('phase')}: {status.get('message')}\n{target.diagnostics()}")


async def wait_until(target, what: str, check: Callable[[], Awaitable[bool]], deadline: float) -> None:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if await check():
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"[{target.name}] timed out after {deadline:g} s waiting for {what}\n{target.diagnostics()}")


def condition(status: dict, kind: str) -> dict:
    return next((c for c in status.get("conditions", []) if c["type"] == kind), {})


async def run_scenario(target, rows: list[list[float]], labels: list[int]) -> dict:
    """The scenario; returns timings (seconds) for the report of the test run."""
    timings = {}
    started = time.monotonic()
    await target.apply(copy.deepcopy(MODEL))

    status = await wait_status(target, "Serving a compressed revision",
                               lambda s: s.get("phase") == "Serving" and (s.get("currentRevision") or 0) >= 1,
                               DEADLINES["serving"])
    timings["create_to_serving"] = time.monotonic() - started
    compressed = status["currentRevision"]
    assert condition(status, "Ready").get("status") == "True"
    assert condition(status, "GatesPassed").get("status") == "True"

    traffic = Traffic(lambda refresh: target.inference_url(NAME, refresh), rows, labels)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        sender = asyncio.create_task(traffic.run(session))
        try:
            await wait_status(target, f"a NoDrift verdict on revision {compressed}",
                              lambda s: (s.get("drift") or {}).get("outcome") == "NoDrift"
                              and s["drift"].get("revision") == compressed, DEADLINES["verdict"])
            assert not sender.done() or sender.result()
            assert traffic.accuracy(str(compressed), shifted=False) >= 0.85

            traffic.shifted = True
            shift_at = time.monotonic()
            status = await wait_status(target, "the rollback to the baseline (revision 0)",
                                       lambda s: s.get("currentRevision") == 0, DEADLINES["rollback"])
            traffic.shifted = False  # the upstream problem is fixed: normal traffic again
            timings["shift_to_rollback"] = time.monotonic() - shift_at
            assert status.get("autoActions") == 1

            status = await wait_status(target, "Serving revision 0, Ready",
                                       lambda s: s.get("phase") == "Serving" and s.get("currentRevision") == 0
                                       and condition(s, "Ready").get("status") == "True", DEADLINES["rollback"])
            answered = len(traffic.answers)
            await wait_until(target, "answers from revision 0",
                             lambda: _true(any(a["version"] == "0" for a in traffic.answers[answered:])), 30)
            assert traffic.accuracy("0", shifted=False) >= 0.85
        finally:
            sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)
    if target.hot_swap:  # the server swapped revisions in place: not one request may have failed
        assert traffic.failures == [], traffic.failures[:5]
    assert any(a["shifted"] for a in traffic.answers)

    await target.delete(NAME)
    await wait_until(target, "the model and everything it owned to be gone", lambda: target.gone(NAME),
                     DEADLINES["gone"])
    timings["total"] = time.monotonic() - started
    return timings


async def _true(value: bool) -> bool:
    return value
