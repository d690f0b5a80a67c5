"""The performance-drift scenario (``spec.drift.performance``), from the outside only, on the embedded and the
cluster targets:

    create (a compressed revision serves; performance floor 0.5 over windows of WINDOW labels)
      ─► one-row requests with ids, answered now ─► their true labels later, in one list, every one wrong
      ─► CONSECUTIVE windows, each judged (PerformanceDrift) ─► rolled back to the baseline ─► delete

In a cluster the labels reach the serving Pod (``POST /v2/models/{name}/feedback``) and the drift watcher Pod reads
that Pod's online accuracy from the serving Service (``--serving-metrics-url``), as it would anywhere.
"""

from __future__ import annotations

import copy
import time

import aiohttp
import numpy as np

from scenario import DEADLINES, MODEL, NAME, wait_status, wait_until

WINDOW, CONSECUTIVE = 10, 2
BASELINE = 0


def performance_model() -> dict:
    doc = copy.deepcopy(MODEL)
    doc["spec"]["drift"].update(consecutiveWindows=CONSECUTIVE, checkIntervalSeconds=1,
                                performance={"minAccuracy": 0.5, "window": WINDOW, "minLabels": WINDOW // 2})
    return doc


async def _post(session: aiohttp.ClientSession, url: str, body) -> dict:
    async with session.post(url, json=body) as response:
        payload = await response.json(content_type=None)
        assert response.status == 200, f"{url}: HTTP {response.status}: {payload}"
        return payload


async def run_performance_scenario(target, eval_rows: np.ndarray) -> dict:
    timings, started = {}, time.monotonic()
    await target.apply(performance_model())
    status = await wait_status(target, "Serving a compressed revision",
                               lambda s: s.get("phase") == "Serving" and (s.get("currentRevision") or 0) >= 1,
                               DEADLINES["serving"])
    compressed = status["currentRevision"]
    timings["create_to_serving"] = time.monotonic() - started

    url = await target.inference_url(NAME, False)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        predicted = {}
        for i, row in enumerate(eval_rows[:WINDOW * CONSECUTIVE]):  # served now...
            answer = await _post(session, f"{url}/v2/models/{NAME}/infer", {
                "id": f"perf-{i}", "inputs": [{"name": "input", "shape": [1, row.size], "datatype": "FP32",
                                               "data": row.tolist()}]})
            assert answer["model_version"] == str(compressed)
            predicted[answer["id"]] = int(np.argmax(answer["outputs"][0]["data"]))
        labelled_at = time.monotonic()  # ...labelled later, all at once (a daily batch, say), every label wrong:
        burst = [{"id": i, "label": (p + 1) % 10} for i, p in predicted.items()]  # CONSECUTIVE windows in one
        answer = await _post(session, f"{url}/v2/models/{NAME}/feedback", burst)
        assert answer["accepted"] == len(burst), answer

    status = await wait_status(target, "rolled back to the baseline", lambda s: s.get("phase") == "Serving"
                               and s.get("currentRevision") == BASELINE, DEADLINES["rollback"])
    timings["labels_to_rollback"] = time.monotonic() - labelled_at
    assert status["autoActions"] == 1
    rolled = next(r for r in status["revisions"] if r["revision"] == compressed)
    assert rolled.get("driftedAt"), rolled  # the revision the verdict was about is marked drifted
    verdict = status.get("drift") or {}
    if verdict.get("revision") == compressed:  # (unless the baseline's watcher has written its own already)
        assert (verdict["reason"], verdict["consecutive"], verdict["accuracy"]) == ("PerformanceDrift", CONSECUTIVE,
                                                                                     0.0), verdict

    await target.delete(NAME)
    await wait_until(target, "the model and everything it owned to be gone", lambda: target.gone(NAME),
                     DEADLINES["gone"])
    timings["total"] = time.monotonic() - started
    return timings
