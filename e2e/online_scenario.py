"""The online-stage scenarios, from the outside only (manifests, OIP v2 requests, status), on the embedded and the
cluster targets. Each strategy rejects once and promotes once, over the two orders:

    create (REJECT_WITH, a 90 % sparse candidate that passes its offline gates; canary: 20 % then 60 %)
      ─► the baseline serves, the candidate sees live traffic unlike the eval data
      ─► Rejected online (agreement too low); all answers from revision 0, but a canary's share at most
    edit (PROMOTE_WITH, a 30 % sparse candidate) ─► Shadowing or Canary ─► live eval traffic
      ─► promoted: Serving the new revision (shadow: every answer from revision 0 until then) ─► delete
"""

from __future__ import annotations

import asyncio
import copy
import time

import aiohttp
import numpy as np

from scenario import DEADLINES, MODEL, NAME, wait_status, wait_until

MIN_REQUESTS = 40
STEPS = [20, 60]
FIRST_STEP = STEPS[0]
PHASES = {"shadow": "Shadowing", "canary": "Canary"}
WEIGHTS = {"shadow": 0, "canary": FIRST_STEP}  # status.online.weight as the stage starts


def online_model(strategy: str, sparsity: float, epochs: int) -> dict:
    doc = copy.deepcopy(MODEL)
    spec = doc["spec"]
    spec["drift"] = {"enabled": False}
    spec["compression"]["pruning"].update(sparsity=sparsity, fineTuneEpochs=epochs)
    spec["gates"] = {"maxAccuracyDrop": 0.1}
    spec["promotion"] = {"strategy": strategy, "canary": {"steps": STEPS},
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


async def run_online_scenario(target, eval_rows: np.ndarray, reject_with: str, promote_with: str) -> dict:
    timings, started = {}, time.monotonic()
    unlike_eval = np.random.default_rng(7).uniform(eval_rows.min(), eval_rows.max(),
                                                   size=(400, eval_rows.shape[1])).astype(np.float32)
    await target.apply(online_model(reject_with, 0.9, 3))
    status = await wait_status(target, f"the {reject_with} stage", lambda s: s.get("phase") == PHASES[reject_with],
                               DEADLINES["serving"])
    assert status["currentRevision"] == 0 and status["online"]["weight"] == WEIGHTS[reject_with]
    timings["create_to_stage"] = time.monotonic() - started

    traffic = LiveTraffic(target, unlike_eval)
    status = await judged_under(target, traffic, "the online rejection", lambda s: s.get("phase") == "Rejected",
                                DEADLINES["serving"])
    verdict = status["revisions"][-1]["online"]
    assert verdict["outcome"] == "Failed" and "online.minAgreement" in status["message"], status["message"]
    assert status["currentRevision"] == 0
    share = traffic.versions.count(str(status["revisions"][-1]["revision"])) / len(traffic.versions)
    if reject_with == "canary":
        assert 0 < share <= FIRST_STEP / 100 + 0.1, share  # never beyond its canary share (a few late answers)
    else:
        assert share == 0, share  # shadowed: never answered a client

    rejected_at = time.monotonic()
    await target.apply(online_model(promote_with, 0.3, 0))
    status = await wait_status(target, f"the next candidate's {promote_with} stage",
                               lambda s: s.get("phase") == PHASES[promote_with], DEADLINES["serving"])
    candidate = status["online"]["revision"]
    traffic = LiveTraffic(target, eval_rows.astype(np.float32))
    status = await judged_under(target, traffic, f"revision {candidate} promoted",
                                lambda s: s.get("currentRevision") == candidate, DEADLINES["serving"])
    verdict = status["revisions"][-1]["online"]
    assert verdict["outcome"] == "Successful"
    assert set(traffic.versions) <= {"0", str(candidate)} and traffic.versions.count("0") >= MIN_REQUESTS
    first = traffic.versions.index(str(candidate)) if str(candidate) in traffic.versions else len(traffic.versions)
    if promote_with == "shadow":
        assert set(traffic.versions[:first]) == {"0"}  # shadowed: clients heard only the serving revision
    else:
        assert verdict["stepsPassed"] == len(STEPS), verdict  # every canary step judged before the last
    await wait_status(target, "Serving", lambda s: s.get("phase") == "Serving", DEADLINES["rollback"])
    timings["rejected_to_promoted"] = time.monotonic() - rejected_at

    await target.delete(NAME)
    await wait_until(target, "the model and everything it owned to be gone", lambda: _gone(target), DEADLINES["gone"])
    timings["total"] = time.monotonic() - started
    return timings


async def _gone(target) -> bool:
    return await target.gone(NAME)
