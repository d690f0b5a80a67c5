"""`kompressor evaluate` on the real pretrained transformer: the MiniLM topic classifier (two int64 inputs,
input_ids and attention_mask) as ONNX, against its dynamic-INT8 form made with onnxruntime.quantization
directly. The expectations are computed independently, from direct ONNX Runtime runs and the graphs."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from onnx_models import artifact
from kompressor.store import MODEL_FILE
from support.text_models import spec_inputs, text_models

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]  # builds the MiniLM fixture once (minutes)


@pytest.fixture(scope="module")
def minilm():
    return text_models(Path(os.environ["KOMPRESSOR_CACHE"]) / "text-models")


def run_all(path: Path, feeds: dict[str, np.ndarray]) -> np.ndarray:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    n = len(next(iter(feeds.values())))
    return np.concatenate([sess.run(None, {k: v[i:i + 1] for k, v in feeds.items()})[0] for i in range(n)])


def test_int8_minilm_is_evaluated_beside_its_float_baseline(jobs, write_spec, tmp_path, minilm):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    inputs = spec_inputs()
    base = artifact(tmp_path / "baseline", lambda p: shutil.copyfile(minilm.onnx, p), revision=0, inputs=inputs)
    artifact(tmp_path / "candidate",
             lambda p: quantize_dynamic(str(minilm.onnx), str(p), weight_type=QuantType.QInt8, per_channel=True),
             revision=1, inputs=inputs, baseline={"uri": (tmp_path / "baseline").as_uri(),
                                                  "sha256": base["files"][MODEL_FILE]},
             achieved={"quantization": {"mode": "dynamic-int8"}, "graphSparsity": 0.0,
                       "quantizedZeroFraction": 0.0})
    spec = write_spec({"model": {"uri": f"file://{tmp_path}/candidate/model.onnx", "inputs": inputs},
                       "data": {"train": minilm.uri("train"), "eval": minilm.uri("eval")},
                       "gates": {"minAgreement": 0.9}})
    code, err = jobs.evaluate(spec, tmp_path / "candidate", tmp_path / "eval")
    assert code == 0, err
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    base_metrics = metrics["baseline"]["metrics"]

    data = dict(np.load(minilm.eval))
    feeds = {k: data[k] for k in ("input_ids", "attention_mask")}
    float_logits = run_all(tmp_path / "baseline" / MODEL_FILE, feeds)
    int8_logits = run_all(tmp_path / "candidate" / MODEL_FILE, feeds)
    assert metrics["agreement"] == pytest.approx(float((float_logits.argmax(1) == int8_logits.argmax(1)).mean()))
    assert metrics["accuracy"] == pytest.approx(float((int8_logits.argmax(1) == data["y"]).mean()))
    assert base_metrics["accuracy"] == pytest.approx(float((float_logits.argmax(1) == data["y"]).mean()))
    assert metrics["gates"]["results"][0]["gate"] == "minAgreement"
    # INT8 keeps every weight (none removed, no pruning zeros) in a quarter of the bytes, and the same MACs
    assert metrics["sparsity"] == 0.0
    assert metrics["parameters"] == base_metrics["parameters"] > 20_000_000
    assert metrics["macs"] == base_metrics["macs"] > metrics["parameters"]
    assert metrics["sizeRatio"] < 0.35 and metrics["compressedSizeRatio"] < 0.4
    assert metrics["latencyRuns"] >= 1000 and metrics["speedup"] > 0
    card = (tmp_path / "eval" / "model_card.md").read_text()
    assert "Gains vs the uncompressed baseline" in card and "agreement" in card
