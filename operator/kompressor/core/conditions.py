"""Kubernetes-style conditions: ``lastTransitionTime`` moves only when ``status`` changes."""

from __future__ import annotations

from kompressor.api.status import CONDITION_TYPES, CompressedModelStatus, Condition


def get(status: CompressedModelStatus, type_: str) -> Condition | None:
    return next((c for c in status.conditions if c.type == type_), None)


def put(status: CompressedModelStatus, type_: str, value: str, reason: str, message: str,
        generation: int, now: str) -> None:
    """Set one condition in place, keeping its transition time unless its status changed."""
    current = get(status, type_)
    if current is None:
        status.conditions.append(Condition(type=type_, status=value, reason=reason, message=message,
                                           last_transition_time=now, observed_generation=generation))
    else:
        if current.status != value or current.last_transition_time is None:
            current.last_transition_time = now
        current.status, current.reason, current.message = value, reason, message
        current.observed_generation = generation
    order = {t: i for i, t in enumerate(CONDITION_TYPES)}
    status.conditions.sort(key=lambda c: order.get(c.type, len(order)))
