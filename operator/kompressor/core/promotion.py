"""Promotion and serving: approval, switching the serving revision (promotions and rollbacks),
noticing when serving is ready, and the Serve action."""

from __future__ import annotations

import copy

from kompressor.api import defaults as d
from kompressor.api.status import Revision
from kompressor.core import online, reasons, revisions
from kompressor.core.actions import Serve
from kompressor.core.context import Run


def approve(run: Run) -> None:
    """AwaitingApproval → Promoting once the approve annotation names the revision (or approval
    is no longer required)."""
    if run.paused or run.st.phase != "AwaitingApproval":
        return
    newest = revisions.newest_compressed(run.st)
    if newest is None or newest.gates is None or not newest.gates.passed or newest.promoted_at is not None:
        return
    offer_for_promotion(run, newest)


def offer_for_promotion(run: Run, revision: Revision) -> None:
    approval = (run.annotations.get(d.ANNOTATION_APPROVE) or "").strip()
    if run.spec.promotion.require_approval and approval != str(revision.revision):
        message = (f"revision {revision.revision} passed its gates; set annotation "
                   f"{d.ANNOTATION_APPROVE}={revision.revision} to promote it")
        if run.st.phase != "AwaitingApproval" or run.st.message != message:
            run.event(reasons.AWAITING_APPROVAL, message)
        run.phase("AwaitingApproval", message)
        return
    if run.spec.promotion.require_approval:
        run.event(reasons.APPROVED, f"Revision {revision.revision} approved by annotation {d.ANNOTATION_APPROVE}")
    if run.spec.promotion.strategy != "direct":
        online.begin(run, revision)
        return
    promote(run, revision, rollback=False)


def promote(run: Run, revision: Revision, rollback: bool) -> None:
    st = run.st
    previous = st.current_revision
    revision.promoted_at = run.stamp
    st.current_revision = revision.revision
    if not rollback:
        st.last_promoted_revision = revision.revision
    st.sparsity = revision.metrics.sparsity if revision.metrics else None
    st.accuracy = revision.metrics.accuracy if revision.metrics else None
    if rollback:
        message = f"rolling back from revision {previous} to revision {revision.revision}"
        run.phase("RollingBack", message)
        run.event(reasons.ROLLING_BACK, message[0].upper() + message[1:], warning=True)
    else:
        message = f"promoting revision {revision.revision}"
        run.phase("Promoting", message)
        run.event(reasons.PROMOTING, message[0].upper() + message[1:])


def settle_serving(run: Run) -> None:
    st = run.st
    if st.phase not in ("Promoting", "RollingBack") or not run.serving_at(st.current_revision):
        return
    rolled_back = st.phase == "RollingBack"
    message = f"serving revision {st.current_revision}"
    run.phase("Serving", message)
    if rolled_back:
        run.event(reasons.ROLLED_BACK, f"Rolled back: serving revision {st.current_revision}")
    else:
        run.event(reasons.PROMOTED, f"Promoted: serving revision {st.current_revision}")


def serve(run: Run) -> None:
    st = run.st
    revision = revisions.find(st, st.current_revision)
    if run.paused or revision is None or revision.artifact is None:
        return
    run.serves.append(Serve(revision=revision.revision, artifact=copy.deepcopy(revision.artifact),
                            drift_reference=drift_reference(run.spec, revision), candidate=online.candidate(run)))


def drift_reference(spec, revision: Revision) -> str | None:
    """Reference data of the drift watcher: the data the served revision was fit for."""
    if not spec.drift.enabled:
        return None
    if revision.reason == "retrain" and spec.data.retrain:
        return spec.data.retrain
    return spec.data.reference or spec.data.eval
