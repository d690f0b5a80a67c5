"""The node-wise INT8 fallback, in the manner of NNCF's accuracy control but cheap: rank the quantized nodes
once, then search how many of the top-ranked nodes must stay in float.

Ranking, without re-quantizing (a handful of ONNX Runtime passes over the ranking rows):

1. the float graph (the one the quantizer worked on) is run with every activation tapped;
2. the INT8 graph is run *disconnected*: every node reads the float model's activations instead of its
   quantized predecessors', so each quantized node's output carries its own quantization error only;
3. a float graph with an ``Add(delta)`` behind each quantized node's output is run once per node, with that
   node's delta (its INT8 output minus its float output) fed and zeros elsewhere: the model's output when
   that node alone is quantized.

A node's score is the error of that output against the float model's (mean KL divergence of the softmax for
classification, the relative squared error otherwise): the same quantity as quantizing each node alone,
for one quantization instead of one per node. The relative error of the node's own output (its
noise-to-signal ratio) is recorded beside it. In a QDQ graph (static INT8) a node's INT8 output is the
node itself reading the float activations through their QuantizeLinear/DequantizeLinear; a node the
quantizer folded away (a Relu after a Conv or Gemm) is read after its DequantizeLinear. The ranking rows run
in batches of at most RANKING_BATCH rows, fewer when their activations would take over RANKING_BYTES.

Search: 1, 2, 4, ... of the top-ranked nodes in float until one passes the floor, then bisection down to
the fewest that pass; about 2 log2(k) re-quantizations for k nodes kept. Then pruning: the ranking scores each
node alone, but errors interact (in a QDQ graph a node kept in float stops quantizing its input, so the node
before it then quantizes what it did not before), so a prefix that passes may hold a node that only the
ranking's order put there. Without each kept node but the first and the last (without the last is the prefix
the bisection saw fail), least sensitive first, the graph is quantized again, and a node whose absence still
passes goes back to INT8: at most PRUNE_ATTEMPTS more re-quantizations. How close to the floor the search lands
depends on the CPU (onnxruntime's INT8 kernels, and 7-bit weights without VNNI), so pruning is what keeps the
result minimal on every one.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kompressor.console import log

RANKING_ROWS = 128  # validation rows the ranking runs on (one model run per node per batch of them)
RANKING_BATCH = 32  # rows per ranking pass at most (every activation of a batch is held at once) ...
RANKING_BYTES = 512 * 2**20  # ... and fewer when a batch's activations would take more than this
FLOAT_IN = "::float"
PRE = "::pre"
DELTA = "::delta"
CLASSIFICATION = "classification"
PRUNE_ATTEMPTS = 4  # re-quantizations pruning may spend on a kept set, at most


@dataclass
class Ranking:
    order: list[str]  # the nodes, most sensitive first (unranked ones last, in graph order)
    error_alone: dict[str, float]  # output error when that node alone is quantized
    local_error: dict[str, float]  # relative squared error of the node's own output (float inputs)
    unranked: list[str] = field(default_factory=list)  # nodes whose INT8 output could not be matched
    rows: int = 0
    passes: int = 0
    seconds: float = 0.0


def output_error(reference: np.ndarray, candidate: np.ndarray, task: str = CLASSIFICATION) -> float:
    """A smooth error for ranking nodes: mean KL(float || int8) of the softmax (classification), the
    relative squared error otherwise."""
    a, b = reference.reshape(len(reference), -1), candidate.reshape(len(candidate), -1)
    if task == CLASSIFICATION:
        la, lb = _log_softmax(a), _log_softmax(b)
        return float((np.exp(la) * (la - lb)).sum(1).mean())
    return float(((a - b) ** 2).sum() / max(float((a ** 2).sum()), 1e-12))


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(1, keepdims=True)
    return x - np.log(np.exp(x).sum(1, keepdims=True))


# --- ranking ---------------------------------------------------------------------------------------

def rank_nodes(float_path: Path, int8_path: Path, nodes: list[str], feeds: dict[str, np.ndarray], task: str,
               rows: int = RANKING_ROWS, batch: int = RANKING_BATCH) -> Ranking:
    """Rank ``nodes`` (names in the float graph ``float_path``, quantized in ``int8_path``) by the error of
    the model's output when each alone is quantized, measured on the first ``rows`` rows of ``feeds``."""
    import onnx

    started = time.perf_counter()
    fmodel = onnx.load(str(float_path))
    qmodel = onnx.load(str(int8_path))
    produced_f = {o for n in fmodel.graph.node for o in n.output if o}
    produced_q = {o for n in qmodel.graph.node for o in n.output if o}
    by_name = {n.name: n for n in fmodel.graph.node}
    q_by_name = {n.name: n for n in qmodel.graph.node}
    quantize_of = {n.input[0]: n.output[0] for n in qmodel.graph.node if n.op_type == "QuantizeLinear"}
    dequantize_of = {n.input[0]: n.output[0] for n in qmodel.graph.node if n.op_type == "DequantizeLinear"}
    dequantized = {t: dequantize_of[q] for t, q in quantize_of.items() if q in dequantize_of}  # T -> DQ(Q(T))
    pairs: dict[str, list[tuple[str, str]]] = {}  # node -> (float tensor, the INT8 graph's tensor for it)
    unranked: list[str] = []
    for name in nodes:
        node, same = by_name.get(name), q_by_name.get(name)
        if node is None:
            unranked.append(name)
        elif same is not None and same.op_type == node.op_type and len(same.output) == len(node.output):
            pairs[name] = [(t, u) for t, u in zip(node.output, same.output) if t and u]  # QDQ: the node itself
        elif all(t in produced_q for t in node.output if t):
            # QOperator: the replacement ends in the same name. QDQ: the node was folded into its producer's
            # output quantization (a Relu after a Conv): its value is what the DequantizeLinear gives.
            pairs[name] = [(t, dequantized.get(t, t)) for t in node.output if t]
        else:
            unranked.append(name)
    read_by_q = {i for n in qmodel.graph.node for i in n.input if i}
    taps = sorted(read_by_q & produced_f)  # float activations the INT8 graph reads
    watched = sorted({u for ps in pairs.values() for _, u in ps})
    first_output = fmodel.graph.output[0].name

    fixed = _fixed_batch(fmodel)
    floats = sorted({t for ps in pairs.values() for t, _ in ps})
    tapped = _with_outputs(fmodel, sorted(set(taps) | set(floats)))
    tap_session = _session(tapped)
    n = min(rows, _rows(feeds))
    if fixed and n >= fixed:
        n -= n % fixed  # whole batches only
    error_alone = {name: 0.0 for name in pairs}
    local_num = {name: 0.0 for name in pairs}
    local_den = {name: 0.0 for name in pairs}
    disconnected = injected = None
    delta_names: list[str] = []
    passes = 0
    start, size = 0, fixed or min(2, batch)  # the first batch measures the activations' size per row
    while start < n:
        feed = {k: v[start:min(start + size, n)] for k, v in feeds.items()}
        rows_here = len(next(iter(feed.values())))
        start += rows_here
        values = dict(zip([o.name for o in tap_session.get_outputs()], tap_session.run(None, feed)))
        passes += 1
        if disconnected is None:  # built on the first batch: its inputs' dtypes come from the values
            per_row = sum(v.nbytes for v in values.values()) / max(rows_here, 1)
            size = fixed or max(1, min(batch, int(RANKING_BYTES // max(per_row, 1))))
            disconnected = _session(_disconnect(qmodel, taps, watched, values))
            for name in list(pairs):
                if not all(values[t].dtype.kind == "f" for t, _ in pairs[name]):
                    unranked.append(name)
                    del pairs[name], error_alone[name], local_num[name], local_den[name]
            injected = _session(_inject(fmodel, sorted({t for ps in pairs.values() for t, _ in ps})))
            delta_names = [i.name for i in injected.get_inputs() if i.name.endswith(DELTA)]
        local = dict(zip(watched, disconnected.run(watched, {**feed, **{t + FLOAT_IN: values[t] for t in taps}})))
        passes += 1
        reference = values[first_output]
        zeros = {d: np.zeros((1,) * values[d[:-len(DELTA)]].ndim, values[d[:-len(DELTA)]].dtype) for d in delta_names}
        for name, ps in pairs.items():
            if any(local[u].shape != values[t].shape for t, u in ps):
                continue  # the INT8 tensor is not the float one (a reshaped output): left at zero error
            deltas = {t + DELTA: (local[u] - values[t]).astype(values[t].dtype) for t, u in ps}
            out = injected.run([first_output], {**feed, **zeros, **deltas})[0]
            passes += 1
            error_alone[name] += output_error(reference.astype(np.float64), out.astype(np.float64), task) * rows_here
            for t, u in ps:
                local_num[name] += float(((local[u].astype(np.float64) - values[t]) ** 2).sum())
                local_den[name] += float((values[t].astype(np.float64) ** 2).sum())
    error_alone = {k: v / max(n, 1) for k, v in error_alone.items()}
    local_error = {k: local_num[k] / max(local_den[k], 1e-30) for k in pairs}
    ranked = sorted(pairs, key=lambda k: (-error_alone[k], -local_error[k]))
    unranked = [name for name in nodes if name in set(unranked)]
    return Ranking(ranked + unranked, error_alone, local_error, unranked, n, passes,
                   round(time.perf_counter() - started, 3))


def _fixed_batch(model) -> int | None:
    """The graph's fixed batch size (a first dimension with a value), or None when it is dynamic."""
    inits = {i.name for i in model.graph.initializer}
    for i in model.graph.input:
        dims = i.type.tensor_type.shape.dim if i.name not in inits else []
        if dims and dims[0].HasField("dim_value") and dims[0].dim_value > 0:
            return int(dims[0].dim_value)
    return None


def _with_outputs(model, names: list[str]):
    """A copy of ``model`` that also returns the tensors ``names`` (their types left to ONNX Runtime)."""
    import onnx
    from onnx import helper

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    present = {o.name for o in copy.graph.output}
    types = _elem_types(copy)
    for name in names:
        if name not in present:
            copy.graph.output.append(helper.make_tensor_value_info(name, types.get(name, onnx.TensorProto.FLOAT), None))
    return copy


def _disconnect(qmodel, taps: list[str], watched: list[str], values: dict[str, np.ndarray]):
    """The INT8 graph with every read of a float activation in ``taps`` turned into a graph input
    ``<name>::float``, returning the ``watched`` outputs."""
    import onnx
    from onnx import helper

    copy = onnx.ModelProto()
    copy.CopyFrom(qmodel)
    tapped = set(taps)
    for node in copy.graph.node:
        for k, name in enumerate(node.input):
            if name in tapped:
                node.input[k] = name + FLOAT_IN
    for name in taps:
        copy.graph.input.append(helper.make_tensor_value_info(
            name + FLOAT_IN, helper.np_dtype_to_tensor_dtype(values[name].dtype), None))
    types = _elem_types(copy)
    del copy.graph.output[:]
    for name in watched:
        copy.graph.output.append(helper.make_tensor_value_info(
            name, types.get(name, onnx.TensorProto.FLOAT), None))
    return copy


def _inject(fmodel, tensors: list[str]):
    """The float graph with each tensor T of ``tensors`` replaced by ``T::pre + T::delta`` (a graph input)."""
    import onnx
    from onnx import helper

    copy = onnx.ModelProto()
    copy.CopyFrom(fmodel)
    types = _elem_types(copy)
    wanted = set(tensors)
    adds = []
    for node in copy.graph.node:
        for k, name in enumerate(node.output):
            if name in wanted:
                node.output[k] = name + PRE
                adds.append(helper.make_node("Add", [name + PRE, name + DELTA], [name], name=f"{name}::inject"))
    copy.graph.node.extend(adds)  # ONNX Runtime sorts the graph topologically
    for name in tensors:
        copy.graph.input.append(helper.make_tensor_value_info(name + DELTA, types.get(name, onnx.TensorProto.FLOAT),
                                                              None))
    return copy


def _elem_types(model) -> dict[str, int]:
    g = model.graph
    return {v.name: v.type.tensor_type.elem_type for v in [*g.value_info, *g.input, *g.output]
            if v.type.HasField("tensor_type") and v.type.tensor_type.elem_type}


def _session(model):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 0  # one per core, as the fidelity runs
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _rows(feeds: dict[str, np.ndarray]) -> int:
    return min((len(v) for v in feeds.values()), default=0)


# --- search ----------------------------------------------------------------------------------------

def fallback_limit(quantized: int, max_nodes: int | None, max_fraction: float) -> int:
    """Most nodes the fallback may keep in float: ``max_fraction`` of the quantized nodes (rounded up),
    and at most ``max_nodes`` when set."""
    limit = math.ceil(max(0.0, max_fraction) * quantized - 1e-9)
    if max_nodes is not None:
        limit = min(limit, max_nodes)
    return max(0, min(limit, quantized))


def search_counts(limit: int, passes: Callable[[int], bool]) -> int | None:
    """The fewest top-ranked nodes in float that pass: 1, 2, 4, ... (ending at ``limit``) until one passes,
    then bisection between the last failure and it. None when even ``limit`` fails."""
    last_fail, count = 0, 1
    while True:
        count = min(count, limit)
        if passes(count):
            break
        if count >= limit:
            return None
        last_fail, count = count, count * 2
    lo, hi = last_fail, count
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if passes(mid):
            hi = mid
        else:
            lo = mid
    return hi


def run_fallback(attempt: Callable[[list[str], Path], float], float_path: Path, first_int8: Path, tmp: Path,
                 quantized: list[str], validation: dict[str, np.ndarray], task: str, floor: float, limit: int,
                 best_path: Path, best_value: float, quantizations: Callable[[], int]):
    """Rank, then search; returns (path, value, nodes kept in float, facts)."""
    started = time.perf_counter()
    ranking = rank_nodes(float_path, first_int8, quantized, validation, task)
    log("int8 fallback ranking", nodes=len(ranking.order), rows=ranking.rows, seconds=ranking.seconds,
        top=", ".join(ranking.order[:5]))
    order = ranking.order
    tried: dict[int, float] = {0: best_value}
    paths: dict[int, Path] = {0: best_path}

    def passes(count: int) -> bool:
        if count not in tried:
            path = tmp / f"int8-{count}.onnx"
            tried[count], paths[count] = attempt(order[:count], path), path
            log("int8 fallback step", nodes_in_float=count, value=round(tried[count], 5), floor=floor)
        return tried[count] >= floor

    found = search_counts(limit, passes) if limit > 0 else None
    count = found if found is not None else max(tried, key=lambda c: (tried[c], -c))
    kept, path, value = order[:count], paths[count], tried[count]
    pruned: list[dict] = []
    if found is not None:
        kept, path, value, pruned = _prune(attempt, tmp, kept, floor, path, value)
    metric = "meanKlDivergence" if task == CLASSIFICATION else "relativeSquaredError"

    def why(name: str) -> dict:
        row = {"node": name}
        if name in ranking.error_alone:
            row.update(errorAloneQuantized=float(f"{ranking.error_alone[name]:.4g}"),
                       localRelativeError=float(f"{ranking.local_error[name]:.4g}"))
        else:
            row["unranked"] = True
        return row

    facts = {
        "nodesInFloat": kept, "passed": found is not None, "limit": limit,
        "why": [why(name) for name in kept],
        "ranking": {"rows": ranking.rows, "metric": metric, "method": "each node's INT8 output injected alone "
                    "into the float model (one quantization, no re-quantization per node)",
                    "rankedNodes": len(order) - len(ranking.unranked), "unranked": ranking.unranked,
                    "passes": ranking.passes, "seconds": ranking.seconds,
                    "top": [why(name) for name in order[:10]]},
        "tried": [{"nodesInFloat": c, "value": round(float(v), 6)} for c, v in sorted(tried.items())] + pruned,
        "pruned": [row["without"] for row in pruned if row["passed"]],
        "quantizations": quantizations(), "seconds": round(time.perf_counter() - started, 3),
    }
    log("int8 fallback", passed=found is not None, nodes_in_float=len(kept), value=round(value, 5),
        nodes=", ".join(kept[:8]) + (" ..." if len(kept) > 8 else ""))
    return path, value, kept, facts


def _prune(attempt: Callable[[list[str], Path], float], tmp: Path, kept: list[str], floor: float, path: Path,
           value: float) -> tuple[list[str], Path, float, list[dict]]:
    """The kept set without each node that it passes without (the module docstring says which are tried)."""
    tried = []
    for name in list(reversed(kept[1:-1]))[:PRUNE_ATTEMPTS]:
        trial = [n for n in kept if n != name]
        trial_path = tmp / f"int8-pruned-{len(tried)}.onnx"
        trial_value = attempt(trial, trial_path)
        passed = trial_value >= floor
        log("int8 fallback pruning", without=name, nodes_in_float=len(trial), value=round(trial_value, 5),
            floor=floor, kept_in_int8=passed)
        tried.append({"nodesInFloat": len(trial), "without": name, "value": round(float(trial_value), 6),
                      "passed": passed})
        if passed:
            kept, path, value = trial, trial_path, trial_value
    return kept, path, value, tried
