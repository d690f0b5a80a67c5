"""The source model a CompressedModel names, whatever its format: what it takes (named, typed inputs), what
it returns (task and output size) and, for PyTorch sources, a plain ``nn.Module`` that pruning libraries
understand.

Formats (spec.model.format; ``auto`` decides by the file): builtin (builtin://NAME, trained on first use and
cached as torch.export programs), torch-export (``.pt2``), onnx (``.onnx``: no torch needed) and huggingface
(a Transformers folder with config.json and safetensors weights). This module imports torch only for the
PyTorch formats.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from kompressor.api.spec import InputSpec
from kompressor.errors import UserError
from kompressor.store import resolve_local, sha256_file
from kompressor_jobs.data import as_inputs
from kompressor_jobs.models.builtin import BuiltinModel, builtin_model

FORMATS = ("torch-export", "onnx", "huggingface")
TASKS = ("classification", "regression", "embedding")


@dataclass
class SourceModel:
    module: Any  # torch nn.Module taking the inputs positionally, in eval mode, on CPU; None for ONNX sources
    uri: str
    path: Path  # the .pt2 / .onnx file or the Hugging Face folder (local)
    digest: str  # sha256 of the file, or of the folder's file listing (path + sha256 of each file)
    inputs: list[InputSpec]  # resolved, never empty, in the order the model takes them
    task: str  # classification | regression | embedding
    output_dim: int  # classes, regression outputs or embedding size
    format: str  # torch-export | onnx | huggingface
    kind: str  # mlp | cnn | resnet | transformer: used for defaults (learning rate, quantization)
    onnx_path: Path | None = None  # ONNX sources: the graph itself
    builtin: BuiltinModel | None = None

    @property
    def input_shape(self) -> list[int]:
        """The shape of the single input (the inputShape shorthand); a UserError for a several-input model."""
        if len(self.inputs) != 1:
            raise UserError(f"{self.uri}: the model has {len(self.inputs)} inputs "
                            f"({', '.join(i.name for i in self.inputs)}); this step needs one")
        return list(self.inputs[0].shape)

    @property
    def num_classes(self) -> int | None:
        return self.output_dim if self.task == "classification" else None

    @property
    def trainable(self) -> bool:
        return self.module is not None

    def inputs_wire(self) -> list[dict]:
        return [{"name": i.name, "dtype": i.dtype, "shape": list(i.shape)} for i in self.inputs]


def cache_dir() -> Path:
    import os

    return Path(os.environ.get("KOMPRESSOR_CACHE") or Path.home() / ".cache" / "kompressor")


def load_model(model_spec) -> SourceModel:
    """The source model of ``spec.model`` (a ModelSpec)."""
    declared = model_spec.inputs or model_spec.input_shape
    return load_source(model_spec.uri, declared, format=model_spec.format, task=model_spec.task)


def load_source(uri: str, inputs=None, *, format: str = "auto", task: str = "classification") -> SourceModel:
    """Load ``uri``. ``inputs``: the declared inputs (InputSpecs, or a shape for one float32 input), or None to
    take them from the model (ONNX graph inputs, the program's placeholders, input_ids + attention_mask)."""
    if task not in TASKS:
        raise UserError(f"spec.model.task must be one of {', '.join(TASKS)}, got {task!r}")
    declared = as_inputs(inputs)
    builtin = builtin_model(uri)
    if builtin is not None:
        return _load_builtin(uri, builtin, declared, task)
    path = _local_path(uri)
    fmt = detect_format(uri, path) if format in (None, "auto") else format
    if fmt == "onnx":
        return _load_onnx(uri, path, declared, task)
    if fmt == "huggingface":
        return _load_huggingface(uri, path, declared, task)
    if fmt == "torch-export":
        return _load_torch_export(uri, path, declared, task)
    raise UserError(f"{uri}: unknown spec.model.format {fmt!r} (auto, torch-export, onnx or huggingface)")


def detect_format(uri: str, path: Path) -> str:
    if path.is_dir():
        if (path / "config.json").is_file():
            return "huggingface"
        raise UserError(f"{uri}: a folder without config.json is not a model (a Hugging Face folder holds "
                        "config.json, safetensors weights and tokenizer files)")
    if not path.is_file():
        raise UserError(f"{uri}: model file not found ({path})")
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        return "onnx"
    if suffix in (".pt2", ".zip") or zipfile.is_zipfile(path):
        return "torch-export"
    raise UserError(f"{uri}: cannot tell the model's format from the file (.pt2: torch-export, .onnx: onnx, a folder "
                    "with config.json: huggingface); set spec.model.format")


def _local_path(uri: str) -> Path:
    scheme = urlparse(uri).scheme
    if scheme in ("file", "pvc"):
        return resolve_local(uri)
    if scheme == "s3":
        return _fetch_s3(uri)
    raise UserError(f"{uri}: the jobs read source models from builtin://, file://, pvc:// or s3://")


def _fetch_s3(uri: str) -> Path:
    """An s3:// file or folder (a prefix), copied into the cache through the artifact store's fsspec. The copy is
    keyed by the URI and by each object's key, ETag and size, so a model uploaded again under the same URI is
    fetched again. A missing object or an S3 error (credentials, permissions) is a UserError naming the URI."""
    from kompressor.store.stores import S3Store

    parent, _, name = uri.rstrip("/").rpartition("/")
    if not name or parent.rstrip("/") == "s3:":
        raise UserError(f"{uri}: an s3:// model URI names an object or a folder inside a bucket "
                        "(s3://bucket/path/model.onnx or s3://bucket/path/folder)")
    store = S3Store(parent)
    remote = store.uri(name)
    try:
        listing = store.fs.find(remote, detail=True)  # a file: itself; a folder: every object under it
    except Exception as err:  # noqa: BLE001 - botocore and s3fs raise many kinds (credentials, access, endpoint)
        raise UserError(f"{uri}: cannot list the model on S3: {_first_line(err)}") from None
    if not listing:
        raise UserError(f"{uri}: model not found on S3 (no object and no folder under this key)")
    h = hashlib.sha256(uri.encode())
    for key in sorted(listing):
        info = listing[key]
        h.update(f"\n{key}\0{info.get('ETag') or info.get('etag')}\0{info.get('size')}".encode())
    target = cache_dir() / "sources" / h.hexdigest()[:16] / name
    if not target.exists():
        tmp = Path(tempfile.mkdtemp(dir=_mkdir(target.parent.parent), prefix=".fetch-"))
        try:
            try:
                store.fs.get(remote, str(tmp / name), recursive=True)
            except Exception as err:  # noqa: BLE001 - as above
                raise UserError(f"{uri}: cannot fetch the model from S3: {_first_line(err)}") from None
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                (tmp / name).rename(target)
            except OSError:
                if not target.exists():  # not another process's copy of the same objects
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def folder_digest(folder: Path) -> str:
    """sha256 over the sorted listing of (relative path, sha256 of the file) of every file in ``folder``."""
    h = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(f"{f.relative_to(folder).as_posix()}\0{sha256_file(f)}\n".encode())
    return h.hexdigest()


# --- formats -------------------------------------------------------------------------------------------

def _load_builtin(uri: str, builtin: BuiltinModel, declared: list[InputSpec] | None, task: str) -> SourceModel:
    from kompressor_jobs.models.architectures import build_builtin, ensure_builtin
    from kompressor_jobs.models.torch_export import load_program

    shape = list(builtin.input_shape)
    if declared is not None and (len(declared) != 1 or list(declared[0].shape) != shape
                                 or declared[0].dtype != "float32"):
        got = [list(i.shape) for i in declared]
        raise UserError(f"spec.model.inputShape {got[0] if len(got) == 1 else got} does not match {uri}, "
                        f"whose input shape is {shape}")
    if task != "classification":
        raise UserError(f"{uri}: builtin models are classifiers; spec.model.task must be classification")
    path = ensure_builtin(builtin)
    program = load_program(uri, path)
    module = build_builtin(builtin)
    module.load_state_dict(program.state_dict)
    module.eval()
    name = declared[0].name if declared else "input"
    return SourceModel(module, uri, path, sha256_file(path), [InputSpec(name=name, dtype="float32", shape=shape)],
                       task, builtin.num_classes, "torch-export", builtin.arch, builtin=builtin)


def _load_torch_export(uri: str, path: Path, declared: list[InputSpec] | None, task: str) -> SourceModel:
    from kompressor_jobs.models.torch_export import load_program, module_kind, rebuild_module, resolve_program_inputs

    if not path.is_file():
        raise UserError(f"{uri}: model file not found ({path})")
    program = load_program(uri, path)
    inputs = resolve_program_inputs(uri, program, declared)
    module = rebuild_module(program)
    output_dim = _check_module(uri, module, inputs, task)
    return SourceModel(module, uri, path, sha256_file(path), inputs, task, output_dim, "torch-export",
                       module_kind(module))


def _load_huggingface(uri: str, path: Path, declared: list[InputSpec] | None, task: str) -> SourceModel:
    from kompressor_jobs.models.huggingface import load_huggingface

    if not path.exists():
        raise UserError(f"{uri}: model folder not found ({path})")
    if not path.is_dir():
        raise UserError(f"{uri}: spec.model.format huggingface needs a folder (config.json, safetensors weights, "
                        f"tokenizer files), but {path} is a file")
    module, inputs = load_huggingface(uri, path, declared, task)
    output_dim = _check_module(uri, module, inputs, task)
    return SourceModel(module, uri, path, folder_digest(path), inputs, task, output_dim, "huggingface",
                       "transformer")


def _load_onnx(uri: str, path: Path, declared: list[InputSpec] | None, task: str) -> SourceModel:
    from kompressor_jobs.models.onnx_source import graph_kind, load_graph, output_dim, resolve_onnx_inputs

    if not path.is_file():
        raise UserError(f"{uri}: model file not found ({path})")
    graph = load_graph(uri, path)
    inputs = resolve_onnx_inputs(uri, graph, declared)
    dim, _ = output_dim(uri, path, inputs)
    return SourceModel(None, uri, path, sha256_file(path), inputs, task, dim, "onnx", graph_kind(graph),
                       onnx_path=path)


def _check_module(uri: str, module, inputs: list[InputSpec], task: str) -> int:
    """Run the module once on zeros of the declared inputs; returns the output size."""
    import torch

    from kompressor_jobs.models.torch_export import example_inputs

    try:
        with torch.no_grad():
            out = module(*example_inputs(inputs))
    except Exception as err:  # noqa: BLE001 - the user's program, any failure is a bad input
        detail = str(err).splitlines()[0] if str(err) else type(err).__name__
        if len(inputs) == 1 and inputs[0].dtype == "float32":
            raise UserError(f"{uri}: the model does not accept inputs of shape "
                            f"[batch, {', '.join(map(str, inputs[0].shape))}]: {detail}") from None
        described = ", ".join(f"{i.name} ({i.dtype}, [batch, {', '.join(map(str, i.shape))}])" for i in inputs)
        raise UserError(f"{uri}: the model does not accept the inputs {described}: {detail}") from None
    if not isinstance(out, torch.Tensor) or out.ndim not in (1, 2) or (out.ndim == 1 and task != "regression"):
        what = {"classification": "[batch, classes] tensor of logits", "regression": "[batch, outputs] tensor",
                "embedding": "[batch, dim] tensor of embeddings"}[task]
        raise UserError(f"{uri}: the model must return one {what}")
    return int(out.shape[1]) if out.ndim == 2 else 1
