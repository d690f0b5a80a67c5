"""ONNX Runtime sessions and facts read back from an ONNX graph. No torch: evaluation, serving and
quantization of an ONNX source run without it."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from kompressor.errors import UserError


THREADS_ENV = "KOMPRESSOR_ORT_THREADS"
CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


def cpu_quantity(value) -> float | None:
    """A Kubernetes CPU quantity ("500m", "2", 1.5) in cores; None when unset or unreadable."""
    if value is None or isinstance(value, bool):
        return None
    text = str(value).strip()
    try:
        return float(text[:-1]) / 1000 if text.endswith("m") else float(text)
    except ValueError:
        return None


CGROUP_V1_CPU = Path("/sys/fs/cgroup/cpu")


def cgroup_cpu_limit(cpu_max: Path | None = None) -> float | None:
    """The CPU limit this process runs under: cgroup v2 ``cpu.max`` ("<quota> <period>" or "max <period>"),
    else cgroup v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` (-1: none)."""
    cpu_max = CGROUP_CPU_MAX if cpu_max is None else cpu_max
    try:
        quota, period = cpu_max.read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((CGROUP_V1_CPU / "cpu.cfs_quota_us").read_text())
        period = int((CGROUP_V1_CPU / "cpu.cfs_period_us").read_text())
        return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None


def ort_threads(cpu_limit=None, env: dict | None = None, own_cgroup: bool = True) -> int:
    """ONNX Runtime's intra-op threads, one rule for the server and the evaluation Job (so latency is
    measured as it is served): $KOMPRESSOR_ORT_THREADS when set; else the CPU limit (``cpu_limit``, a
    Kubernetes quantity such as spec.serving.resources.limits.cpu, or this process's cgroup limit)
    rounded down, at least 1 (as Go's automaxprocs does: more threads than the quota only get throttled);
    else 0, ONNX Runtime's default of one thread per core (what an unlimited serving Pod gets).
    ``own_cgroup=False``: the evaluation Job judges for the serving Pod, not for its own limit."""
    env = os.environ if env is None else env
    if env.get(THREADS_ENV):
        return max(0, int(env[THREADS_ENV]))
    cores = cpu_quantity(cpu_limit)
    if cores is None and own_cgroup:
        cores = cgroup_cpu_limit()
    return max(1, int(cores)) if cores else 0


# Session config entries that stop ONNX Runtime's pool threads spinning while they wait for work. Spinning
# only pays on idle, dedicated cores: under concurrent requests (or beside other Pods) the spinners take the
# CPU from the threads doing work -- on a loaded 2-core machine a server with the default threads answered
# 2-4x fewer requests than with spinning off (docs/benchmarks/serving.md, "Under load").
NO_SPINNING = {"session.intra_op.allow_spinning": "0", "session.inter_op.allow_spinning": "0"}


def session_options(threads: int | None = None):
    """The SessionOptions of every session that serves or measures latency, one rule for both (so latency is
    measured as it is served): ``threads`` intra-op threads (None: ``ort_threads()``; 0: one per core), and
    no spinning (NO_SPINNING)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = ort_threads() if threads is None else threads
    for key, value in NO_SPINNING.items():
        options.add_session_config_entry(key, value)
    return options


def session(path: Path, threads: int | None = None):
    import onnxruntime as ort

    options = session_options(threads)
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as err:  # noqa: BLE001 - a corrupt/foreign file fails in several ways
        raise UserError(f"{path}: ONNX Runtime cannot load the model: {str(err).splitlines()[0]}") from None


# ONNX Runtime's input types and the numpy dtypes fed to them.
ORT_TO_NUMPY = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int8)": np.int8, "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}


def feed_for(sess, feed) -> dict[str, np.ndarray]:
    """A feed for ``sess``: a dict (input name -> array) or one array for a single-input model, each cast
    to the graph input's element type."""
    inputs = sess.get_inputs()
    if not isinstance(feed, dict):
        if len(inputs) != 1:
            raise UserError(f"the model has {len(inputs)} inputs ({', '.join(i.name for i in inputs)}); "
                            "feed it a dict of arrays by input name")
        feed = {inputs[0].name: feed}
    out = {}
    for i in inputs:
        if i.name not in feed:
            raise UserError(f"no array for the model's input {i.name} ({i.type}); got {', '.join(feed) or 'none'}")
        dtype = ORT_TO_NUMPY.get(i.type)
        a = np.asarray(feed[i.name])
        out[i.name] = a.astype(dtype, copy=False) if dtype is not None else a
    return out


def run(sess, feed) -> np.ndarray:
    """The first output of ``sess`` on ``feed`` (a dict by input name, or one array for one input)."""
    return sess.run(None, feed_for(sess, feed))[0]


# Ops whose integer input at these positions is a zero point, keyed by the position of the quantized tensor.
_ZERO_POINTS = {"DequantizeLinear": {0: 2}, "MatMulInteger": {0: 2, 1: 3}, "ConvInteger": {0: 2, 1: 3},
                "QLinearMatMul": {0: 2, 3: 5}, "QLinearConv": {0: 2, 3: 5}}


def graph_sparsity(path: Path) -> tuple[float, int]:
    """Fraction of zeros among the weight tensors (initializers of rank >= 2) and their element count.

    A quantized weight is zero where it equals its zero point (per tensor or per channel), not where it is
    0. An int8 tensor with no known zero point counts its zeros as is. In a quantized graph, small weights
    that rounded to the zero point are zeros too: to count only the weights that pruning zeroed, measure
    the float graph before quantizing (``kompressor prune`` records that as achieved.graphSparsity)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    inits = {i.name: i for i in model.graph.initializer}
    zero_point_of: dict[str, str] = {}
    for node in model.graph.node:
        for pos, zp_pos in _ZERO_POINTS.get(node.op_type, {}).items():
            if pos < len(node.input) and zp_pos < len(node.input) and node.input[zp_pos]:
                zero_point_of[node.input[pos]] = node.input[zp_pos]
    zeros = total = 0
    for init in model.graph.initializer:
        if len(init.dims) < 2:
            continue
        values = numpy_helper.to_array(init)
        if values.dtype.kind not in "fiu":
            continue
        zp_name = zero_point_of.get(init.name)
        zero = 0
        if zp_name in inits:
            zero = numpy_helper.to_array(inits[zp_name])
            if zero.ndim == 1 and zero.size > 1:  # per channel: axis 0 (Conv/QDQ) or the last (MatMul)
                axis = 0 if values.shape[0] == zero.size else values.ndim - 1
                zero = zero.reshape([-1 if d == axis else 1 for d in range(values.ndim)])
        zeros += int((values == zero).sum())
        total += values.size
    return (zeros / total if total else 0.0), total


def io_signature(path: Path) -> dict:
    """Input/output names, shapes (batch as -1) and dtypes: what the server needs."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)

    def describe(value) -> dict:
        tensor = value.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name
        return {"name": value.name, "shape": shape, "dtype": dtype}

    initializers = {i.name for i in model.graph.initializer}
    inputs = [describe(v) for v in model.graph.input if v.name not in initializers]
    outputs = [describe(v) for v in model.graph.output]
    # "input"/"output": the first of each, as single-input readers (and older manifests) have them.
    return {"input": inputs[0], "output": outputs[0], "inputs": inputs, "outputs": outputs}
