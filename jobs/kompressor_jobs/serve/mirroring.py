"""The mirrored runs of the online stage (kompressor_jobs.serve.online), off the request path: copies of answered
requests run on the other model -- the candidate in shadow, the serving model in canary -- merged into batches where
their inputs allow, and compared with what answered them. Pure: no server state, no metrics; ``mirror`` runs on the
mirror thread and its result is counted on the event loop.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

import numpy as np

from kompressor.api import defaults as d
from kompressor_jobs.serve.batching import merge_key
from kompressor_jobs.serve.model import LoadedModel

_TURNS = itertools.count()  # merged runs so far (the mirror thread's only)


@dataclass(slots=True)
class MirrorCopy:
    """One answered request to mirror: the model to run it on now, the one that answered, its feeds and rows, the
    answer's first output (None when the client did not ask for it) and ORT run time, and its feedback keys."""

    other: LoadedModel
    answered: LoadedModel
    feeds: dict[str, np.ndarray]
    rows: int
    first: np.ndarray | None
    seconds: float
    request_id: str | None
    seq: int | None


@dataclass(slots=True)
class MirroredRun:
    """One run pair: the copies compared (lone, or merged into one batch), rows compared and their summed
    agreement, both models' run times, the other model's first output per copy; and the copies the other model
    failed (``other_failed``) with the errors met (``failures``: (repr, model))."""

    copies: list[MirrorCopy] = field(default_factory=list)
    rows: int = 0
    agreement: float = 0.0
    answered_seconds: float = 0.0
    other_seconds: float = 0.0
    other_outputs: list[np.ndarray] = field(default_factory=list)
    other_failed: int = 0
    failures: list[tuple[str, LoadedModel]] = field(default_factory=list)


def agreement(task: str, candidate: np.ndarray, serving: np.ndarray) -> tuple[int, float]:
    """(rows compared, sum of their agreement) between two first outputs, rows along the first axis (a 1-D output
    of a classifier is one row of scores, of a regression or embedding model one value per row)."""
    if task == "classification":
        rows = serving.shape[0] if serving.ndim > 1 else 1
        if serving.ndim == 0 or serving.shape[-1] < 1:
            return 0, 0.0
        if candidate.shape != serving.shape:
            return rows, 0.0
        same = candidate.argmax(axis=-1) == serving.argmax(axis=-1)
        return rows, float(same.reshape(rows, -1).mean(axis=1).sum())
    rows = serving.shape[0] if serving.ndim else 1
    if candidate.shape != serving.shape:
        return rows, 0.0
    a = candidate.astype(np.float64).reshape(rows, -1)
    b = serving.astype(np.float64).reshape(rows, -1)
    if task == "embedding":
        na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
        both = na * nb
        cosine = np.where(both > 0, (a * b).sum(axis=1) / np.where(both > 0, both, 1.0), (na == nb) * 1.0)
        return rows, float(np.clip(cosine, -1.0, 1.0).sum())  # two zero rows agree; a zero and another do not
    close = np.maximum(0.0, 1.0 - np.abs(a - b) / np.maximum(np.abs(b), 1e-6))
    return rows, float(close.mean(axis=1).sum())


def mirror(task: str, shadow: bool, copies: list[MirrorCopy]) -> list[MirroredRun]:
    """Run ``copies`` on their other model (``shadow``: the candidate; else the serving model), merged into batches
    where they can be, and compare each with its answer (kompressor_jobs.serve.online says how)."""
    runs = []
    for group in _groups(copies):
        merged = _merged(task, shadow, group) if len(group) > 1 else None
        runs.extend([merged] if merged is not None else [_lone(task, shadow, c) for c in group])
    return runs


def _agreement(task: str, shadow: bool, other: np.ndarray, answered: np.ndarray) -> tuple[int, float]:
    return agreement(task, other, answered) if shadow else agreement(task, answered, other)


def _key(copy: MirrorCopy) -> tuple | None:
    """What two copies must share to be merged (the dynamic batcher's rule); None when this one cannot be."""
    inputs = merge_key(copy.other, copy.feeds)
    return None if inputs is None else (id(copy.other), id(copy.answered), inputs)


def _groups(copies: list[MirrorCopy]) -> list[list[MirrorCopy]]:
    """Copies in merge groups of at most SERVING_MIRROR_BATCH_ROWS rows, in their order (a copy that cannot be
    merged is a group of its own)."""
    groups, open_groups = [], {}
    for copy in copies:
        key = _key(copy)
        if key is None or copy.rows >= d.SERVING_MIRROR_BATCH_ROWS:
            groups.append([copy])
            continue
        group = open_groups.get(key)
        if group is not None and sum(c.rows for c in group) + copy.rows > d.SERVING_MIRROR_BATCH_ROWS:
            group = None
        if group is None:
            group = open_groups[key] = []
            groups.append(group)
        group.append(copy)
    return groups


def _timed_first(model: LoadedModel, feeds: dict) -> tuple[np.ndarray, float]:
    started = time.perf_counter()
    out = model.run(feeds, model.output_names[:1])[0]
    return out, time.perf_counter() - started


def _merged(task: str, shadow: bool, group: list[MirrorCopy]) -> MirroredRun | None:
    """One batch of ``group`` on both models (None: it failed or cannot be split; run the copies alone)."""
    head, total = group[0], sum(c.rows for c in group)
    try:
        feeds = {name: np.concatenate([c.feeds[name] for c in group]) for name in head.feeds}
        # alternate which model runs first, so that neither always finds the caches warmed by the other
        if next(_TURNS) % 2:
            other, other_s = _timed_first(head.other, feeds)
            answered, answered_s = _timed_first(head.answered, feeds)
        else:
            answered, answered_s = _timed_first(head.answered, feeds)
            other, other_s = _timed_first(head.other, feeds)
    except Exception:  # noqa: BLE001 -- onnxruntime raises its own types; each copy finds out alone
        return None
    if not (other.ndim and answered.ndim and other.shape[0] == total == answered.shape[0]):
        return None
    rows, agreed = _agreement(task, shadow, other, answered)
    bounds = np.cumsum([0, *(c.rows for c in group)])
    return MirroredRun(copies=list(group), rows=rows, agreement=agreed, answered_seconds=answered_s,
                       other_seconds=other_s, other_outputs=[other[a:b] for a, b in zip(bounds, bounds[1:])])


def _lone(task: str, shadow: bool, copy: MirrorCopy) -> MirroredRun:
    """One copy alone: the other model's run against the answer (its first output computed when it was not
    asked for)."""
    first, seconds = copy.first, copy.seconds
    if first is None:
        try:
            first, seconds = _timed_first(copy.answered, copy.feeds)
        except Exception as err:  # noqa: BLE001 -- onnxruntime raises its own types
            return MirroredRun(failures=[(repr(err), copy.answered)])
    try:
        out, other_s = _timed_first(copy.other, copy.feeds)
    except Exception as err:  # noqa: BLE001 -- onnxruntime raises its own types
        return MirroredRun(other_failed=1, failures=[(repr(err), copy.other)])
    rows, agreed = _agreement(task, shadow, out, first)
    return MirroredRun(copies=[copy], rows=rows, agreement=agreed, answered_seconds=seconds, other_seconds=other_s,
                       other_outputs=[out])
