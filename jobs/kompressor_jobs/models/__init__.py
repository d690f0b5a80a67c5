"""Source models: builtin architectures (trained once, cached as torch.export programs) and
user ``.pt2`` programs, turned into plain ``nn.Module``s that pruning libraries understand."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from kompressor.console import log, progress
from kompressor.errors import UserError
from kompressor.store import resolve_local, sha256_file
from kompressor_jobs.models.builtin import BuiltinModel, builtin_model
from kompressor_jobs.data import Dataset, load_dataset

SEED = 0
BATCH_SIZE = 64
LEARNING_RATE = 1e-3


def cache_dir() -> Path:
    return Path(os.environ.get("KOMPRESSOR_CACHE") or Path.home() / ".cache" / "kompressor")


@dataclass
class SourceModel:
    module: nn.Module  # a plain module with real nn.Linear / nn.Conv* layers, in eval mode, on CPU
    uri: str
    path: Path  # the .pt2 file
    digest: str  # sha256 of the .pt2 file
    input_shape: list[int]
    num_classes: int
    builtin: BuiltinModel | None = None


# --- builtin architectures -------------------------------------------------------------------

class MLP(nn.Sequential):
    def __init__(self, n_in: int, hidden: tuple[int, ...], n_out: int):
        layers: list[nn.Module] = []
        for width in hidden:
            layers += [nn.Linear(n_in, width), nn.ReLU()]
            n_in = width
        layers.append(nn.Linear(n_in, n_out))
        super().__init__(*layers)


class CNN(nn.Module):
    def __init__(self, input_shape: tuple[int, ...], hidden: tuple[int, ...], n_out: int):
        super().__init__()
        *channels, fc = hidden
        convs: list[nn.Module] = []
        c_in = input_shape[0]
        for c in channels:
            convs += [nn.Conv2d(c_in, c, 3, padding=1), nn.ReLU()]
            c_in = c
        convs.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*convs)
        flat = c_in * (input_shape[1] // 2) * (input_shape[2] // 2)
        self.head = nn.Sequential(nn.Linear(flat, fc), nn.ReLU(), nn.Linear(fc, n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.features(x), 1))


def build_builtin(spec: BuiltinModel) -> nn.Module:
    torch.manual_seed(SEED)
    if spec.arch == "mlp":
        return MLP(spec.input_shape[0], spec.hidden, spec.num_classes)
    return CNN(spec.input_shape, spec.hidden, spec.num_classes)


# --- training ---------------------------------------------------------------------------------

def train(module: nn.Module, data: Dataset, epochs: int, device: str, description: str = "training",
          lr: float = LEARNING_RATE, seed: int = SEED) -> float:
    """Cross-entropy training with Adam and a seeded shuffle. Returns the wall time in seconds."""
    start = time.perf_counter()
    if epochs <= 0:
        return 0.0
    module.to(device).train()
    X = torch.from_numpy(data.X).to(device)
    y = torch.from_numpy(data.y).to(device)
    optimizer = torch.optim.Adam([p for p in module.parameters() if p.requires_grad], lr=lr)
    generator = torch.Generator().manual_seed(seed)
    loss_fn = nn.CrossEntropyLoss()
    with progress(description, total=epochs) as bar:
        for _ in range(epochs):
            order = torch.randperm(len(y), generator=generator).to(device)
            total = 0.0
            for i in range(0, len(y), BATCH_SIZE):
                idx = order[i:i + BATCH_SIZE]
                optimizer.zero_grad(set_to_none=True)
                loss = loss_fn(module(X[idx]), y[idx])
                loss.backward()
                optimizer.step()
                total += float(loss.detach()) * len(idx)
            bar.advance(loss=round(total / len(y), 4))
    module.eval().cpu()  # copying back also waits for the device to finish
    return time.perf_counter() - start


@torch.no_grad()
def accuracy(module: nn.Module, data: Dataset) -> float:
    module.eval()
    pred = module(torch.from_numpy(data.X)).argmax(dim=1).numpy()
    return float((pred == data.y).mean())


# --- loading ----------------------------------------------------------------------------------

def export_program(module: nn.Module, input_shape: list[int]):
    # A batch-1 example would specialise the batch dimension; 2 keeps it dynamic.
    example = torch.zeros(2, *input_shape)
    return torch.export.export(module.eval(), (example,), dynamic_shapes=({0: torch.export.Dim.DYNAMIC},))


def builtin_path(spec: BuiltinModel, train_digest: str) -> Path:
    recipe = {"name": spec.name, "recipe": spec.recipe, "arch": spec.arch, "hidden": spec.hidden,
              "epochs": spec.epochs, "seed": SEED, "lr": LEARNING_RATE, "batch": BATCH_SIZE, "data": train_digest}
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir() / "models" / f"{spec.name}-{key}.pt2"


def ensure_builtin(spec: BuiltinModel) -> Path:
    """The cached .pt2 of a builtin model, trained (once, seeded) if missing. Always on CPU: a few
    seconds, and the same weights whichever machine trains first (GPU kernels are not bitwise alike)."""
    train_data = load_dataset(spec.data_uri("train"), list(spec.input_shape))
    path = builtin_path(spec, train_data.digest)
    if path.is_file():
        return path
    module = build_builtin(spec)
    seconds = train(module, train_data, spec.epochs, "cpu", description=f"training builtin {spec.name}")
    log("trained builtin model", model=spec.name, seconds=round(seconds, 2),
        train_accuracy=round(accuracy(module, train_data), 4))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp.pt2")
    os.close(fd)
    try:
        torch.export.save(export_program(module, list(spec.input_shape)), tmp)
        try:
            os.link(tmp, path)  # the first writer wins; a concurrent trainer then uses its file
        except FileExistsError:
            pass
        except OSError:  # a filesystem without hard links: last writer wins, atomically
            os.replace(tmp, path)
            return path
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def load_source(uri: str, input_shape: list[int] | None) -> SourceModel:
    builtin = builtin_model(uri)
    if builtin is not None:
        if input_shape is not None and list(input_shape) != list(builtin.input_shape):
            raise UserError(f"spec.model.inputShape {list(input_shape)} does not match {uri}, "
                            f"whose input shape is {list(builtin.input_shape)}")
        path = ensure_builtin(builtin)
        program = _load_program(uri, path)
        module = build_builtin(builtin)
        module.load_state_dict(program.state_dict)
        module.eval()
        return SourceModel(module, uri, path, sha256_file(path), list(builtin.input_shape), builtin.num_classes,
                           builtin)
    if not uri.startswith(("file://", "pvc://")):
        raise UserError(f"{uri}: the jobs read source models from builtin://, file:// or pvc:// "
                        "(s3:// models are copied to a volume first)")
    path = resolve_local(uri)
    if not path.is_file():
        raise UserError(f"{uri}: model file not found ({path})")
    program = _load_program(uri, path)
    declared = _program_input_shape(program)
    shape = list(input_shape) if input_shape is not None else declared
    if shape is None:
        raise UserError(f"{uri}: cannot tell the model's input shape; set spec.model.inputShape")
    if declared is not None and declared != shape:
        raise UserError(f"{uri}: the program takes samples of shape {declared}, "
                        f"but spec.model.inputShape is {shape}")
    module = rebuild_module(program)
    try:
        with torch.no_grad():
            out = module(torch.zeros(2, *shape))
    except Exception as err:  # noqa: BLE001 - the user's program, any failure is a bad input
        raise UserError(f"{uri}: the model does not accept inputs of shape [batch, {', '.join(map(str, shape))}]: "
                        f"{str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
    if not isinstance(out, torch.Tensor) or out.ndim != 2:
        raise UserError(f"{uri}: the model must return one [batch, classes] tensor of logits")
    return SourceModel(module, uri, path, sha256_file(path), shape, int(out.shape[1]))


def _load_program(uri: str, path: Path):
    if not zipfile.is_zipfile(path):  # a .pt2 is a zip archive; anything else fails noisily inside torch
        raise UserError(f"{uri}: not a readable torch.export program (.pt2): the file is not a zip archive "
                        "(corrupt, truncated, or another format such as a pickled state_dict)")
    export_log = logging.getLogger("torch.export")
    level = export_log.level
    export_log.setLevel(logging.ERROR)  # torch logs a traceback as a warning before raising
    try:
        return torch.export.load(str(path))
    except Exception as err:  # noqa: BLE001 - corrupt, truncated or foreign files fail in many ways
        detail = str(err).splitlines()[0] if str(err) else ""
        raise UserError(f"{uri}: not a readable torch.export program (.pt2): {type(err).__name__}"
                        + (f": {detail}" if detail else "")) from None
    finally:
        export_log.setLevel(level)


def _program_input_shape(program) -> list[int] | None:
    user_inputs = [s.arg.name for s in program.graph_signature.input_specs if s.kind.name == "USER_INPUT"]
    for node in program.graph.nodes:
        if node.op == "placeholder" and node.name in user_inputs:
            val = node.meta.get("val")
            if val is None or len(user_inputs) != 1:
                return None
            try:
                return [int(d) for d in val.shape[1:]]
            except (TypeError, ValueError):
                return None
    return None


# --- torch.export program -> plain module ----------------------------------------------------

_CONV = {
    torch.ops.aten.conv1d.default: nn.Conv1d,
    torch.ops.aten.conv2d.default: nn.Conv2d,
    torch.ops.aten.conv3d.default: nn.Conv3d,
}


def rebuild_module(program) -> torch.fx.GraphModule:
    """Turn a torch.export program into an fx GraphModule whose ``aten.linear``/``aten.conv*`` calls are
    real ``nn.Linear``/``nn.Conv*`` modules holding the same tensors: Torch-Pruning and
    torch.nn.utils.prune find layers only as modules."""
    gm = program.module()
    graph = gm.graph
    count = 0
    for node in list(graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":
            graph.erase_node(node)
            continue
        if node.op != "call_function" or not (node.target == torch.ops.aten.linear.default or node.target in _CONV):
            continue
        args = list(node.args)
        weight_node, bias_node = args[1], args[2] if len(args) > 2 else node.kwargs.get("bias")
        if getattr(weight_node, "op", None) != "get_attr" or (bias_node is not None and bias_node.op != "get_attr"):
            continue  # computed weights: leave the call as it is
        weight = gm.get_parameter(weight_node.target) if _is_param(gm, weight_node.target) else None
        if weight is None:
            continue
        bias = gm.get_parameter(bias_node.target) if bias_node is not None else None
        if node.target == torch.ops.aten.linear.default:
            layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
        else:
            stride, padding, dilation, groups = (args[3:] + [1, 0, 1, 1][len(args) - 3:])[:4]
            if isinstance(padding, str):
                continue
            layer = _CONV[node.target](weight.shape[1] * groups, weight.shape[0], tuple(weight.shape[2:]),
                                       stride=stride, padding=padding, dilation=dilation, groups=groups,
                                       bias=bias is not None)
        with torch.no_grad():
            layer.weight = nn.Parameter(weight.detach().clone())
            if bias is not None:
                layer.bias = nn.Parameter(bias.detach().clone())
        name = f"layer{count}"
        count += 1
        gm.add_submodule(name, layer)
        with graph.inserting_before(node):
            new = graph.call_module(name, (args[0],))
        node.replace_all_uses_with(new)
        graph.erase_node(node)
    graph.eliminate_dead_code()
    # A fresh GraphModule: the one ep.module() returns refuses train()/eval().
    rebuilt = torch.fx.GraphModule(gm, graph)
    rebuilt.delete_all_unused_submodules()
    return rebuilt.eval()


def _is_param(gm: nn.Module, target: str) -> bool:
    try:
        gm.get_parameter(target)
        return True
    except AttributeError:
        return False


def prunable_layers(module: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in module.named_modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))]


def as_numpy_batch(data: Dataset, n: int, seed: int = SEED) -> np.ndarray:
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(data), size=min(n, len(data)), replace=False)
    return data.X[np.sort(idx)]
