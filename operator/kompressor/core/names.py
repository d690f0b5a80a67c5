"""Deterministic names of everything a CompressedModel owns.

Derived only from the resource and the revision/generation they serve, so that an
operator restarted at any point finds (not duplicates) what it already created.
"""

from __future__ import annotations


def job_name(model: str, kind: str, revision: int, generation: int) -> str:
    """``digits-r3-g2-prune``: at most 40 + 23 characters, within the 63 of a label value."""
    return f"{model}-r{revision}-g{generation}-{kind}"


def serving_name(model: str) -> str:
    return f"{model}-serving"


def watcher_name(model: str) -> str:
    return f"{model}-drift"


def candidate_key(namespace: str, model: str, revision: int) -> str:
    """Artifact-store key (relative to the store root) of a revision's artifact folder."""
    return f"{namespace}/{model}/r{revision}/candidate"


def eval_key(namespace: str, model: str, revision: int) -> str:
    """Artifact-store key of a revision's evaluation folder (metrics.json, model card)."""
    return f"{namespace}/{model}/r{revision}/eval"
