"""Compression benchmark: accuracy, ONNX Runtime latency and size of compressed builtin models.

    python bench/compression.py                       # table on stdout, plot in docs/
    python bench/compression.py --write-docs          # also rewrite docs/benchmarks/compression.md
    python bench/compression.py --peers --write-docs  # issue 10 item 12: digits-resnet and MiniLM vs peer tools
    python bench/compression.py --finetune-timing     # fine-tuning time on CPU vs CUDA (where there is one)

Fair by construction:
- three data roles, as the jobs use them: fine-tuning on train less a seeded, stratified validation part;
  configurations are *chosen* on validation and *reported* on eval;
- the baseline a candidate is compared with gets the same training budget: the shipped builtin model
  fine-tuned for as many epochs as the candidate's fine-tuning (same recipe, same early stopping, same
  seed), so "accuracy rose after pruning" can no longer be extra training;
- every accuracy is the mean over ``--seeds`` fine-tuning seeds, with the standard deviation;
- every speed ratio compares two graphs measured in the same run, in alternating blocks (ONNX Runtime on
  one thread, batch 1).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("KOMPRESSOR_JSON_LOGS", "1")

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "benchmarks" / "compression.md"
PLOT = ROOT / "docs" / "compression-accuracy-vs-sparsity.png"
SEEDS = 3

TARGETS = {
    "unstructured": "≥ 90 % sparsity at ≤ 1.0 pt accuracy drop",
    "structured": "≥ 2.0× ORT CPU p50 latency speed-up at ≤ 1.0 pt drop",
    "dynamic-int8": "≥ 3.5× size reduction at ≤ 0.5 pt drop",
}


@dataclass
class Config:
    label: str
    method: str
    sparsity: float
    schedule: str = "gradual"
    steps: int = 4
    epochs: int = 2  # fine-tuning epochs after each step
    quantization: str = "none"

    @property
    def total_epochs(self) -> int:
        steps = self.steps if self.schedule == "gradual" else 1
        return 0 if self.method == "none" else steps * self.epochs


def configs_for(model: str) -> list[Config]:
    out = [Config(f"unstructured {s:.0%}", "unstructured", s) for s in (0.5, 0.8, 0.9, 0.95)]
    out += [Config(f"global {s:.0%}", "global", s) for s in (0.9, 0.95)]
    out += [Config(f"structured {s:.0%}", "structured", s, steps=3) for s in (0.5, 0.75)]
    out.append(Config("dynamic-int8", "none", 0.0, schedule="oneshot", epochs=0, quantization="dynamic-int8"))
    out.append(Config("structured 50% + dynamic-int8", "structured", 0.5, steps=3, quantization="dynamic-int8"))
    if model in ("digits-cnn", "digits-resnet"):
        out.append(Config("static-int8", "none", 0.0, schedule="oneshot", epochs=0, quantization="static-int8"))
    return out


def paired_p50(base_path: Path, cand_path: Path, data, runs: int = 1800, budget_s: float = 30.0) -> tuple[float, float]:
    """p50 batch-1 latency (ms) of baseline and candidate, timed in alternating blocks in one process: ``runs``
    each, fewer (at least 200) when that would take more than ``budget_s`` (a transformer at 30-60 ms a run)."""
    from kompressor_jobs.evaluate.metrics import Timing, timed_latencies
    from kompressor_jobs.runtime import session

    sessions = [session(base_path, threads=1), session(cand_path, threads=1)]
    probe = timed_latencies(sessions, data, Timing(warmup=5, latency_runs=10, throughput_batches=1), block=10)
    per_run_s = float(sum(np.median(t) for t in probe)) / 1000.0
    runs = int(max(200, min(runs, budget_s / max(per_run_s, 1e-9))))
    block = max(20, runs // 6)
    times = timed_latencies(sessions, data, Timing(warmup=20, latency_runs=runs, throughput_batches=1), block=block)
    return float(np.percentile(times[0], 50)), float(np.percentile(times[1], 50))


def paired_throughput(base_path: Path, cand_path: Path, data, batch: int = 64, budget_s: float = 20.0,
                      rounds: int = 30) -> tuple[float, float]:
    """Rows/s at batch ``batch`` of baseline and candidate (one ONNX Runtime thread), one batch each in turn,
    ``rounds`` turns or until ``budget_s`` (at least 5); the median batch time of each."""
    from kompressor_jobs.evaluate.metrics import feeds_for
    from kompressor_jobs.runtime import session

    sessions = [session(base_path, threads=1), session(cand_path, threads=1)]
    batches = []
    for s in sessions:
        feeds = feeds_for(s, data)
        n = len(next(iter(feeds.values())))
        reps = -(-batch // n)
        batches.append({k: np.concatenate([v] * reps)[:batch] for k, v in feeds.items()})
    for s, b in zip(sessions, batches):
        s.run(None, b)  # warm-up
    times: list[list[float]] = [[], []]
    began = time.perf_counter()
    while len(times[0]) < rounds and (len(times[0]) < 5 or time.perf_counter() - began < budget_s):
        for s, b, t in zip(sessions, batches, times):
            start = time.perf_counter()
            s.run(None, b)
            t.append(time.perf_counter() - start)
    return batch / float(np.median(times[0])), batch / float(np.median(times[1]))


def ort_accuracy(path: Path, data) -> float:
    from kompressor_jobs.evaluate.metrics import predict
    from kompressor_jobs.runtime import session

    return float((predict(session(path, threads=1), data).argmax(1) == data.y).mean())


class Setup:
    """One builtin model, its three data splits and its shipped baseline exported to ONNX."""

    def __init__(self, model: str, work: Path):
        from kompressor.api import defaults as d
        from kompressor_jobs.compress.export import export_onnx
        from kompressor_jobs.data import load_dataset, split_validation
        from kompressor_jobs.models import load_source

        self.model, self.work = model, work / model
        self.work.mkdir(parents=True, exist_ok=True)
        self.source = load_source(f"builtin://{model}")
        full = self.load(self.source.builtin.data_uri("train"))
        self.train, self.validation = split_validation(full, d.VALIDATION_FRACTION, d.VALIDATION_SEED)
        self.eval = self.load(self.source.builtin.data_uri("eval"))
        self.base = self.work / "baseline.onnx"
        export_onnx(self.source.module, self.source.inputs, self.base, task=self.source.task)
        self._fair: dict[tuple[int, int], tuple[float, float]] = {}

    def load(self, uri: str):
        from kompressor_jobs.data import load_dataset

        return load_dataset(uri, self.source.inputs, task=self.source.task, num_classes=self.source.num_classes)

    def tuner(self, epochs: int, seed: int, distillation: bool = True):
        from kompressor_jobs.compress.finetune import FineTuneConfig, FineTuner, default_learning_rate

        config = FineTuneConfig(epochs=epochs, learning_rate=default_learning_rate(self.source.kind), seed=seed,
                                distillation=distillation)
        return FineTuner(config, self.train, self.validation, task=self.source.task, teacher=self.source.module)

    def fair_baseline(self, epochs: int, seed: int) -> tuple[float, float]:
        """(validation, eval) accuracy of the baseline given the same fine-tuning budget as a candidate."""
        from kompressor_jobs.compress.export import export_onnx

        if (epochs, seed) not in self._fair:
            if epochs == 0:
                self._fair[(epochs, seed)] = (ort_accuracy(self.base, self.validation), ort_accuracy(self.base, self.eval))
            else:
                module = copy.deepcopy(self.source.module)
                self.tuner(epochs, seed)(module, description="fine-tuning the baseline (fair budget)")
                path = self.work / f"baseline-e{epochs}-s{seed}.onnx"
                export_onnx(module, self.source.inputs, path, task=self.source.task)
                self._fair[(epochs, seed)] = (ort_accuracy(path, self.validation), ort_accuracy(path, self.eval))
        return self._fair[(epochs, seed)]


def compress_one(setup: Setup, cfg: Config, seed: int, folder: Path) -> tuple[Path, object]:
    from kompressor.store import MODEL_FILE
    from kompressor_jobs.compress.export import check_parity, export_onnx
    from kompressor_jobs.compress.finetune import example_inputs
    from kompressor_jobs.compress.pruning import prune_model
    from kompressor_jobs.compress.quantization import quantize

    src = setup.source
    result = prune_model(copy.deepcopy(src.module), cfg.method, cfg.sparsity, schedule=cfg.schedule,
                         steps=cfg.steps, fine_tune=setup.tuner(cfg.epochs, seed) if cfg.epochs else None,
                         example=example_inputs(setup.train))
    folder.mkdir(parents=True, exist_ok=True)
    fp32 = folder / "fp32.onnx"
    export_onnx(result.module, src.inputs, fp32, task=src.task)
    check_parity(result.module, fp32, setup.validation.feed(0, 64))  # validation rows: eval is for the figures only
    if cfg.quantization == "none":
        return fp32, result
    final = folder / MODEL_FILE
    quantize(fp32, final, cfg.quantization, setup.train.inputs, setup.validation.inputs, task=src.task, kind=src.kind,
             raise_on_failure=False)
    return final, result


def run_model(model: str, work: Path, seeds: int) -> list[dict]:
    from kompressor_jobs.runtime import graph_sparsity

    setup = Setup(model, work)
    base_val, base_eval = setup.fair_baseline(0, 0)
    base_size = setup.base.stat().st_size
    rows = [{"model": model, "label": "baseline (shipped)", "method": "-", "quantization": "none", "sparsity": 0.0,
             "val": [base_val], "eval": [base_eval], "drop_val": [0.0], "drop_eval": [0.0], "speedup": 1.0,
             "size_ratio": 1.0, "params": None, "epochs": 0}]
    for cfg in configs_for(model):
        accs_val, accs_eval, drops_val, drops_eval = [], [], [], []
        speedup, sparsity, size_ratio, params = None, 0.0, 1.0, None
        for seed in range(seeds if cfg.total_epochs else 1):  # no fine-tuning: nothing a seed changes
            path, result = compress_one(setup, cfg, seed, setup.work / f"{cfg.label}-s{seed}".replace(" ", "_"))
            fair_val, fair_eval = setup.fair_baseline(cfg.total_epochs, seed)
            v, e = ort_accuracy(path, setup.validation), ort_accuracy(path, setup.eval)
            accs_val.append(v), accs_eval.append(e)
            drops_val.append((fair_val - v) * 100), drops_eval.append((fair_eval - e) * 100)
            if seed == 0:
                base_p50, cand_p50 = paired_p50(setup.base, path, setup.eval)
                speedup = base_p50 / cand_p50
                sparsity = graph_sparsity(path)[0]
                size_ratio = path.stat().st_size / base_size
                params = f"{result.params_before}→{result.params_after}"
        rows.append({"model": model, "label": cfg.label, "method": cfg.method, "quantization": cfg.quantization,
                     "sparsity": sparsity, "val": accs_val, "eval": accs_eval, "drop_val": drops_val,
                     "drop_eval": drops_eval, "speedup": speedup, "size_ratio": size_ratio, "params": params,
                     "epochs": cfg.total_epochs})
        print(_row(rows[-1]), file=sys.stderr, flush=True)
    return rows


def _ms(values: list[float], digits: int = 2, sign: bool = True) -> str:
    mean = float(np.mean(values))
    text = f"{mean:+.{digits}f}" if sign else f"{mean:.{digits}f}"
    return text + (f" ± {float(np.std(values, ddof=1)):.{digits}f}" if len(values) > 1 else "")


def _row(r: dict) -> str:
    return (f"| {r['model']} | {r['label']} | {r['epochs']} | {r['sparsity']:.3f} | "
            f"{_ms([a * 100 for a in r['eval']], 2, sign=False)} | {_ms(r['drop_val'])} | {_ms(r['drop_eval'])} | "
            f"{r['speedup']:.2f}× | {r['size_ratio']:.3f} ({1 / r['size_ratio']:.1f}×) | {r['params'] or ''} |")


def table(rows: list[dict]) -> str:
    head = ("| model | configuration | fine-tuning epochs (baseline gets the same) | real sparsity "
            "| eval accuracy % | drop on validation (pt) | drop on eval (pt) | p50 speed-up vs baseline "
            "| size ratio (reduction) | parameters |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    return "\n".join([head] + [_row(r) for r in rows])


def verdicts(rows: list[dict]) -> list[str]:
    """Each target's configuration is CHOSEN on validation (mean drop over the seeds) and REPORTED on eval."""
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model and r["method"] != "-"]
        val = lambda r: float(np.mean(r["drop_val"]))  # noqa: E731
        best_u = max((r for r in mine if r["method"] in ("unstructured", "global") and r["quantization"] == "none"
                      and val(r) <= 1.0), key=lambda r: (r["sparsity"], -val(r)), default=None)
        best_s = max((r for r in mine if r["method"] == "structured" and r["quantization"] == "none"
                      and val(r) <= 1.0), key=lambda r: r["speedup"], default=None)
        q = next((r for r in mine if r["label"] == "dynamic-int8"), None)
        ev = lambda r: float(np.mean(r["drop_eval"]))  # noqa: E731
        u_ok = best_u is not None and best_u["sparsity"] >= 0.9 and ev(best_u) <= 1.0
        s_ok = best_s is not None and best_s["speedup"] >= 2.0 and ev(best_s) <= 1.0
        q_ok = q is not None and ev(q) <= 0.5 and 1 / q["size_ratio"] >= 3.5
        out.append(f"- **{model}** — unstructured: "
                   + (f"{best_u['label']} (chosen on validation) reaches {best_u['sparsity']:.1%} at "
                      f"{_ms(best_u['drop_eval'])} pt on eval" if best_u else "no configuration within 1 pt on validation")
                   + (" (met)" if u_ok else " (NOT met)")
                   + "; structured: "
                   + (f"{best_s['label']} gives {best_s['speedup']:.2f}× at {_ms(best_s['drop_eval'])} pt on eval"
                      if best_s else "no configuration within 1 pt on validation")
                   + (" (met)" if s_ok else " (NOT met)")
                   + "; dynamic-int8: "
                   + (f"{1 / q['size_ratio']:.2f}× smaller at {_ms(q['drop_eval'])} pt" if q else "not run")
                   + (" (met)" if q_ok else " (NOT met)"))
    return out


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for model in dict.fromkeys(r["model"] for r in rows):
        for method, marker in (("unstructured", "o"), ("global", "s")):
            pts = sorted((r["sparsity"], float(np.mean(r["eval"]))) for r in rows if r["model"] == model
                         and (r["method"] in (method, "-")) and r["quantization"] == "none")
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=f"{model} {method}")
    ax.set_xlabel("real sparsity (fraction of exact zeros in the ONNX weights)")
    ax.set_ylabel(f"eval accuracy (ONNX Runtime; mean of {SEEDS} seeds)")
    ax.set_title("Accuracy vs sparsity (gradual magnitude pruning + fine-tuning)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def finetune_timing(epochs: int) -> str:
    """Seconds to fine-tune each builtin architecture for ``epochs`` on CPU and, where present, CUDA."""
    import torch

    from kompressor_jobs.data import load_dataset
    from kompressor_jobs.models import load_source, train

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    lines = [f"torch {torch.__version__}; CPU threads {torch.get_num_threads()}"
             + (f"; GPU {torch.cuda.get_device_name(0)}" if "cuda" in devices else "; no CUDA device"),
             "| model | device | epochs | seconds | seconds/epoch |", "| --- | --- | --- | --- | --- |"]
    for model in ("digits-mlp", "digits-cnn", "breast-cancer-mlp"):
        source = load_source(f"builtin://{model}")
        data = load_dataset(source.builtin.data_uri("train"), source.inputs, task=source.task,
                            num_classes=source.num_classes)
        for device in devices:
            train(copy.deepcopy(source.module), data, 1, device)  # warm-up (CUDA context, kernels)
            seconds = train(copy.deepcopy(source.module), data, epochs, device)
            lines.append(f"| {model} | {device} | {epochs} | {seconds:.2f} | {seconds / epochs:.3f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["digits-mlp", "digits-cnn", "breast-cancer-mlp"])
    parser.add_argument("--write-docs", action="store_true", help=f"rewrite {DOC.relative_to(ROOT)}")
    parser.add_argument("--finetune-timing", action="store_true", help="time fine-tuning on CPU vs CUDA")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seeds", type=int, default=SEEDS, help="fine-tuning seeds per configuration")
    parser.add_argument("--minilm-seeds", type=int, default=None, help="--peers: seeds for MiniLM (default --seeds)")
    parser.add_argument("--peers", action="store_true", help="issue 10 item 12: digits-resnet and MiniLM against "
                        "onnxruntime.quantization, Optimum's ORTQuantizer and Torch-Pruning's example recipe")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "operator"))
    sys.path.insert(0, str(ROOT / "jobs"))
    import torch

    if args.finetune_timing:
        print(finetune_timing(args.epochs))
        return 0
    torch.set_num_threads(1)
    started = time.perf_counter()
    if args.peers:
        from peers import run_peers  # bench/peers.py

        text = run_peers(seeds=args.seeds, minilm_seeds=args.minilm_seeds)
        print(text)
        if args.write_docs:
            write_section(DOC, text, PEERS_BEGIN, PEERS_END)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        rows = [r for model in args.models for r in run_model(model, Path(tmp), args.seeds)]
    result = table(rows)
    summary = verdicts(rows)
    print(result)
    print("\n".join(summary))
    plot(rows, PLOT)
    if args.write_docs:
        from kompressor_jobs.hardware import cpu_flags, cpu_model

        section = DOC_TEMPLATE.format(
            cpu=cpu_model(), flags=", ".join(cpu_flags()), torch=torch.__version__, ort=_ort_version(),
            seconds=time.perf_counter() - started, table=result, verdicts="\n".join(summary), seeds=args.seeds,
            targets="\n".join(f"- {k}: {v}" for k, v in TARGETS.items()), plot=f"../{PLOT.name}")
        write_section(DOC, section)
    return 0


BEGIN, END = "<!-- bench/compression.py:begin -->", "<!-- bench/compression.py:end -->"
PEERS_BEGIN, PEERS_END = "<!-- bench/compression.py --peers:begin -->", "<!-- bench/compression.py --peers:end -->"


def write_section(doc: Path, section: str, begin: str = BEGIN, end: str = END) -> None:
    """Replace one generated part of the doc (between ``begin`` and ``end``); text outside the markers is kept."""
    text = doc.read_text() if doc.exists() else "# Compression benchmark\n"
    if begin not in text or end not in text:
        text = text.rstrip() + f"\n\n{begin}\n{end}\n"
    head, rest = text.split(begin, 1)
    tail = rest.split(end, 1)[1]
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(f"{head}{begin}\n{section.strip()}\n{end}{tail}")


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


DOC_TEMPLATE = """Measured by `python bench/compression.py --write-docs` ({seconds:.0f} s) on {cpu} ({flags}),
torch {torch}, onnxruntime {ort}. ONNX Runtime runs on one thread; latency is the p50 of batch-1 runs, and every speed-up
compares a candidate with its own baseline measured in the same run, in alternating blocks (the machine was
shared with other jobs, so absolute milliseconds are noisy; the ratios are what to read).

How it is kept fair:
- Data roles as in the jobs: fine-tuning on train less a seeded, stratified 15 % validation part; each target's
  configuration is chosen on validation and reported on eval (digits: 450 eval rows, one row = 0.22 pt;
  breast_cancer: 143 rows, one row = 0.70 pt).
- Each drop compares the candidate with the shipped baseline fine-tuned for the same number of epochs (same
  recipe, early stopping on validation, same seed): a candidate gets no training its baseline does not.
- Accuracies and drops are the mean ± standard deviation over {seeds} fine-tuning seeds (rows without
  fine-tuning have one run: no seed changes them). Real sparsity, speed-up and size come from seed 0.
- Pruned models use the gradual schedule (magnitude: 4 steps, structured: 3, polynomial ramp) with 2 fine-tuning
  epochs after each step and distillation from the uncompressed model, as the jobs do by default.
- The builtin baselines were trained on the whole train split, validation rows included (as a user's
  pretrained model may have been): validation accuracies are optimistic for baseline and candidates alike.

Targets:
{targets}

{table}

Verdicts:
{verdicts}

![accuracy vs sparsity]({plot})

Notes:
- Unstructured and global sparsity zero weights inside dense tensors: neither the ONNX file nor ONNX Runtime's
  dense kernels shrink, so their speed-up is ~1× and their size ratio 1.0 by design. Structured pruning removes
  neurons/channels (Torch-Pruning) and int8 quantization shrinks the weights 4×.
- The builtin digits MLP is 64→1024→1024→10 on purpose: on a tiny MLP, batch-1 latency is ONNX Runtime's
  per-call overhead, and no pruning can show up in it (see the breast-cancer rows).
"""


if __name__ == "__main__":
    sys.exit(main())
