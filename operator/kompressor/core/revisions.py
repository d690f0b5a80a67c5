"""Reading and editing the revision history in ``status.revisions``."""

from __future__ import annotations

from kompressor.api.defaults import BASELINE_REVISION
from kompressor.api.status import CompressedModelStatus, Revision


def find(status: CompressedModelStatus, number: int | None) -> Revision | None:
    if number is None:
        return None
    return next((r for r in status.revisions if r.revision == number), None)


def upsert(status: CompressedModelStatus, revision: Revision) -> None:
    """Add a revision, or replace the one with the same number (recording twice is harmless)."""
    status.revisions = [r for r in status.revisions if r.revision != revision.revision] + [revision]
    status.revisions.sort(key=lambda r: r.revision)


def next_number(status: CompressedModelStatus) -> int:
    """max(known revisions, including the candidate) + 1. Deterministic, so a reconcile repeated
    after a crash picks the same number (and the same Job names) again."""
    known = [r.revision for r in status.revisions]
    if status.candidate is not None:
        known.append(status.candidate.revision)
    for number in (status.current_revision, status.last_promoted_revision):
        if number is not None:
            known.append(number)
    return max(known, default=BASELINE_REVISION) + 1


def newest_compressed(status: CompressedModelStatus) -> Revision | None:
    """The most recent non-baseline revision."""
    compressed = [r for r in status.revisions if r.revision != BASELINE_REVISION]
    return max(compressed, key=lambda r: r.revision, default=None)


def previous_promoted(status: CompressedModelStatus) -> Revision | None:
    """The revision promoted (to serving) most recently before the current one."""
    candidates = [r for r in status.revisions
                  if r.revision != status.current_revision and r.promoted_at and r.artifact is not None]
    return max(candidates, key=lambda r: (r.promoted_at, r.revision), default=None)


def trim(status: CompressedModelStatus, limit: int) -> list[int]:
    """Drop the oldest revisions beyond ``limit``; the baseline, the serving revision, the last
    promoted one and the newest one always stay (the newest keeps revision numbers monotonic).
    Returns the numbers dropped."""
    newest = max((r.revision for r in status.revisions), default=None)
    keep = {BASELINE_REVISION, status.current_revision, status.last_promoted_revision, newest}
    droppable = sorted(r.revision for r in status.revisions if r.revision not in keep)
    excess = len(status.revisions) - limit
    dropped = droppable[:max(excess, 0)]
    status.revisions = [r for r in status.revisions if r.revision not in dropped]
    return dropped
