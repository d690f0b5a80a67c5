"""Server-side dynamic batching (``kompressor serve --max-batch-size N``; ``spec.serving.batching``), as Triton's
dynamic batcher does it: concurrent requests for the same model are merged along the batch dimension into one
ONNX Runtime run, and each gets its own rows of the outputs back.

- **What merges**: requests on the same loaded model (a hot swap starts new batches; a batch formed on the old
  model runs on it), asking for the same outputs, whose inputs agree on everything but the batch dimension
  (same dtypes, same non-batch shapes). A model input without a dynamic first dimension, or a request of
  ``max_batch_size`` rows or more, runs on its own.
- **When it runs**: when adding the next request would pass ``max_batch_size`` rows (the batch runs without it,
  never over the size), when it reaches ``max_batch_size`` rows, or ``max_delay`` after its first request came,
  whichever is first. ``max_delay`` 0 still merges the requests decoded in the same event-loop pass.
- **No waiting in vain**: when nothing else could join -- no run in flight on the model, and every request the
  server holds (``in_server``: also those whose body is still being read or decoded) already waits in a batch --
  the batch runs at once (in the next event-loop pass, so requests decoded in the same pass still merge), not
  ``max_delay`` later: a lone client pays no delay. Requests that come while a run is in flight wait as above,
  and when the run ends the next batch collects them, again at once if nothing else is on its way.
- **Failures are not shared**: if the merged run fails (one request holds a value the model rejects), or its
  outputs cannot be split back (an output without the batch dimension), every request of the batch is run
  again on its own, so each gets exactly the answer or error it would have got unbatched.
- **Per request**, as without batching: validation before, and the capture and the request metrics after
  (``InferenceServer.served``) see each request's own rows. The batcher adds two histograms: rows and requests
  per ONNX Runtime run.

Batching changes no answer beyond what ONNX Runtime itself varies: some of its float kernels (ReduceSum) sum a row
in an order that depends on the row's memory alignment, so a row may differ by an ulp or two at another place in a
batch -- as it does unbatched, between two copies of the same input. MatMul/Gemm models and integer outputs come
out bit for bit the same (tests/serving/test_batching.py).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Awaitable, Callable

import numpy as np

from kompressor_jobs.serve.model import LoadedModel
from kompressor_jobs.serve.oip import InferRequest

RunOne = Callable[[LoadedModel, InferRequest], Awaitable[list]]


def merge_key(model: LoadedModel, feeds: dict[str, np.ndarray]) -> tuple | None:
    """What the inputs of two runs on ``model`` must share to be merged along the batch dimension (each input's
    dtype and non-batch shape); None when these cannot be (an input missing or without a dynamic first
    dimension, a scalar)."""
    parts = []
    for spec in model.inputs:
        array = feeds.get(spec.name)
        if array is None or array.ndim == 0 or not spec.shape or spec.shape[0] != -1:
            return None
        parts.append((array.dtype.str, array.shape[1:]))
    return tuple(parts)


@dataclass
class _Batch:
    model: LoadedModel
    outputs: list[str] | None
    rows: int = 0
    items: list[tuple[InferRequest, asyncio.Future]] = field(default_factory=list)
    timer: asyncio.Handle | None = None
    soon: bool = False  # set to run in the next loop pass (nothing else could join)


class DynamicBatcher:
    """Merges concurrent ``run`` calls; ``run_one`` runs one request (or one merged request) on the model and
    raises what the server maps to an error answer (BadRequest, InferenceFailed)."""

    def __init__(self, run_one: RunOne, max_batch_size: int, max_delay_seconds: float, observe=None,
                 in_server: Callable[[], int] | None = None):
        if max_batch_size < 2:
            raise ValueError("a dynamic batcher needs max_batch_size >= 2")
        self.run_one = run_one
        self.max_batch_size = max_batch_size
        self.max_delay = max(0.0, max_delay_seconds)
        self.observe = observe or (lambda rows, requests: None)  # per ONNX Runtime run the batcher makes
        # the requests the server holds now, whatever their stage (None: only those the batcher has seen count)
        self.in_server = in_server
        self._pending: dict[tuple, _Batch] = {}
        self._running: set[asyncio.Task] = set()
        self._runs_on: dict[int, int] = {}  # id(model) -> merged or lone runs of the batcher in flight on it

    def _nothing_else_coming(self, model: LoadedModel) -> bool:
        """No run in flight on ``model``, and no request in the server that is not waiting in a batch."""
        if self._runs_on.get(id(model)):
            return False
        waiting = sum(len(b.items) for b in self._pending.values())
        return self.in_server is None or self.in_server() <= waiting

    def _run_now_if_idle(self, model: LoadedModel) -> None:
        """Every pending batch on ``model`` runs in the next loop pass if nothing else could join it."""
        if not self._nothing_else_coming(model):
            return
        loop = asyncio.get_running_loop()
        for key, batch in list(self._pending.items()):
            if batch.model is model and not batch.soon:
                if batch.timer is not None:
                    batch.timer.cancel()
                batch.soon = True
                batch.timer = loop.call_soon(self._flush, key, batch)

    @staticmethod
    def key(model: LoadedModel, request: InferRequest) -> tuple | None:
        """What two requests must share to be merged; None when this one cannot be."""
        inputs = merge_key(model, request.feeds)
        if inputs is None:
            return None
        return id(model), inputs, tuple(request.outputs) if request.outputs else None

    async def run(self, model: LoadedModel, request: InferRequest) -> list[np.ndarray]:
        key = self.key(model, request)
        rows = request.rows
        if key is None or rows >= self.max_batch_size:
            self.observe(rows, 1)
            return await self.run_one(model, request)
        loop = asyncio.get_running_loop()
        batch = self._pending.get(key)
        if batch is not None and batch.rows + rows > self.max_batch_size:
            self._flush(key, batch)
            batch = None
        if batch is None:
            batch = self._pending[key] = _Batch(model, request.outputs)
            batch.timer = loop.call_later(self.max_delay, self._flush, key, batch)
        future = loop.create_future()
        batch.items.append((request, future))
        batch.rows += rows
        if batch.rows >= self.max_batch_size:
            self._flush(key, batch)
        else:
            self._run_now_if_idle(model)
        return await future

    def _flush(self, key: tuple, batch: _Batch) -> None:
        if self._pending.get(key) is batch:
            del self._pending[key]
        if batch.timer is not None:
            batch.timer.cancel()
            batch.timer = None
        model = id(batch.model)
        self._runs_on[model] = self._runs_on.get(model, 0) + 1
        task = asyncio.get_running_loop().create_task(self._execute(batch))
        self._running.add(task)
        task.add_done_callback(lambda done: self._ran(done, batch.model))

    def _ran(self, task: asyncio.Task, model: LoadedModel) -> None:
        self._running.discard(task)
        left = self._runs_on.pop(id(model)) - 1
        if left:
            self._runs_on[id(model)] = left
        if any(b.model is model for b in self._pending.values()):
            # the answered requests leave the server once their handlers have run: look after them
            asyncio.get_running_loop().call_soon(self._run_now_if_idle, model)

    async def _execute(self, batch: _Batch) -> None:
        items = [(r, f) for r, f in batch.items if not f.done()]  # a client gone (gRPC cancels) is not run
        if not items:
            return
        if len(items) == 1:
            await self._alone(batch.model, *items[0])
            return
        names = [spec.name for spec in batch.model.inputs]
        merged = InferRequest({n: np.concatenate([r.feeds[n] for r, _ in items]) for n in names}, batch.outputs)
        total = sum(r.rows for r, _ in items)
        try:
            results = await self.run_one(batch.model, merged)
            if not all(out.ndim and out.shape[0] == total for out in results):
                raise _CannotSplit()
        except asyncio.CancelledError:
            for _, future in items:
                future.cancel()
            raise
        except Exception:  # noqa: BLE001 -- whatever it was, each request finds out its own fate alone
            await asyncio.gather(*(self._alone(batch.model, r, f) for r, f in items))
            return
        self.observe(total, len(items))
        start = 0
        for request, future in items:
            end = start + request.rows
            if not future.done():
                future.set_result([out[start:end] for out in results])
            start = end

    async def _alone(self, model: LoadedModel, request: InferRequest, future: asyncio.Future) -> None:
        try:
            self.observe(request.rows, 1)
            result = await self.run_one(model, request)
        except asyncio.CancelledError:
            future.cancel()
            raise
        except Exception as err:  # noqa: BLE001 -- handed to the request's own handler
            if not future.done():
                future.set_exception(err)
            return
        if not future.done():
            future.set_result(result)


class _CannotSplit(Exception):
    """An output of the merged run has no batch dimension to split along."""
