"""The online stage in the serving process: a **candidate** revision hosted beside the serving one, run on live
traffic and measured against it (``kompressor serve --candidate``, ``POST|DELETE
/v2/repository/models/{name}/candidate``, evidence at ``GET /v2/models/{name}/online``; the ``online_stage``
extension). The operator sums the evidence of every serving process and judges it (``kompressor.core.online``).

- **The candidate** is another artifact, verified (its sha256 too, when given) and loaded and warmed up as a hot
  swap loads one. It must be another revision than the one serving and take the same inputs (names, datatypes)
  and give the same outputs (names).
- **shadow**: every successful request the serving model answered is also run on the candidate, off the request
  path: a copy (feeds, the serving answer's first output, id, the serving run time) goes on a bounded queue
  (``--mirror-queue``; when full the copy is dropped and counted, ``dropped``). Clients always get the serving
  revision's answer, and never wait for the candidate.
- **canary** at ``weight`` percent: a deterministic splitter (add ``weight`` per request; at 100 or more the
  request goes to the candidate and 100 is taken off) sends exactly that share of requests to the candidate,
  which answers them (its outputs and ``model_version``); the serving model then runs on a copy of each of them
  through the same queue and batches, to compare and time it. A candidate failing a request answers the client as
  the serving model would (400/500) and counts as an error. Candidate-answered requests are not captured (the capture
  holds the serving revision's traffic only, an unbiased sample of it), and count in the request metrics under
  the candidate's revision.
- **Mirrored in batches**: one task drains the queue. It lets copies gather for ``SERVING_MIRROR_LINGER_SECONDS``
  after the first, then takes all that wait, and merges those whose inputs agree but for the batch dimension (as
  the dynamic batcher merges: same dtypes and non-batch shapes, a dynamic first dimension, at most
  ``SERVING_MIRROR_BATCH_ROWS`` rows), and runs each merged copy on both models, back to back, on a dedicated
  single-thread executor (never the default one the server runs big requests on). One ONNX Runtime run per model
  and batch, not per request, is what keeps the mirroring off the clients' latency (bench/mirroring.py): the
  event loop pays one wake-up per batch. A copy that merges with no other runs alone, on the other model only,
  against the answer's own first output and run time. A merged run that fails, or whose outputs cannot be split,
  is run again request by request, so each copy gets its own outcome.
- **Agreement** per compared row of the first outputs (``--task``): classification, top-1 (argmax over the last
  axis) equal, 1 or 0; embedding, cosine similarity; regression, ``max(0, 1 - |a - b| / max(|b|, 1e-6))``
  averaged over the row (``b`` the serving value). ``agreement`` is the sum over the ``compared`` rows. A merged
  copy compares both models' outputs on the merged batch (batching changes no answer beyond an ulp:
  kompressor_jobs.serve.batching); a lone copy, the other model's output with the answer.
- **Latency**: the ONNX Runtime run time of both models on the same copies, one observation each per run (a merged
  batch, both models back to back, in alternating order; a lone copy, the answer's run time against the other
  model's run), as counts per bucket of ``ONLINE_LATENCY_BUCKETS`` (upper bounds, +Inf last), so that counts of
  several processes add up. The ratio of the two p95s compares the models on the same inputs, on the same thread.
  With dynamic batching the serving time of a lone shadowed copy is its batched run, waiting included.
- **Labels** (``--feedback``): a label for a request the candidate answered (canary) or mirrored (shadow) counts
  for it (``labels``, ``right``: its predicted class was the label); one for the serving revision's own answers
  since the candidate was set counts in ``serving_labels``, ``serving_right``. A label that comes before the
  mirrored run is done counts for the serving revision only; refused labels count nowhere.
- **Counts** are cumulative since the candidate was set in this process (``since``, and ``instance``: fixed for
  the life of the process). Setting the same artifact (sha256 and revision) in the same mode again changes only
  the weight and keeps them; any other change, a removal, or a promotion (a hot swap to the candidate's revision)
  ends them, and drops the mirrored work still pending.

The mirrored runs and their comparison happen on the mirror thread, on inputs no one else writes; their counts are
added on the server's event loop (one thread), like everything else here: no locks.
"""

from __future__ import annotations

import asyncio
import os
import threading
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
from kompressor_jobs.serve.mirroring import MirrorCopy, MirroredRun, mirror
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


def _bucket(seconds: float) -> int:
    return bisect_left(d.ONLINE_LATENCY_BUCKETS, seconds)


async def _accepted(server, model: LoadedModel, request) -> bool:
    """Whether the serving model runs a request (that the candidate refused)."""
    try:
        await server.run_serving(model, request)
    except Exception:  # noqa: BLE001 -- whichever way it fails, it does not take it
        return False
    return True


def _lower_priority() -> None:
    """The mirror thread yields the CPU to live requests: a higher nice value for this thread only (Linux gives
    each thread its own; raising it needs no privilege). Elsewhere it stays as it is."""
    try:
        me = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, me, os.getpriority(os.PRIO_PROCESS, me) + d.SERVING_MIRROR_NICE)
    except (AttributeError, OSError):
        pass


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
        item = MirrorCopy(other, routed.model, request.feeds, request.rows, first, routed.seconds,
                          request.request_id, seq)
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
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="kompressor-mirror",
                                                initializer=_lower_priority)
        while True:
            copies = [await cand.queue.get()]
            if cand.queue.qsize() < d.SERVING_MIRROR_BATCH_ROWS:  # let a batch gather, unless one already waits
                await asyncio.sleep(d.SERVING_MIRROR_LINGER_SECONDS)
            while not cand.queue.empty():
                copies.append(cand.queue.get_nowait())
            try:
                runs = await loop.run_in_executor(self._executor, mirror, self.task, cand.mode == SHADOW, copies)
            except Exception as err:  # noqa: BLE001 -- one odd batch must not stop the mirroring
                log("mirrored runs failed", level="warning", model=self.name, copies=len(copies), error=repr(err))
                continue
            if cand is not self.candidate:
                return
            for run in runs:
                self._count_run(cand, run)

    def _count_run(self, cand: Candidate, run: MirroredRun) -> None:
        """Count one mirrored run: its copies' agreement, both models' run times, the candidate's failures."""
        for err, model in run.failures:
            log("mirrored run failed", level="warning", model=self.name, revision=model.revision, error=err)
        shadow, m, revision = cand.mode == SHADOW, self.metrics, str(cand.model.revision)
        if shadow and run.other_failed:  # the candidate failed these copies
            cand.requests += run.other_failed
            cand.errors += run.other_failed
            self._count(cand, errors=True, n=run.other_failed)
        if not run.copies:
            return
        if shadow:
            cand.requests += len(run.copies)
            self._count(cand, n=len(run.copies))
            if self.feedback is not None:
                for copy, out in zip(run.copies, run.other_outputs):
                    if copy.request_id is not None and copy.seq is not None:
                        self.feedback.remember_shadow(copy.request_id, copy.seq, cand.model.revision, out)
        cand.compared += run.rows
        cand.agreement += run.agreement
        candidate_s, serving_s = (run.other_seconds, run.answered_seconds) if shadow else \
            (run.answered_seconds, run.other_seconds)
        cand.candidate_latency[_bucket(candidate_s)] += 1
        cand.serving_latency[_bucket(serving_s)] += 1
        m.online_agreement_rows.labels(self.name, revision).inc(run.rows)
        m.online_agreement.labels(self.name, revision).inc(run.agreement)
        m.online_run_seconds.labels(self.name, revision, "candidate").observe(candidate_s)
        m.online_run_seconds.labels(self.name, revision, "serving").observe(serving_s)

    def _count(self, cand: Candidate, errors: bool = False, n: int = 1) -> None:
        counter = self.metrics.online_errors if errors else self.metrics.online_requests
        counter.labels(self.name, str(cand.model.revision), cand.mode).inc(n)

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
