"""The online-stage scenario, from the outside only (manifests, OIP v2 requests, status), on the embedded and the
cluster targets:

    create (canary 20 % then 60 %, a 90 % sparse candidate that passes its offline gates)
      ─► the baseline serves, the candidate answers its share of live traffic unlike the eval data
      ─► Rejected online (agreement too low); it never answered more than its 20 %; all answers from revision 0
    edit (shadow, a 30 % sparse candidate) ─► Shadowing: every answer from revision 0 while it is judged
      ─► live eval traffic ─► promoted: Serving the new revision ─► delete
"""

from __future__ import annotations

import asyncio
import copy
import time

import aiohttp
import numpy as np

from scenario import DEADLINES, MODEL, NAME, wait_status, wait_until

MIN_REQUESTS = 40
FIRST_STEP = 20


def online_model(strategy: str, sparsity: float, epochs: int) -> dict:
    doc = copy.deepcopy(MODEL)
    spec = doc["spec"]
    spec["drift"] = {"enabled": False}
    spec["compression"]["pruning"].update(sparsity=sparsity, fineTuneEpochs=epochs)
    spec["gates"] = {"maxAccuracyDrop": 0.1}
    spec["promotion"] = {"strategy": strategy, "canary": {"steps": [FIRST_STEP, 60]},
                         "onlineGates": {"minRequests": MIN_REQUESTS, "minAgreement": 0.85}}
    return doc


class LiveTraffic:
    """One-row OIP v2 requests from ``rows``, in a loop, recording which revision answered each."""

    def __init__(self, target, rows: np.ndarray):
        self.target, self.rows, self.versions, self.failures = target, rows, [], []

    async def run(self, session: aiohttp.ClientSession) -> None:
        url, sent = await self.target.inference_url(NAME, False), 0
        while True:
            row = self.rows[sent % len(self.rows)]
            body = {"inputs": [{"name": "input", "shape": [1, row.size], "datatype": "FP32",
                                "data": row.tolist()}]}
            sent += 1
            try:
                async with session.post(f"{url}/v2/models/{NAME}/infer", json=body) as response:
                    payload = await response.json(content_type=None)
                    if response.status == 200:
                        self.versions.append(payload.get("model_version"))
                    else:
                        self.failures.append(f"HTTP {response.status}: {payload}")
            except (aiohttp.ClientError, asyncio.TimeoutError) as err:  # a Pod rolled: ask where it answers now
                self.failures.append(repr(err))
                await asyncio.sleep(0.2)
                url = await self.target.inference_url(NAME, True)
            await asyncio.sleep(0.01)


async def judged_under(target, traffic: LiveTraffic, what: str, check, deadline: float) -> dict:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        sender = asyncio.create_task(traffic.run(session))
        try:
            return await wait_status(target, what, check, deadline)
        finally:
            sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)


async def run_online_scenario(target, eval_rows: np.ndarray) -> dict:
    timings, started = {}, time.monotonic()
    unlike_eval = np.random.default_rng(7).uniform(eval_rows.min(), eval_rows.max(),
                                                   size=(400, eval_rows.shape[1])).astype(np.float32)
    await target.apply(online_model("canary", 0.9, 3))
    status = await wait_status(target, "the canary", lambda s: s.get("phase") == "Canary", DEADLINES["serving"])
    assert status["currentRevision"] == 0 and status["online"]["weight"] == FIRST_STEP
    timings["create_to_canary"] = time.monotonic() - started

    traffic = LiveTraffic(target, unlike_eval)
    status = await judged_under(target, traffic, "the online rejection", lambda s: s.get("phase") == "Rejected",
                                DEADLINES["serving"])
    verdict = status["revisions"][-1]["online"]
    assert verdict["outcome"] == "Failed" and "online.minAgreement" in status["message"], status["message"]
    assert status["currentRevision"] == 0
    share = traffic.versions.count(str(status["revisions"][-1]["revision"])) / len(traffic.versions)
    assert 0 < share <= FIRST_STEP / 100 + 0.1, share  # never beyond its canary share (a few late answers)

    rejected_at = time.monotonic()
    await target.apply(online_model("shadow", 0.3, 0))
    status = await wait_status(target, "shadowing the next candidate", lambda s: s.get("phase") == "Shadowing",
                               DEADLINES["serving"])
    candidate = status["online"]["revision"]
    traffic = LiveTraffic(target, eval_rows.astype(np.float32))
    status = await judged_under(target, traffic, f"revision {candidate} promoted",
                                lambda s: s.get("currentRevision") == candidate, DEADLINES["serving"])
    assert status["revisions"][-1]["online"]["outcome"] == "Successful"
    assert set(traffic.versions) <= {"0", str(candidate)} and traffic.versions.count("0") >= MIN_REQUESTS
    first = traffic.versions.index(str(candidate)) if str(candidate) in traffic.versions else len(traffic.versions)
    assert set(traffic.versions[:first]) == {"0"}  # shadowed: clients heard only the serving revision
    await wait_status(target, "Serving", lambda s: s.get("phase") == "Serving", DEADLINES["rollback"])
    timings["rejected_to_promoted"] = time.monotonic() - rejected_at

    await target.delete(NAME)
    await wait_until(target, "the model and everything it owned to be gone", lambda: _gone(target), DEADLINES["gone"])
    timings["total"] = time.monotonic() - started
    return timings


async def _gone(target) -> bool:
    return await target.gone(NAME)
