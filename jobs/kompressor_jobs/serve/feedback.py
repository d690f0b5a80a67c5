"""Ground-truth feedback: true labels that arrive after the prediction, matched to it by the request's OIP ``id``,
and the online accuracy they give per revision (``POST /v2/models/{name}/feedback``, the ``feedback`` extension).

- **What is remembered.** Each successful inference request that has an ``id`` (the client's, or one the server
  assigned and returned) and whose answer holds the model's first output: its revision and the predicted class of
  each row (argmax over the first output's last axis; the number of classes is that axis' length). The memory is
  bounded by count (``--feedback-max-requests``): beyond it the oldest request is forgotten, and a label for it is
  then refused as ``unknown_id``. A request sent again with an id already remembered replaces the older one.
- **A label** is ``{"id": "...", "label": k}`` with ``k`` an integer class in ``[0, n_classes)`` for a one-row
  request, or a list of such integers, one per row, for a request of several rows. Each id is labelled once.
- **The window.** Per revision, the last ``--feedback-window`` labelled predictions (rows); the online accuracy is
  the share of them whose predicted class was the label. Refused labels never touch it.
- **Disjoint windows** (for the drift watcher, ``GET /v2/models/{name}/feedback/windows``): the same labelled rows,
  per revision, cut into consecutive windows of ``--feedback-window``, each completed one kept (its index and the
  rows that were right; the last ``SERVING_FEEDBACK_WINDOWS_KEPT``) so that every window is judged exactly once,
  however many complete between two checks.
- **Refusals** (each counted by reason): ``malformed`` (not an object, no string ``id``, no ``label``),
  ``unknown_id`` (never served, or forgotten), ``duplicate`` (this id has a label already),
  ``label_out_of_range`` (not an integer class in range, or not one per row), ``unauthorized`` (bearer token
  missing or wrong, when one is required).
- **A shadow candidate** (``kompressor_jobs.serve.online``): its predicted classes for a remembered request are kept
  beside the serving revision's (``remember_shadow``); ``on_label`` hears of every accepted label, for the online
  stage to count it for the candidate too. Neither touches the windows.

Everything here runs on the server's event loop (one thread): no locks.
"""

from __future__ import annotations

import hmac
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kompressor.api import defaults as d
from kompressor.errors import UserError

ACCEPTED = "accepted"
MALFORMED, UNKNOWN_ID, DUPLICATE, OUT_OF_RANGE, UNAUTHORIZED = (
    "malformed", "unknown_id", "duplicate", "label_out_of_range", "unauthorized")
# the HTTP status of each refusal of a single label (a list answers 200 when any label was accepted)
STATUS = {MALFORMED: 400, UNKNOWN_ID: 404, DUPLICATE: 409, OUT_OF_RANGE: 422, UNAUTHORIZED: 401}


def read_token(path: str | Path) -> bytes:
    """The bearer token in ``--feedback-token-file`` (surrounding whitespace stripped); UserError if unreadable or
    empty."""
    try:
        token = Path(path).read_bytes().strip()
    except OSError as err:
        raise UserError(f"--feedback-token-file {path}: cannot read it: {err}") from None
    if not token:
        raise UserError(f"--feedback-token-file {path}: the file is empty")
    return token


def authorized(header: str | None, token: bytes | None) -> bool:
    """Whether an ``Authorization`` header carries the token (constant-time comparison); True when none is needed."""
    if token is None:
        return True
    scheme, _, given = (header or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token)


@dataclass(slots=True)
class Prediction:
    revision: int
    classes: tuple[int, ...]  # predicted class per row
    n_classes: int
    labelled: bool = False
    seq: int = 0  # the order it was remembered in (FeedbackStore.remembered then)
    shadow: tuple[int, tuple[int, ...]] | None = None  # (revision, classes) of a shadow candidate, same rows


@dataclass
class Window:
    """The last ``size`` labelled predictions of one revision: 1 right, 0 wrong, and their running sum."""

    size: int
    hits: deque = field(default_factory=deque)
    right: int = 0

    def add(self, correct: bool) -> None:
        if len(self.hits) == self.size:
            self.right -= self.hits.popleft()
        self.hits.append(int(correct))
        self.right += int(correct)

    @property
    def accuracy(self) -> float:
        return self.right / len(self.hits) if self.hits else float("nan")


@dataclass
class DisjointWindows:
    """One revision's labelled predictions cut into disjoint windows of ``size``, in the order the labels came: the
    right ones of each of the last ``kept`` completed windows (by index, from 0), and the window filling now. The
    drift watcher judges each completed window once (``GET /v2/models/{name}/feedback/windows``): a burst of labels
    that completes several windows between two of its checks is several windows, not one."""

    size: int
    kept: int = d.SERVING_FEEDBACK_WINDOWS_KEPT
    completed: int = 0
    done: deque = field(default_factory=deque)  # (index, right) of the last ``kept`` completed windows
    filling: int = 0
    filling_right: int = 0

    def add(self, correct: bool) -> None:
        self.filling += 1
        self.filling_right += int(correct)
        if self.filling == self.size:
            self.done.append((self.completed, self.filling_right))
            if len(self.done) > self.kept:
                self.done.popleft()
            self.completed += 1
            self.filling = self.filling_right = 0

    def as_json(self) -> dict:
        return {"completed": self.completed, "filling": self.filling,
                "windows": [{"index": i, "right": right} for i, right in self.done]}


@dataclass
class Outcome:
    id: Any
    status: str  # ACCEPTED or a refusal reason
    message: str = ""
    revision: int | None = None  # accepted: the revision that made the prediction

    def as_json(self) -> dict:
        out = {"id": self.id, "status": ACCEPTED if self.status == ACCEPTED else "refused"}
        if self.status != ACCEPTED:
            out.update(reason=self.status, error=self.message)
        return out


class FeedbackStore:
    """Recent predictions by request id, and the online accuracy window of each revision."""

    def __init__(self, window: int, max_requests: int, on_accuracy=None):
        if window < 1 or max_requests < 1:
            raise UserError("--feedback-window and --feedback-max-requests must be positive")
        self.window, self.max_requests = window, max_requests
        self.predictions: OrderedDict[str, Prediction] = OrderedDict()
        self.windows: dict[int, Window] = {}
        self.disjoint: dict[int, DisjointWindows] = {}
        self.on_accuracy = on_accuracy or (lambda revision, window: None)  # after each accepted label
        self.on_label = lambda prediction, labels: None  # after each accepted label: the online stage's hook
        self.remembered = 0  # predictions remembered so far (the last one's seq)

    def remember(self, request_id: str, revision: int, scores: np.ndarray) -> int | None:
        """One served request: its revision and the predicted class of each row of its first output ``scores``.
        Returns the prediction's seq (None when nothing was remembered)."""
        if scores.ndim == 0 or scores.shape[-1] < 1:
            return None
        self.predictions.pop(request_id, None)  # the same id again: the newer request is the one labels refer to
        self.remembered += 1
        self.predictions[request_id] = Prediction(revision, _classes(scores), int(scores.shape[-1]),
                                                  seq=self.remembered)
        while len(self.predictions) > self.max_requests:
            self.predictions.popitem(last=False)  # the oldest is forgotten
        return self.remembered

    def remember_shadow(self, request_id: str, seq: int, revision: int, scores: np.ndarray) -> None:
        """A shadow candidate's first output for the prediction ``seq`` of ``request_id`` (ignored when that one is
        gone, replaced or labelled already)."""
        prediction = self.predictions.get(request_id)
        if prediction is None or prediction.seq != seq or prediction.labelled or scores.ndim == 0 \
                or scores.shape[-1] < 1:
            return
        prediction.shadow = (revision, _classes(scores))

    def label(self, item: Any) -> Outcome:
        """Check one label and, when it is accepted, add it to its revision's window."""
        if not isinstance(item, dict) or not isinstance(item.get("id"), str) or "label" not in item:
            return Outcome(item.get("id") if isinstance(item, dict) else None, MALFORMED,
                           'a label must be an object {"id": "<request id>", "label": <class>}')
        request_id, label = item["id"], item["label"]
        prediction = self.predictions.get(request_id)
        if prediction is None:
            return Outcome(request_id, UNKNOWN_ID, f"no recent request has the id {request_id!r} (this server "
                           f"remembers the last {self.max_requests} requests with an id)")
        if prediction.labelled:
            return Outcome(request_id, DUPLICATE, f"request {request_id!r} has a label already")
        labels = label if isinstance(label, list) else [label]
        rows, n = len(prediction.classes), prediction.n_classes
        if len(labels) != rows or not all(_is_class(x, n) for x in labels):
            shape = "an integer" if rows == 1 else f"a list of {rows} integers (one per row)"
            return Outcome(request_id, OUT_OF_RANGE, f"request {request_id!r}: the label must be {shape} in "
                           f"[0, {n}), got {label!r}")
        prediction.labelled = True
        window = self.windows.setdefault(prediction.revision, Window(self.window))
        disjoint = self.disjoint.setdefault(prediction.revision, DisjointWindows(self.window))
        for predicted, truth in zip(prediction.classes, labels):
            window.add(predicted == truth)
            disjoint.add(predicted == truth)
        self.on_accuracy(prediction.revision, window)
        self.on_label(prediction, labels)
        return Outcome(request_id, ACCEPTED, revision=prediction.revision)

    def windows_json(self) -> dict:
        """Every revision's disjoint windows (DisjointWindows), for the drift watcher."""
        return {"size": self.window, "revisions": {str(r): w.as_json() for r, w in sorted(self.disjoint.items())}}


def _classes(scores: np.ndarray) -> tuple[int, ...]:
    """The predicted class of each row (argmax over the last axis)."""
    classes = scores.reshape(-1, scores.shape[-1]).argmax(axis=1) if scores.ndim > 1 else scores.argmax()[None]
    return tuple(int(c) for c in classes)


def _is_class(value: Any, n_classes: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < n_classes
