"""Hugging Face Transformers folders (config.json, safetensors weights, tokenizer files) as sources, loaded
offline: never downloaded from a hub, never unpickled (safetensors only), no remote code.

classification and regression load ``AutoModelForSequenceClassification`` (its trained head must be in the
weights); embedding loads ``AutoModel`` and mean-pools the last hidden state over the attention mask (then
L2-normalises when the folder is a sentence-transformers model with a Normalize module). The module returned
takes the inputs positionally, in spec.model.inputs order (input_ids, attention_mask by default), and returns
one tensor: logits, regression outputs or embeddings.
"""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path

import torch
from torch import nn

from kompressor.api import defaults as d
from kompressor.api.spec import InputSpec
from kompressor.errors import UserError

PICKLED_WEIGHTS = ("pytorch_model.bin", "tf_model.h5", "flax_model.msgpack", "model.ckpt.index")
SAFETENSORS_INDEX = "model.safetensors.index.json"


def is_huggingface_folder(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def check_folder(uri: str, folder: Path) -> None:
    """A UserError unless ``folder`` holds a config and safetensors weights."""
    if not (folder / "config.json").is_file():
        raise UserError(f"{uri}: not a Hugging Face model folder: no config.json in {folder}")
    if list(folder.glob("*.safetensors")) or (folder / SAFETENSORS_INDEX).is_file():
        return
    pickled = sorted(p.name for p in folder.iterdir() if p.name in PICKLED_WEIGHTS or p.suffix in (".bin", ".pt",
                                                                                                   ".pth", ".ckpt"))
    if pickled:
        raise UserError(f"{uri}: the Hugging Face folder holds only pickled weights ({', '.join(pickled)}), which "
                        "Kompressor never loads (unpickling runs code). Save the model with safetensors: "
                        "model.save_pretrained(folder) writes model.safetensors")
    raise UserError(f"{uri}: the Hugging Face folder has no weights: no model.safetensors (or {SAFETENSORS_INDEX}) "
                    f"in {folder}")


def _offline() -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def default_sequence_length(folder: Path, config) -> int:
    limits = [d.HF_MAX_SEQUENCE_LENGTH]
    max_len = _read_json(folder / "tokenizer_config.json").get("model_max_length")
    if isinstance(max_len, int) and 0 < max_len < 10**6:
        limits.append(max_len)
    positions = getattr(config, "max_position_embeddings", None)
    if isinstance(positions, int) and positions > 0:
        limits.append(positions)
    return min(limits)


class HuggingFaceModel(nn.Module):
    """A Transformers model called with its inputs positionally (in ``names`` order); returns one tensor."""

    def __init__(self, model: nn.Module, names: list[str], task: str, normalize: bool = False):
        super().__init__()
        self.model = model
        self.names = list(names)
        self.task = task
        self.normalize = normalize

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        kwargs = dict(zip(self.names, inputs))
        out = self.model(**kwargs, return_dict=True)
        if self.task != "embedding":
            return out.logits
        hidden = out.last_hidden_state
        mask = kwargs.get("attention_mask")
        if mask is None:
            pooled = hidden.mean(dim=1)
        else:
            weights = mask.to(hidden.dtype).unsqueeze(-1)
            pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)
        return nn.functional.normalize(pooled, p=2, dim=1) if self.normalize else pooled


def _sentence_transformers_normalizes(folder: Path) -> bool:
    modules = _read_json(folder / "modules.json")
    return isinstance(modules, list) and any("Normalize" in str(m.get("type", "")) for m in modules
                                             if isinstance(m, dict))


def load_huggingface(uri: str, folder: Path, declared: list[InputSpec] | None,
                     task: str) -> tuple[HuggingFaceModel, list[InputSpec]]:
    check_folder(uri, folder)
    _offline()
    import transformers
    from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification

    transformers.logging.set_verbosity_error()  # "newly initialised" warnings become our own UserError below
    common = {"local_files_only": True, "trust_remote_code": False}
    try:
        config = AutoConfig.from_pretrained(str(folder), **common)
    except Exception as err:  # noqa: BLE001 - a bad config fails in many ways
        raise UserError(f"{uri}: cannot read the Hugging Face config: {str(err).splitlines()[0]}") from None
    loader = AutoModel if task == "embedding" else AutoModelForSequenceClassification
    kwargs = dict(common, use_safetensors=True, output_loading_info=True, attn_implementation="eager")
    if task == "regression" and getattr(config, "problem_type", None) is None:
        kwargs["problem_type"] = "regression"
    torch.manual_seed(0)  # nothing should be freshly initialised, but if it were it would be reproducible
    try:
        model, info = loader.from_pretrained(str(folder), **kwargs)
    except Exception as err:  # noqa: BLE001 - unsupported architectures, broken weights
        raise UserError(f"{uri}: Transformers cannot load the model offline as {loader.__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
    missing = list(info.get("missing_keys") or [])
    if missing:
        head = task != "embedding"
        raise UserError(
            f"{uri}: the folder's weights lack {len(missing)} tensor(s) the {loader.__name__} needs "
            f"({', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''})"
            + ("; the sequence-classification head is not trained: fine-tune it and save the model "
               "(save_pretrained), or set spec.model.task: embedding" if head else ""))
    model.eval()
    params = inspect.signature(model.forward).parameters
    if declared is None:
        seq = default_sequence_length(folder, config)
        names = [n for n in d.HF_INPUT_NAMES if n in params]
        declared = [InputSpec(name=n, dtype="int64", shape=[seq]) for n in names]
    unknown = [i.name for i in declared if i.name not in params]
    if unknown:
        raise UserError(f"{uri}: {type(model).__name__}.forward() has no argument {', '.join(unknown)} "
                        f"(spec.model.inputs must name forward() arguments, e.g. input_ids, attention_mask, "
                        "token_type_ids)")
    normalize = task == "embedding" and _sentence_transformers_normalizes(folder)
    return HuggingFaceModel(model, [i.name for i in declared], task, normalize).eval(), list(declared)
