"""What the reconcile core is told about the world. Adapters fill these in."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal, Mapping

from kompressor.api.manifest import CompressedModel
from kompressor.api.report import EvalReport
from kompressor.api.status import OnlineCounts

JobKind = Literal["prune", "evaluate"]
JobPhase = Literal["Pending", "Running", "Succeeded", "Failed"]


@dataclass(frozen=True)
class JobState:
    """A pruning or evaluation Job owned by the resource, as last seen."""

    name: str
    kind: JobKind
    revision: int
    generation: int
    phase: JobPhase
    message: str = ""  # why it failed, when it did (after its backoffLimit)
    bad_input: bool = False  # it failed on bad input (exit 2): at once, not retried
    started_at: datetime | None = None
    finished_at: datetime | None = None


@dataclass(frozen=True)
class ServingState:
    """The serving Deployment (or, embedded, the local server), as last seen."""

    revision: int | None  # the revision it serves (label kompressor.io/revision)
    ready: bool


@dataclass(frozen=True)
class OnlineReading:
    """One serving process' evidence about the candidate it runs beside the serving revision
    (``GET /v2/models/{name}/online``); counts since that process was given that candidate."""

    source: str  # the process and when it was given the candidate: a new one starts its counts at 0
    revision: int  # -1 when the process could not load the candidate (``error``)
    sha256: str
    mode: str  # shadow | canary
    weight: float
    counts: OnlineCounts
    error: str | None = None  # the process could not load the candidate


@dataclass(frozen=True)
class Observed:
    """Everything one reconcile may look at.

    The drift verdict is ``model.status.drift``: in a cluster the watcher patches it
    into the status, in embedded mode the runner copies the verdict file there.
    """

    model: CompressedModel
    now: datetime
    jobs: tuple[JobState, ...] = ()
    serving: ServingState | None = None
    # Evaluation reports the adapter could read, by revision: at least the in-flight
    # candidate's, once its evaluation Job has succeeded.
    reports: Mapping[int, EvalReport] = field(default_factory=dict)
    # What the serving processes say about the candidate of an online stage (shadow, canary); empty otherwise.
    online: tuple[OnlineReading, ...] = ()
