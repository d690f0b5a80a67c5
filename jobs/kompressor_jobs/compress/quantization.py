"""Post-training INT8 quantization with onnxruntime.quantization, checked against the float model.

- Transformers (found by their op pattern or the source's kind) are first fused by onnxruntime's
  transformer optimizer (``model_type="bert"``: Attention, LayerNorm/SkipLayerNorm, GELU, embedding
  fusion), then dynamically quantized; the fusions that happened are recorded.
- Static INT8 is QDQ, calibrated on training rows with minmax, entropy or percentile; every graph
  input is fed in its own dtype (int64 token ids pass through untouched).
- Fidelity: top-1 agreement (classification) or mean cosine similarity (regression, embedding) of the
  INT8 model with the float model on the whole validation split. Below ``min_agreement`` the node-wise
  fallback runs (quantization_fallback.py), in the manner of NNCF's accuracy control: every quantized
  node is ranked by the error against the float model when that node alone is quantized, measured from
  one quantization by injecting each node's INT8 output into the float model; then 1, 2, 4, ... of the
  most sensitive nodes are kept in float and bisected down to the fewest that pass, up to
  ``max_fallback_fraction`` of the quantized nodes (and ``max_fallback_nodes``).

No torch here: an ONNX source is quantized and checked without it.
"""

from __future__ import annotations

import platform
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kompressor.api import defaults as d
from kompressor.console import log
from kompressor.errors import UserError
from kompressor_jobs.compress.quantization_fallback import fallback_limit, run_fallback

CALIBRATION_ROWS = 256
CALIBRATION_BATCH = 32
EVAL_BATCH = 256
PERCENTILE = 99.999  # onnxruntime's default for percentile calibration
# spec calibration -> (onnxruntime CalibrationMethod, create_calibrator options)
CALIBRATORS = {
    "minmax": ("MinMax", {}),
    "entropy": ("Entropy", {"num_bins": 512, "num_quantized_bins": 128}),
    "percentile": ("Percentile", {"num_bins": 2048, "percentile": PERCENTILE}),
}
CALIBRATION_METHODS = tuple(CALIBRATORS)
FUSED_OPS = ("EmbedLayerNormalization", "Attention", "MultiHeadAttention", "Gelu", "FastGelu", "BiasGelu",
             "GemmFastGelu", "LayerNormalization", "SkipLayerNormalization", "SimplifiedLayerNormalization",
             "SkipSimplifiedLayerNormalization")
CLASSIFICATION = "classification"


class QuantizationFidelityError(UserError):
    """INT8 missed the fidelity floor even with the most nodes the fallback may keep in float."""


@dataclass
class QuantizationResult:
    path: Path
    passed: bool
    facts: dict = field(default_factory=dict)

    @property
    def fidelity(self) -> float:
        return self.facts["fidelity"]["value"]

    @property
    def nodes_in_float(self) -> list[str]:
        return list(self.facts.get("fallback", {}).get("nodesInFloat", []))


def cpu_has_vnni() -> bool:
    """x86 CPUs without VNNI multiply u8 x s8 pairs with a saturating instruction (vpmaddubsw):
    onnxruntime then recommends 7-bit weights (reduce_range). Other CPUs don't need it."""
    from kompressor_jobs.hardware import cpu_flags

    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return True
    flags = cpu_flags()
    return not flags or bool({"avx512_vnni", "avx_vnni", "amx_int8"} & set(flags))


def quantize_with_spec(fp32_path: Path, out_path: Path, spec, calibration: Mapping[str, np.ndarray],
                       validation: Mapping[str, np.ndarray], task: str = CLASSIFICATION, kind: str | None = None,
                       **kwargs) -> QuantizationResult:
    """``quantize`` with the settings of a ``QuantizationSpec`` (spec.compression.quantization)."""
    return quantize(fp32_path, out_path, spec.mode, calibration, validation, task=task, kind=kind,
                    calibration_method=spec.calibration, per_channel=spec.per_channel,
                    min_agreement=spec.min_agreement, max_fallback_nodes=spec.max_fallback_nodes,
                    max_fallback_fraction=spec.max_fallback_fraction, **kwargs)


def quantize(fp32_path: Path, out_path: Path, mode: str, calibration: Mapping[str, np.ndarray] | np.ndarray,
             validation: Mapping[str, np.ndarray] | np.ndarray, *, task: str = CLASSIFICATION,
             kind: str | None = None, calibration_method: str = "minmax", per_channel: bool = True,
             min_agreement: float = d.QUANTIZATION_MIN_AGREEMENT, max_fallback_nodes: int | None = None,
             max_fallback_fraction: float = d.QUANTIZATION_MAX_FALLBACK_FRACTION, optimize: bool | None = None,
             num_heads: int = 0, hidden_size: int = 0, reduce_range: bool | None = None,
             fallback: bool = True, raise_on_failure: bool = True) -> QuantizationResult:
    """Quantize ``fp32_path`` into ``out_path`` and check it against the float model.

    ``calibration`` and ``validation`` map each graph input name to its rows (``Dataset.inputs``; a
    single array stands for a single-input model). ``optimize`` None: fuse transformers automatically
    (``kind == "transformer"`` or the graph's op pattern); ``num_heads``/``hidden_size`` 0: read from
    the graph. ``reduce_range`` None: 7-bit weights on x86 CPUs without VNNI. ``min_agreement`` 0 opts
    out of the fidelity floor (still measured and recorded). The fallback keeps at most
    ``max_fallback_fraction`` of the quantized nodes in float (rounded up), and at most
    ``max_fallback_nodes`` when set (0 turns the fallback off). When even that many float nodes don't
    reach the floor, ``QuantizationFidelityError`` is raised and nothing is written
    (``raise_on_failure``), or the most faithful model tried is written with ``passed`` False."""
    import onnx

    if mode not in ("dynamic-int8", "static-int8"):
        raise ValueError(f"unknown quantization mode {mode!r}")
    if calibration_method not in CALIBRATION_METHODS:
        raise ValueError(f"unknown calibration method {calibration_method!r} (known: {', '.join(CALIBRATION_METHODS)})")
    started = time.perf_counter()
    fp32_path, out_path = Path(fp32_path), Path(out_path)
    names = [i.name for i in _graph_inputs(onnx.load(str(fp32_path), load_external_data=False))]
    calibration, validation = _as_feeds(calibration, names, "calibration"), _as_feeds(validation, names, "validation")
    if _rows(validation) == 0:
        raise UserError("INT8 fidelity needs validation rows: the validation split is empty")
    if reduce_range is None:
        reduce_range = not cpu_has_vnni()

    with tempfile.TemporaryDirectory(dir=out_path.parent, prefix=".quantize-") as tmp_name:
        tmp = Path(tmp_name)
        prepared, prep_facts = prepare(fp32_path, tmp, mode, kind=kind, optimize=optimize, num_heads=num_heads,
                                       hidden_size=hidden_size)
        q = _Quantizer(prepared, tmp, mode, calibration, calibration_method, per_channel, reduce_range)
        reference = outputs(fp32_path, validation)

        def attempt(exclude: list[str], path: Path) -> float:
            q.run(path, exclude)
            return fidelity(reference, outputs(path, validation), task)

        first = tmp / "int8-0.onnx"
        value = attempt([], first)
        metric = "top1Agreement" if task == CLASSIFICATION else "cosineSimilarity"
        facts: dict = {
            "mode": mode, **prep_facts, "perChannel": per_channel, "reduceRange": reduce_range,
            "weightType": "int8", "activationType": "uint8",
        }
        if mode == "static-int8":
            facts.update(calibration=calibration_method, calibrationRows=min(_rows(calibration), CALIBRATION_ROWS),
                         format="QDQ")
        quantized = quantized_nodes(prepared, first, mode)
        facts["quantizedNodes"] = len(quantized)
        best_path, best_value, kept = first, value, []
        enforced = min_agreement > 0
        limit = fallback_limit(len(quantized), max_fallback_nodes, max_fallback_fraction) if fallback else 0
        log("int8 fidelity", metric=metric, value=round(value, 5), floor=min_agreement, rows=_rows(validation),
            quantized_nodes=len(quantized))
        if enforced and value < min_agreement and limit > 0:
            best_path, best_value, kept, facts["fallback"] = run_fallback(
                attempt, prepared, first, tmp, quantized, validation, task, min_agreement, limit, best_path,
                best_value, lambda: q.runs)
        passed = (not enforced) or best_value >= min_agreement
        facts["fidelity"] = {"metric": metric, "value": round(float(best_value), 6), "int8Only": round(float(value), 6),
                             "minAgreement": min_agreement, "enforced": enforced, "passed": passed,
                             "rows": _rows(validation), "against": "float model, whole validation split"}
        facts["nodesInFloat"] = kept
        facts["seconds"] = round(time.perf_counter() - started, 3)
        if passed or not raise_on_failure:
            best_path.replace(out_path)
    result = QuantizationResult(out_path, passed, facts)
    if not passed:
        tried = max((t["nodesInFloat"] for t in facts.get("fallback", {}).get("tried", [])), default=0)
        cap = "unset" if max_fallback_nodes is None else max_fallback_nodes
        message = (f"INT8 {metric} with the float model is at best {best_value:.4f} on {_rows(validation)} validation "
                   f"rows (with {len(kept)} node(s) kept in float), below minAgreement {min_agreement}; the fallback "
                   f"tried up to {tried} of {len(quantized)} quantized nodes in float (maxFallbackFraction "
                   f"{max_fallback_fraction}, maxFallbackNodes {cap}). Raise "
                   f"spec.compression.quantization.maxFallbackFraction or maxFallbackNodes, lower minAgreement "
                   f"(0 opts out), try another calibration method, or set mode: none.")
        facts["fidelity"]["reason"] = message
        log("int8 fidelity not reached", level="warning", reason=message)
        if raise_on_failure:
            raise QuantizationFidelityError(message)
    return result


# --- preparation ---------------------------------------------------------------------------------

def prepare(fp32_path: Path, tmp: Path, mode: str, *, kind: str | None = None, optimize: bool | None = None,
            num_heads: int = 0, hidden_size: int = 0) -> tuple[Path, dict]:
    """The float graph the quantizer works on: every node named (nodes_to_exclude needs names), then
    fused by the transformer optimizer (dynamic INT8 of a transformer) or pre-processed (shape
    inference and ONNX Runtime's graph optimisations) as onnxruntime.quantization recommends."""
    import onnx

    model = _name_nodes(onnx.load(str(fp32_path)))
    named = tmp / "named.onnx"
    onnx.save(model, str(named))
    transformer = looks_like_transformer(model)
    facts: dict = {"transformer": bool(kind == "transformer" or transformer)}
    if optimize is None:
        optimize = mode == "dynamic-int8" and facts["transformer"]
    if optimize:
        fused = tmp / "optimized.onnx"
        stats = optimize_transformer(named, fused, num_heads=num_heads, hidden_size=hidden_size)
        facts["optimizer"] = stats
        if stats["fusions"]:
            log("transformer fused", **{k: v for k, v in stats["fusions"].items()})
            onnx.save(_name_nodes(onnx.load(str(fused))), str(fused))
            return fused, facts
        log("the transformer optimizer fused nothing; quantizing the graph as it is", level="warning")
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = tmp / "preprocessed.onnx"
    try:
        quant_pre_process(str(named), str(pre), skip_symbolic_shape=False)
    except Exception:  # noqa: BLE001 - symbolic shape inference does not know every op; ONNX's does
        quant_pre_process(str(named), str(pre), skip_symbolic_shape=True)
    onnx.save(_name_nodes(onnx.load(str(pre))), str(pre))
    facts["preprocessed"] = True
    return pre, facts


def _name_nodes(model):
    """Give every node a unique name: nodes_to_exclude refers to nodes by name."""
    seen: set[str] = set()
    for i, node in enumerate(model.graph.node):
        if not node.name or node.name in seen:
            base = node.name or node.op_type
            name, k = f"{base}_{i}", i
            while name in seen:
                k += 1
                name = f"{base}_{k}"
            node.name = name
        seen.add(node.name)
    return model


def looks_like_transformer(model) -> bool:
    """Self-attention (Softmax between MatMuls) next to layer normalisation (fused or decomposed)."""
    ops = [n.op_type for n in model.graph.node]
    counts = {op: ops.count(op) for op in set(ops)}
    norm = counts.get("LayerNormalization", 0) + counts.get("SkipLayerNormalization", 0) + counts.get("ReduceMean", 0)
    attention = counts.get("Attention", 0) + counts.get("MultiHeadAttention", 0) + counts.get("Softmax", 0)
    return attention > 0 and norm > 0 and counts.get("MatMul", 0) >= 2


def optimize_transformer(path: Path, out: Path, *, num_heads: int = 0, hidden_size: int = 0) -> dict:
    """onnxruntime.transformers.optimizer (model_type bert) with its default fusions; no GELU
    approximation (it changes the numbers). Returns the fusions that happened, by op."""
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    options = FusionOptions("bert")
    options.enable_gelu_approximation = False
    optimizer = optimize_model(str(path), model_type="bert", num_heads=num_heads, hidden_size=hidden_size,
                               optimization_options=options, opt_level=1, use_gpu=False)
    model = optimizer.model
    try:  # ONNX's shape inference stops at the fused com.microsoft ops; the quantizer needs the types
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

        model = SymbolicShapeInference.infer_shapes(model, auto_merge=True)
    except Exception as err:  # noqa: BLE001 - the quantizer then falls back to DefaultTensorType float
        log("symbolic shape inference failed on the fused transformer", level="warning", error=str(err)[:200])
    import onnx

    onnx.save(model, str(out))
    graph = model.graph
    fusions = {op: n for op in FUSED_OPS if (n := sum(node.op_type == op for node in graph.node))}
    before = _op_counts(path)
    fusions = {op: n for op, n in fusions.items() if n > before.get(op, 0)}  # new ops only
    heads = sorted({a.i for node in graph.node if node.op_type in ("Attention", "MultiHeadAttention")
                    for a in node.attribute if a.name == "num_heads"})
    return {"modelType": "bert", "fusions": fusions, "numHeads": heads[0] if len(heads) == 1 else (heads or None),
            "hiddenSize": hidden_size or _attention_hidden_size(model) or None,
            "nodesBefore": sum(before.values()), "nodesAfter": len(graph.node)}


def transformer_config(folder: Path) -> tuple[int, int]:
    """(num_heads, hidden_size) from a Hugging Face folder's config.json; (0, 0) (read them from the
    graph) when it has none."""
    import json

    try:
        config = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        return 0, 0
    heads = config.get("num_attention_heads") or config.get("n_head") or 0
    hidden = config.get("hidden_size") or config.get("n_embd") or config.get("dim") or 0
    return (int(heads), int(hidden)) if isinstance(heads, int) and isinstance(hidden, int) else (0, 0)


def _attention_hidden_size(model) -> int:
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Attention" and len(node.input) > 1 and node.input[1] in inits:
            return int(numpy_helper.to_array(inits[node.input[1]]).shape[0])
    return 0


def _op_counts(path: Path) -> dict[str, int]:
    import onnx

    counts: dict[str, int] = {}
    for node in onnx.load(str(path), load_external_data=False).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


# --- quantization --------------------------------------------------------------------------------

class _Quantizer:
    """Quantizes the prepared graph with some nodes kept in float; static calibration runs once
    (onnxruntime's calibration cache) and every later attempt reuses its ranges."""

    def __init__(self, prepared: Path, tmp: Path, mode: str, calibration: dict[str, np.ndarray], method: str,
                 per_channel: bool, reduce_range: bool):
        self.prepared, self.mode, self.per_channel, self.reduce_range = prepared, mode, per_channel, reduce_range
        self.calibration, self.method = calibration, method
        self.cache = tmp / "calibration.json"
        self.runs = 0
        if mode == "static-int8" and _rows(calibration) == 0:
            raise UserError("static INT8 needs calibration rows: the training data is empty")

    def run(self, out: Path, exclude: list[str] = (), only: list[str] | None = None) -> None:
        """Quantize into ``out``: every node but ``exclude``, or only the nodes in ``only``."""
        import onnx
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static

        self.runs += 1
        if self.mode == "dynamic-int8":
            # Dynamic quantization first rewrites each Gemm "g" into MatMul "g_MatMul" + Add "g_Add", then
            # applies nodes_to_exclude: a Gemm is kept in float under its MatMul's name.
            exclude = [*exclude, *(f"{name}_MatMul" for name in exclude)]
            only = None if only is None else [*only, *(f"{name}_MatMul" for name in only)]
            quantize_dynamic(str(self.prepared), str(out), per_channel=self.per_channel, reduce_range=self.reduce_range,
                             weight_type=QuantType.QInt8, nodes_to_exclude=exclude, nodes_to_quantize=only,
                             extra_options={"MatMulConstBOnly": True, "DefaultTensorType": onnx.TensorProto.FLOAT})
            return
        if not self.cache.is_file():
            self.calibrate()
        quantize_static(str(self.prepared), str(out), None, quant_format=QuantFormat.QDQ,
                        per_channel=self.per_channel, reduce_range=self.reduce_range,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        nodes_to_exclude=list(exclude), nodes_to_quantize=only,
                        calibrate_method=getattr(CalibrationMethod, CALIBRATORS[self.method][0]),
                        calibration_cache_path=str(self.cache))

    def calibrate(self) -> None:
        """Activation ranges from the calibration rows, saved as onnxruntime's calibration cache.
        Calibrated here rather than inside quantize_static, which cannot set the histogram sizes: its
        entropy default (128 bins for 128 quantized bins) leaves one candidate threshold, the min-max
        range. Here 512 bins are searched for 128 quantized bins (TensorRT's recipe uses 2048: four
        times the search, in Python, for thresholds a quarter-bin finer)."""
        from onnxruntime.quantization import CalibrationMethod
        from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data
        from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

        name, options = CALIBRATORS[self.method]
        with tempfile.TemporaryDirectory(dir=self.cache.parent, prefix="calibrate-") as work:
            calibrator = create_calibrator(
                self.prepared, list(set(QLinearOpsRegistry) | set(QDQRegistry)),
                augmented_model_path=str(Path(work) / "augmented.onnx"),
                calibrate_method=getattr(CalibrationMethod, name), extra_options=dict(options))
            calibrator.collect_data(_Reader(self.calibration, _batch_size(self.prepared)))
            save_tensors_data(calibrator.compute_data(), self.cache)
            del calibrator


class _Reader:
    """CalibrationDataReader over the first CALIBRATION_ROWS rows, every input in its own dtype."""

    def __init__(self, feeds: dict[str, np.ndarray], batch: int):
        rows = min(_rows(feeds), CALIBRATION_ROWS)
        self.batches = iter([{k: v[i:i + batch] for k, v in feeds.items()} for i in range(0, rows, batch)])

    def get_next(self):
        return next(self.batches, None)

    def __iter__(self):
        return self

    def __next__(self):
        batch = self.get_next()
        if batch is None:
            raise StopIteration
        return batch


def quantized_nodes(float_path: Path, int8_path: Path, mode: str = "dynamic-int8") -> list[str]:
    """Names of the float graph's nodes the quantizer changed: replaced by integer ops (dynamic,
    QOperator) or, in a QDQ graph (static), fed through DequantizeLinear. In graph order."""
    import onnx

    float_nodes = onnx.load(str(float_path), load_external_data=False).graph.node
    int8 = onnx.load(str(int8_path), load_external_data=False).graph
    by_name = {n.name: n for n in int8.node}
    dequantized = {o for n in int8.node if n.op_type == "DequantizeLinear" for o in n.output}
    names = []
    for node in float_nodes:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        same = by_name.get(node.name)
        if same is None or same.op_type != node.op_type or (
                mode == "static-int8" and any(i in dequantized for i in same.input)):
            names.append(node.name)
    return names


# --- fidelity ------------------------------------------------------------------------------------

def outputs(path: Path, feeds: dict[str, np.ndarray], rows: int | None = None) -> np.ndarray:
    """The model's first output on ``feeds`` (all rows, or the first ``rows``), in batches."""
    from kompressor_jobs.runtime import session

    sess = session(path, threads=0)
    n = _rows(feeds) if rows is None else min(rows, _rows(feeds))
    batch = _batch_size(path, sess) or EVAL_BATCH
    parts = [sess.run(None, {k: v[i:min(i + batch, n)] for k, v in feeds.items()})[0] for i in range(0, n, batch)]
    return np.concatenate(parts).astype(np.float64) if parts else np.zeros((0,))


def fidelity(reference: np.ndarray, candidate: np.ndarray, task: str = CLASSIFICATION) -> float:
    """Top-1 agreement (classification) or mean row cosine similarity (regression, embedding; a
    single regression output is compared as one vector over all rows)."""
    if task == CLASSIFICATION:
        return float((reference.reshape(len(reference), -1).argmax(1)
                      == candidate.reshape(len(candidate), -1).argmax(1)).mean())
    a, b = reference.reshape(len(reference), -1), candidate.reshape(len(candidate), -1)
    if a.shape[1] == 1:
        a, b = a.reshape(1, -1), b.reshape(1, -1)
    num = (a * b).sum(1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    cos = np.where(den > 0, num / np.where(den > 0, den, 1.0), (np.abs(a - b).max(1) == 0).astype(np.float64))
    return float(cos.mean())


# --- feeds ---------------------------------------------------------------------------------------

def _graph_inputs(model) -> list:
    inits = {i.name for i in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def _as_feeds(data, names: list[str], role: str) -> dict[str, np.ndarray]:
    if isinstance(data, np.ndarray):
        if len(names) != 1:
            raise UserError(f"{role}: the model has inputs {names}; give one array per input name")
        return {names[0]: data}
    missing = [n for n in names if n not in data]
    if missing:
        raise UserError(f"{role} data has no array for the model input(s) {', '.join(missing)}")
    return {n: np.asarray(data[n]) for n in names}


def _rows(feeds: dict[str, np.ndarray]) -> int:
    return min((len(v) for v in feeds.values()), default=0)


def _batch_size(path: Path, sess=None) -> int | None:
    """The graph's fixed batch size, or None when the batch dimension is dynamic."""
    if sess is None:
        import onnx

        dims = [list(i.type.tensor_type.shape.dim)
                for i in _graph_inputs(onnx.load(str(path), load_external_data=False))]
        fixed = [d[0].dim_value for d in dims if d and d[0].HasField("dim_value")]
        return (fixed[0] or None) if fixed else CALIBRATION_BATCH
    shapes = [i.shape for i in sess.get_inputs()]
    fixed = [s[0] for s in shapes if s and isinstance(s[0], int)]
    return fixed[0] if fixed else None
