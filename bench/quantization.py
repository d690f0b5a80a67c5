"""INT8 side by side, in one process: the float model, onnxruntime.quantization.quantize_dynamic called
directly (per-tensor, then per-channel), and Kompressor's pipeline (transformer fusion + per-channel
weights + the node-wise fallback to minAgreement on the validation split).

Each variant is timed at batch 1 with one ONNX Runtime thread, interleaved (every round runs each
variant on the same rows), and judged on the eval split: accuracy against the labels, top-1
agreement with the float model, size on disk.

    .venv/bin/python bench/quantization.py                      # the MiniLM topic classifier (tests/support)
    .venv/bin/python bench/quantization.py --mixed 300 --min-agreement 0.97,0.99   # ambiguous sentences
    .venv/bin/python bench/quantization.py --model m.onnx --train t.npz --validation v.npz --eval e.npz

``--mixed N``: validation and eval are N sentences each that mix two topics (one topic's subject, the other's
object), without labels: the template sentences are so easy that INT8 agrees with float on all of them, while
on these it flips about one prediction in twenty, so the node-wise fallback has work to do. Calibration stays
on the training sentences.

Data files hold one array per model input plus ``y``. Without --validation, the last 40 % of train is
used as validation (and not for calibration). ``--json FILE`` writes the rows.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "jobs"), str(ROOT / "operator"), str(ROOT / "tests")]


def _load(path: Path, names: list[str]) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    data = np.load(path)
    return {n: data[n] for n in names}, (data["y"] if "y" in data.files else None)


def _session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def mixed_sentences(n: int, seed: int) -> dict[str, np.ndarray]:
    """``n`` tokenized sentences that mix two topics of the MiniLM classifier's templates (no labels)."""
    from support.text_models import _WORDS, TOPICS, tokenize

    rng = np.random.default_rng(seed)
    texts = []
    for _ in range(n):
        a, b = (_WORDS[TOPICS[i]] for i in rng.choice(len(TOPICS), 2, replace=False))
        parts = [str(rng.choice(a["subject"])), str(rng.choice(a["verb"] if rng.random() < 0.5 else b["verb"])),
                 str(rng.choice(b["object"]))]
        if rng.random() < 0.7:
            parts.append(str(rng.choice((a if rng.random() < 0.5 else b)["tail"])))
        texts.append(" ".join(parts) + ".")
    return tokenize(texts)


def compare(model: Path, train: dict, validation: dict, evaluation: dict, labels: np.ndarray | None, work: Path,
            rounds: int = 15, rows_per_round: int = 20, min_agreements: tuple[float, ...] = (0.99,)) -> list[dict]:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from kompressor_jobs.compress.quantization import fidelity, outputs, quantize

    variants: dict[str, Path] = {"float": model}
    facts: dict[str, dict] = {}
    seconds: dict[str, float] = {}
    for name, per_channel in (("quantize_dynamic", False), ("quantize_dynamic per-channel", True)):
        started = time.perf_counter()
        quantize_dynamic(str(model), str(work / f"{name}.onnx"), weight_type=QuantType.QInt8, per_channel=per_channel)
        seconds[name] = time.perf_counter() - started
        variants[name] = work / f"{name}.onnx"
    floors = [("kompressor, no fallback", 0.0)] + [
        ("kompressor" if len(min_agreements) == 1 else f"kompressor, minAgreement {floor}", floor)
        for floor in min_agreements]
    for name, floor in floors:
        started = time.perf_counter()
        result = quantize(model, work / f"{name}.onnx", "dynamic-int8", train, validation, min_agreement=floor,
                          raise_on_failure=False)
        seconds[name] = time.perf_counter() - started
        variants[name], facts[name] = result.path, result.facts
    sessions = {name: _session(path) for name, path in variants.items()}
    n = min(rows_per_round, len(next(iter(evaluation.values()))))
    singles = [{k: v[i:i + 1] for k, v in evaluation.items()} for i in range(n)]
    latencies: dict[str, list[float]] = {name: [] for name in sessions}
    for sess in sessions.values():  # warm-up
        for feed in singles[:3]:
            sess.run(None, feed)
    for _ in range(rounds):
        for name, sess in sessions.items():
            for feed in singles:
                t0 = time.perf_counter()
                sess.run(None, feed)
                latencies[name].append(time.perf_counter() - t0)
    reference = outputs(model, evaluation)
    base_p50 = float(np.median(latencies["float"]))
    base_acc = float((reference.argmax(1) == labels).mean()) if labels is not None else None
    rows = []
    for name, path in variants.items():
        out = reference if name == "float" else outputs(path, evaluation)
        acc = float((out.argmax(1) == labels).mean()) if labels is not None else None
        p50 = float(np.median(latencies[name]))
        f = facts.get(name, {})
        rows.append({
            "variant": name, "p50Ms": round(p50 * 1e3, 3), "p95Ms": round(float(np.percentile(latencies[name], 95)) * 1e3, 3),
            "speedup": round(base_p50 / p50, 3), "accuracy": acc,
            "accuracyDropPoints": None if acc is None else round(100 * (base_acc - acc), 2),
            "agreementEval": round(fidelity(reference, out), 4),
            "sizeRatio": round(os.path.getsize(path) / os.path.getsize(model), 4),
            "quantizeSeconds": round(seconds.get(name, 0.0), 1),
            "validationFidelity": (f.get("fidelity") or {}).get("value"),
            "nodesInFloat": f.get("nodesInFloat"), "fusions": (f.get("optimizer") or {}).get("fusions"),
            "reduceRange": f.get("reduceRange"), "minAgreement": (f.get("fidelity") or {}).get("minAgreement"),
            "passed": (f.get("fidelity") or {}).get("passed"),
            "fallback": None if "fallback" not in f else {
                k: f["fallback"].get(k) for k in ("seconds", "quantizations", "limit", "tried", "why")} | {
                "rankingSeconds": f["fallback"]["ranking"]["seconds"], "rankingRows": f["fallback"]["ranking"]["rows"]},
        })
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model")
    parser.add_argument("--train")
    parser.add_argument("--validation")
    parser.add_argument("--eval")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--mixed", type=int, default=0, help="validation and eval: N mixed-topic sentences each")
    parser.add_argument("--min-agreement", default="0.99", help="comma-separated floors, one Kompressor row each")
    parser.add_argument("--json")
    args = parser.parse_args()
    if args.model:
        model, train_path, eval_path = Path(args.model), Path(args.train), Path(args.eval)
    else:
        from support.text_models import text_models

        cache = Path(os.environ.get("KOMPRESSOR_CACHE") or Path.home() / ".cache" / "kompressor") / "text-models"
        tm = text_models(cache)
        model, train_path, eval_path = tm.onnx, tm.train, tm.eval
    import onnx

    names = [i.name for i in onnx.load(str(model), load_external_data=False).graph.input]
    train, _ = _load(train_path, names)
    evaluation, labels = _load(eval_path, names)
    if args.mixed:
        validation, evaluation, labels = mixed_sentences(args.mixed, 11), mixed_sentences(args.mixed, 12), None
    elif args.validation:
        validation, _ = _load(Path(args.validation), names)
    else:
        cut = int(len(next(iter(train.values()))) * 0.6)
        train, validation = ({k: v[:cut] for k, v in train.items()}, {k: v[cut:] for k, v in train.items()})
    with tempfile.TemporaryDirectory() as work:
        rows = compare(model, train, validation, evaluation, labels, Path(work), rounds=args.rounds,
                       min_agreements=tuple(float(f) for f in args.min_agreement.split(",")))
    print(f"{'variant':36s} {'p50 ms':>8s} {'speed-up':>8s} {'acc drop':>9s} {'agree':>7s} {'valid.':>7s} "
          f"{'size':>6s} {'quantize s':>10s}  float nodes")
    for r in rows:
        drop = "" if r["accuracyDropPoints"] is None else f"{r['accuracyDropPoints']:+.2f} pt"
        valid = "" if r["validationFidelity"] is None else f"{r['validationFidelity']:.4f}"
        fb = r.get("fallback") or {}
        extra = (f" (passed {r['passed']}; fallback {fb['seconds']:.0f} s, ranking {fb['rankingSeconds']:.0f} s, "
                 f"{fb['quantizations']} quantizations)") if fb else ""
        print(f"{r['variant']:36s} {r['p50Ms']:8.2f} {r['speedup']:7.2f}x {drop:>9s} {r['agreementEval']:7.4f} "
              f"{valid:>7s} {r['sizeRatio']:6.3f} {r['quantizeSeconds']:10.1f}  {len(r['nodesInFloat'] or [])}{extra}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
