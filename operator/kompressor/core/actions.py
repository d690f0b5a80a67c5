"""What the reconcile core asks adapters to do. Adapters act; they decide nothing.

Every action is idempotent when applied twice (creates tolerate "already exists",
deletes tolerate "not found"), so a reconcile interrupted half way can simply run again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Union

from kompressor.api.status import Artifact, CompressedModelStatus


@dataclass(frozen=True)
class RunJob:
    """Start `kompressor prune` or `kompressor evaluate` for a candidate revision."""

    kind: Literal["prune", "evaluate"]
    name: str  # core.names.job_name(...)
    revision: int
    generation: int
    candidate_key: str  # artifact-store key of the candidate folder (prune writes, evaluate reads)
    eval_key: str  # artifact-store key of the evaluation folder (evaluate writes)
    retrain: bool = False  # prune fine-tunes on spec.data.retrain


@dataclass(frozen=True)
class DeleteJob:
    """Stop and remove a Job that no longer matters (e.g. the spec changed under it)."""

    name: str


@dataclass(frozen=True)
class OnlineCandidate:
    """A revision run beside the serving one: shadow (a copy of every request, answers discarded) or canary
    (``weight`` percent of requests answered by it)."""

    revision: int
    artifact: Artifact
    mode: Literal["shadow", "canary"]
    weight: float


@dataclass(frozen=True)
class Serve:
    """Make the serving workload serve ``revision`` (create, patch or hot-swap), and run the
    drift watcher against it with ``drift_reference`` as reference data (None: no watcher).
    ``candidate``: the online stage's candidate beside it (None: none; one already there is removed)."""

    revision: int
    artifact: Artifact
    drift_reference: str | None
    candidate: OnlineCandidate | None = None


@dataclass(frozen=True)
class EmitEvent:
    """A Kubernetes Event on the resource (embedded mode: a log line)."""

    type: Literal["Normal", "Warning"]
    reason: str
    message: str


@dataclass(frozen=True)
class Requeue:
    """Reconcile again after this long even if nothing changes (cooldowns, timeouts)."""

    after_seconds: float


Action = Union[RunJob, DeleteJob, Serve, EmitEvent, Requeue]


@dataclass(frozen=True)
class Decision:
    """The result of one reconcile: the status to write and the actions to take.

    Adapters write ``status`` first, then apply ``actions`` in order.
    """

    status: CompressedModelStatus
    actions: tuple[Action, ...] = field(default_factory=tuple)
