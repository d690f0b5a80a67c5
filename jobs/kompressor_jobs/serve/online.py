"""The online stage in the serving process: a **candidate** revision hosted beside the serving one, run on live
traffic and measured against it (``kompressor serve --candidate``, ``POST|DELETE
/v2/repository/models/{name}/candidate``, evidence at ``GET /v2/models/{name}/online``; the ``online_stage``
extension). The operator sums the evidence of every serving process and judges it (``kompressor.core.online``).

- **The candidate** is another artifact, verified (its sha256 too, when given) and loaded and warmed up as a hot
  swap loads one. It must be another revision than the one serving and take the same inputs (names, datatypes)
  and give the same outputs (names).
- **shadow**: every successful request the serving model answered is also run on the candidate, off the request
  path: (feeds, the serving answer's first output, id, the serving run time) goes on a bounded queue
  (``--mirror-queue``; when full the copy is dropped and counted, ``dropped``). One task drains it and runs the
  candidate on a dedicated single-thread executor (never the default one the server runs big requests on), then
  compares. Clients always get the serving revision's answer, and never wait for the candidate.
- **canary** at ``weight`` percent: a deterministic splitter (add ``weight`` per request; at 100 or more the
  request goes to the candidate and 100 is taken off) sends exactly that share of requests to the candidate,
  which answers them (its outputs and ``model_version``); the serving model then runs on a copy of each of them
  through the same queue, to compare and time it. A candidate failing a request answers the client as the
  serving model would (400/500) and counts as an error. Candidate-answered requests are not captured (the capture
  holds the serving revision's traffic only, an unbiased sample of it), and count in the request metrics under
  the candidate's revision.
- **Agreement** per compared row of the first outputs (``--task``): classification, top-1 (argmax over the last
  axis) equal, 1 or 0; embedding, cosine similarity; regression, ``max(0, 1 - |a - b| / max(|b|, 1e-6))``
  averaged over the row (``b`` the serving value). ``agreement`` is the sum over the ``compared`` rows.
- **Latency**: the ONNX Runtime run time of both models on the compared requests, as counts per bucket of
  ``ONLINE_LATENCY_BUCKETS`` (upper bounds, +Inf last), so that counts of several processes add up. With dynamic
  batching the serving time of a shadowed request is its batched run, waiting included; the candidate always runs
  alone.
- **Labels** (``--feedback``): a label for a request the candidate answered (canary) or mirrored (shadow) counts
  for it (``labels``, ``right``: its predicted class was the label); one for the serving revision's own answers
  since the candidate was set counts in ``serving_labels``, ``serving_right``. A label that comes before the
  mirrored run is done counts for the serving revision only; refused labels count nowhere.
- **Counts** are cumulative since the candidate was set in this process (``since``, and ``instance``: fixed for
  the life of the process). Setting the same artifact (sha256 and revision) in the same mode again changes only
  the weight and keeps them; any other change, a removal, or a promotion (a hot swap to the candidate's revision)
  ends them, and drops the mirrored work still pending.

Everything but the mirrored ONNX Runtime runs happens on the server's event loop (one thread): no locks.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from bisect import bisect_left
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone

import numpy as np

from kompressor.api import defaults as d
from kompressor.console import log
from kompressor.errors import UserError
from kompressor_jobs.serve.model import LoadedModel
from kompressor_jobs.serve.oip import BadRequest

SHADOW, CANARY = "shadow", "canary"
MODES = (SHADOW, CANARY)
TASKS = ("classification", "regression", "embedding")
EXTENSION = "online_stage"
INSTANCE = uuid.uuid4().hex  # this serving process, for the operator to tell a restarted one from a counted one
ROUTED = "online_routed"  # the attribute run() sets on an InferRequest to mirror (a Routed), for served()


@dataclass(slots=True)
class Routed:
    """How one request was run while a candidate was set: the model that answered, its ORT run time."""

    candidate: "Candidate"
    model: LoadedModel
    seconds: float
    serving: LoadedModel  # the serving model the request was for (what a canary copy runs on)

    @property
    def by_candidate(self) -> bool:
        return self.model is self.candidate.model


def check_settings(mode: object, weight: object) -> tuple[str, float]:
    """(mode, weight) when valid; UserError otherwise. Shadow's weight is 0 (no answer comes from it)."""
    if mode not in MODES:
        raise UserError(f"the candidate mode must be shadow or canary, got {mode!r}")
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 <= weight <= 100:
        raise UserError(f"the candidate weight must be a number of percent in [0, 100], got {weight!r}")
    return mode, float(weight) if mode == CANARY else 0.0


def check_compatible(candidate: LoadedModel, serving: LoadedModel) -> None:
    """UserError unless the candidate can take the serving model's requests and answer them alike."""
    if candidate.revision == serving.revision:
        raise UserError(f"{candidate.artifact}: the candidate is revision {candidate.revision}, the one serving; "
                        f"a candidate must be another revision")
    mine, theirs = [(i.name, i.datatype) for i in candidate.inputs], [(i.name, i.datatype) for i in serving.inputs]
    if mine != theirs:
        raise UserError(f"{candidate.artifact}: the candidate's inputs {mine} are not the serving model's {theirs}")
    if candidate.output_names != serving.output_names:
        raise UserError(f"{candidate.artifact}: the candidate's outputs {candidate.output_names} are not the serving "
                        f"model's {serving.output_names}")


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


def _bucket(seconds: float) -> int:
    return bisect_left(d.ONLINE_LATENCY_BUCKETS, seconds)


async def _accepted(server, model: LoadedModel, request) -> bool:
    """Whether the serving model runs a request (that the candidate refused)."""
    try:
        await server.run_serving(model, request)
    except Exception:  # noqa: BLE001 -- whichever way it fails, it does not take it
        return False
    return True


def _timed_first(model: LoadedModel, feeds: dict) -> tuple[np.ndarray, float]:
    started = time.perf_counter()
    out = model.run(feeds, model.output_names[:1])[0]
    return out, time.perf_counter() - started


class Candidate:
    """One candidate, its settings and the counts since it was set."""

    def __init__(self, model: LoadedModel, mode: str, weight: float, queue_size: int, first_seq: int):
        self.model, self.mode, self.weight = model, mode, weight
        self.requests = self.errors = self.dropped = self.compared = 0
        self.agreement = 0.0
        self.labels = self.right = self.serving_labels = self.serving_right = 0
        self.candidate_latency = [0] * (len(d.ONLINE_LATENCY_BUCKETS) + 1)
        self.serving_latency = [0] * (len(d.ONLINE_LATENCY_BUCKETS) + 1)
        self.since = datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        self.credit = 0.0  # the canary splitter's accumulator
        self.first_seq = first_seq  # feedback: predictions remembered from this sequence number on are its stint's
        self.queue: asyncio.Queue = asyncio.Queue(queue_size)
        self.task: asyncio.Task | None = None

    def takes(self) -> bool:
        """Canary: whether the next request goes to the candidate (exactly ``weight`` % of them)."""
        self.credit += self.weight
        if self.credit >= 100.0:
            self.credit -= 100.0
            return True
        return False

    def evidence(self) -> dict:
        return {"revision": self.model.revision, "sha256": self.model.sha256, "mode": self.mode,
                "weight": self.weight, "requests": self.requests, "errors": self.errors, "dropped": self.dropped,
                "compared": self.compared, "agreement": self.agreement, "labels": self.labels, "right": self.right,
                "serving_labels": self.serving_labels, "serving_right": self.serving_right,
                "latency_buckets": [*d.ONLINE_LATENCY_BUCKETS, None],
                "candidate_latency": list(self.candidate_latency), "serving_latency": list(self.serving_latency),
                "since": self.since}


class OnlineStage:
    """The candidate of one InferenceServer (at most one), its mirror queue and task, and its metrics."""

    def __init__(self, name: str, metrics, task: str = d.MODEL_TASK, queue_size: int = d.SERVING_MIRROR_QUEUE):
        if task not in TASKS:
            raise UserError(f"--task must be one of {', '.join(TASKS)}, got {task!r}")
        if queue_size < 1:
            raise UserError(f"--mirror-queue must be positive, got {queue_size}")
        self.name, self.metrics, self.task, self.queue_size = name, metrics, task, queue_size
        self.candidate: Candidate | None = None
        # --candidate that could not be loaded at start-up: served without it, and said so in the evidence
        # (the operator then rejects it as Error) rather than exiting, which would take serving down with it
        self.refused: dict | None = None
        self.feedback = None  # the server's FeedbackStore, with --feedback
        self._executor: ThreadPoolExecutor | None = None  # mirrored runs only

    # ---- setting it ---------------------------------------------------------------------------------------

    def same(self, mode: str, sha256: str | None, revision: int | None = None, artifact=None) -> bool:
        """Whether the candidate set now is this one in this mode (then only its weight may change)."""
        cand = self.candidate
        return (cand is not None and cand.mode == mode and sha256 == cand.model.sha256
                and (revision is None or revision == cand.model.revision)
                and (artifact is None or artifact == cand.model.artifact))

    def set(self, model: LoadedModel, mode: str, weight: float) -> Candidate:
        """Make ``model`` the candidate (fresh counts), or, when it is the same artifact in the same mode, change
        only the weight."""
        if self.same(mode, model.sha256, model.revision):
            return self.reweigh(weight)
        self.clear("replaced")
        self.refused = None
        first_seq = self.feedback.remembered + 1 if self.feedback is not None else 0
        self.candidate = cand = Candidate(model, mode, weight, self.queue_size, first_seq)
        self.metrics.online_candidate_revision.labels(self.name).set(model.revision)
        self.metrics.online_candidate_weight.labels(self.name).set(weight)
        log("candidate set", model=self.name, revision=model.revision, sha256=model.sha256, mode=mode, weight=weight)
        return cand

    def reweigh(self, weight: float) -> Candidate:
        cand = self.candidate
        if cand.mode == CANARY:
            cand.weight = weight
            self.metrics.online_candidate_weight.labels(self.name).set(weight)
            log("candidate weight", model=self.name, revision=cand.model.revision, weight=weight)
        return cand

    def clear(self, why: str) -> None:
        """No candidate any more; its pending mirrored work is dropped."""
        cand, self.candidate = self.candidate, None
        if cand is None:
            return
        if cand.task is not None:
            cand.task.cancel()
        self.metrics.online_candidate_revision.labels(self.name).set(-1)
        self.metrics.online_candidate_weight.labels(self.name).set(0)
        log("candidate removed", model=self.name, revision=cand.model.revision, why=why)

    def promoted(self, serving: LoadedModel) -> None:
        """After a hot swap: the candidate's revision now serving ends the stage."""
        if self.candidate is not None and self.candidate.model.revision == serving.revision:
            self.clear("promoted")

    def evidence(self, serving: LoadedModel) -> dict:
        cand = self.candidate
        out = {"instance": INSTANCE, "serving": {"revision": serving.revision},
               "candidate": cand.evidence() if cand is not None else None}
        if cand is None and self.refused is not None:
            out["candidate_error"] = dict(self.refused)
        return out

    def close(self) -> None:
        self.clear("server stopping")
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)

    # ---- the request path -----------------------------------------------------------------------------------

    async def run(self, server, model: LoadedModel, request) -> list:
        """InferenceServer.run while a candidate is set: canary requests the splitter picks run on the candidate
        (alone), the others as usual; the requests to mirror (shadow: all; canary: those the candidate answered) are
        marked with what answered them, for served()."""
        cand = self.candidate
        if cand.mode == CANARY and cand.takes():
            started = time.perf_counter()
            try:
                results = await server._run_alone(cand.model, request)
            except Exception as err:
                if isinstance(err, BadRequest) and not await _accepted(server, model, request):
                    raise  # the serving model refuses it too: a bad request, not the candidate's failure
                cand.requests += 1
                cand.errors += 1
                self._count(cand, errors=True)
                raise
            cand.requests += 1
            self._count(cand)
            setattr(request, ROUTED, Routed(cand, cand.model, time.perf_counter() - started, model))
            return results
        if cand.mode == CANARY:  # a plain serving request
            return await server.run_serving(model, request)
        started = time.perf_counter()
        results = await server.run_serving(model, request)
        setattr(request, ROUTED, Routed(cand, model, time.perf_counter() - started, model))
        return results

    def served(self, routed: Routed, request, names: list[str], results: list, seq: int | None) -> None:
        """A request answered while ``routed.candidate`` was set: its copy goes on the mirror queue (dropped, and
        counted, when it is full). ``seq``: its feedback prediction's sequence number, if one was remembered."""
        cand = routed.candidate
        if cand is not self.candidate:
            return  # replaced or removed meanwhile
        first = results[0] if names and names[0] == routed.model.output_names[0] else None
        other = routed.serving if routed.by_candidate else cand.model
        item = (other, request.feeds, routed.model, first, routed.seconds, request.request_id, seq)
        try:
            cand.queue.put_nowait(item)
        except asyncio.QueueFull:
            cand.dropped += 1
            self.metrics.online_dropped.labels(self.name).inc()
            return
        if cand.task is None:
            cand.task = asyncio.get_running_loop().create_task(self._drain(cand))

    # ---- off the request path ---------------------------------------------------------------------------------

    async def _drain(self, cand: Candidate) -> None:
        loop = asyncio.get_running_loop()
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="kompressor-mirror")
        while True:
            other, feeds, answered, first, seconds, request_id, seq = await cand.queue.get()
            try:
                if first is None:  # the answer did not hold the first output: compute it too
                    first, seconds = await loop.run_in_executor(self._executor, _timed_first, answered, feeds)
            except Exception as err:  # noqa: BLE001 -- onnxruntime raises its own types
                log("mirrored run failed", level="warning", model=self.name, revision=answered.revision,
                    error=repr(err))
                continue
            try:
                out, other_seconds = await loop.run_in_executor(self._executor, _timed_first, other, feeds)
            except Exception as err:  # noqa: BLE001 -- onnxruntime raises its own types
                if cand.mode == SHADOW:  # the candidate failed
                    cand.requests += 1
                    cand.errors += 1
                    self._count(cand, errors=True)
                log("mirrored run failed", level="warning", model=self.name, revision=other.revision,
                    error=repr(err))
                continue
            if cand is not self.candidate:
                return
            try:
                self._compare(cand, out, other_seconds, first, seconds, request_id, seq)
            except Exception as err:  # noqa: BLE001 -- one odd output must not stop the mirroring
                log("comparison failed", level="warning", model=self.name, error=repr(err))

    def _compare(self, cand: Candidate, out: np.ndarray, other_seconds: float, first: np.ndarray, seconds: float,
                 request_id, seq: int | None) -> None:
        """Count one mirrored pair: ``out`` (run now, in ``other_seconds``) against ``first`` (the answer's)."""
        if cand.mode == SHADOW:
            cand.requests += 1
            self._count(cand)
            mine, mine_s, theirs, theirs_s = out, other_seconds, first, seconds
            if self.feedback is not None and request_id is not None and seq is not None:
                self.feedback.remember_shadow(request_id, seq, cand.model.revision, out)
        else:
            mine, mine_s, theirs, theirs_s = first, seconds, out, other_seconds
        rows, agreed = agreement(self.task, mine, theirs)
        cand.compared += rows
        cand.agreement += agreed
        cand.candidate_latency[_bucket(mine_s)] += 1
        cand.serving_latency[_bucket(theirs_s)] += 1
        revision, m = str(cand.model.revision), self.metrics
        m.online_agreement_rows.labels(self.name, revision).inc(rows)
        m.online_agreement.labels(self.name, revision).inc(agreed)
        m.online_run_seconds.labels(self.name, revision, "candidate").observe(mine_s)
        m.online_run_seconds.labels(self.name, revision, "serving").observe(theirs_s)

    def _count(self, cand: Candidate, errors: bool = False) -> None:
        counter = self.metrics.online_errors if errors else self.metrics.online_requests
        counter.labels(self.name, str(cand.model.revision), cand.mode).inc()

    # ---- labels (FeedbackStore.on_label) ----------------------------------------------------------------------

    def labelled(self, prediction, labels: list[int]) -> None:
        """An accepted label: for the candidate (canary: it answered; shadow: it mirrored) and for the serving
        revision's answers, when the prediction was made during the candidate's stint."""
        cand = self.candidate
        if cand is None or prediction.seq < cand.first_seq:
            return
        rows = len(labels)
        if prediction.revision == cand.model.revision:
            self._labels(cand, "candidate", rows, sum(c == t for c, t in zip(prediction.classes, labels)))
            return
        self._labels(cand, "serving", rows, sum(c == t for c, t in zip(prediction.classes, labels)))
        shadow = prediction.shadow
        if cand.mode == SHADOW and shadow is not None and shadow[0] == cand.model.revision and len(shadow[1]) == rows:
            self._labels(cand, "candidate", rows, sum(c == t for c, t in zip(shadow[1], labels)))

    def _labels(self, cand: Candidate, role: str, rows: int, right: int) -> None:
        if role == "candidate":
            cand.labels += rows
            cand.right += right
        else:
            cand.serving_labels += rows
            cand.serving_right += right
        revision = str(cand.model.revision)
        self.metrics.online_stage_labels.labels(self.name, revision, role).inc(rows)
        self.metrics.online_stage_right.labels(self.name, revision, role).inc(right)
