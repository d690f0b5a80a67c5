"""The serving process' evidence about its online-stage candidate (``GET /v2/models/{name}/online``, see
``kompressor_jobs.serve.online``) as the reconcile core's ``OnlineReading``: read the same way by the embedded
runner (its one local server) and by the operator (each ready serving Pod)."""

from __future__ import annotations

from kompressor.api.status import OnlineCounts
from kompressor.api.wire import SpecError, from_wire
from kompressor.console import log
from kompressor.core.observed import OnlineReading


def evidence_path(name: str) -> str:
    return f"/v2/models/{name}/online"


def reading_from(body) -> OnlineReading | None:
    """An OnlineReading from a ``GET /v2/models/{name}/online`` answer (None: no candidate, or unreadable)."""
    if isinstance(body, dict) and isinstance(body.get("candidate_error"), dict):
        refused = body["candidate_error"]  # --candidate could not be loaded: the server serves without it
        try:
            return OnlineReading(source=f"{body['instance']}/refused", revision=-1, sha256=str(refused["sha256"]),
                                 mode=str(refused["mode"]), weight=float(refused["weight"]), counts=OnlineCounts(),
                                 error=str(refused["error"]))
        except (KeyError, TypeError, ValueError) as err:
            log("unreadable online evidence", level="warning", error=str(err))
            return None
    if not isinstance(body, dict) or not isinstance(body.get("candidate"), dict):
        return None
    c = body["candidate"]
    try:
        counts = from_wire(OnlineCounts, {
            "requests": c["requests"], "errors": c["errors"], "dropped": c["dropped"], "compared": c["compared"],
            "agreement": c["agreement"], "labels": c.get("labels", 0), "right": c.get("right", 0),
            "servingLabels": c.get("serving_labels", 0), "servingRight": c.get("serving_right", 0),
            "candidateLatency": c["candidate_latency"], "servingLatency": c["serving_latency"]}, "online")
        return OnlineReading(source=f"{body['instance']}/{c['since']}", revision=int(c["revision"]),
                             sha256=str(c["sha256"]), mode=str(c["mode"]), weight=float(c["weight"]), counts=counts)
    except (KeyError, TypeError, ValueError, SpecError) as err:
        log("unreadable online evidence", level="warning", error=str(err))
        return None
