"""Cross-field rules, each written twice side by side: as CEL for the API server
(``x-kubernetes-validations`` in the generated CRD) and as Python for the embedded mode.

tests/api check, on the bad-input corpus, that both forms reject the same manifests.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable

from kompressor.api import spec as s

# `\Z`, not `$`: like RE2's `$` (the CEL twin), it does not match before a trailing newline.
_PARENT_SEGMENT = r"(^|/)\.\.(/|\Z|\?)"


@dataclass(frozen=True)
class Rule:
    on: type  # the dataclass (schema node) the rule is attached to
    cel: str  # evaluated by the API server with `self` = that node
    field: str  # fieldPath relative to the node, e.g. ".minSparsity"
    message: str
    holds: Callable[[Any], bool]  # the same rule in Python


def _no_parent_segment(uri: str | None) -> bool:
    return uri is None or re.search(_PARENT_SEGMENT, uri) is None


_CEL_NO_PARENT = "!{x}.matches('(^|/)[.][.](/|$|[?])')"

RULES: tuple[Rule, ...] = (
    Rule(s.ModelSpec, _CEL_NO_PARENT.format(x="self.uri"), ".uri",
         "uri must not contain '..' path segments", lambda m: _no_parent_segment(m.uri)),
    # A torch.export program does not say what it takes; ONNX graphs and Hugging Face folders do.
    Rule(s.ModelSpec, "self.uri.startsWith('builtin://') || has(self.inputShape) || has(self.inputs) || "
         "self.format in ['onnx', 'huggingface'] || (self.format == 'auto' && !self.uri.endsWith('.pt2'))",
         ".inputShape", "inputShape or inputs is required for a torch.export program (uri not builtin://)",
         lambda m: (m.uri.startswith("builtin://") or bool(m.input_shape) or bool(m.inputs)
                    or m.format in ("onnx", "huggingface") or (m.format == "auto" and not m.uri.endswith(".pt2")))),
    Rule(s.ModelSpec, "!has(self.inputShape) || !has(self.inputs)", ".inputs",
         "inputs and inputShape are exclusive (inputShape is the shorthand for one float32 input)",
         lambda m: not (m.input_shape and m.inputs)),
    Rule(s.ModelSpec, "!has(self.inputs) || self.inputs.all(a, self.inputs.filter(b, b.name == a.name).size() == 1)",
         ".inputs", "inputs must have unique names", lambda m: len({i.name for i in m.inputs}) == len(m.inputs)),
    *(
        Rule(s.DataSpec,
             (f"!has(self.{name}) || " if optional else "") + _CEL_NO_PARENT.format(x=f"self.{name}"),
             f".{name}", f"{name} must not contain '..' path segments",
             (lambda d, n=name: _no_parent_segment(getattr(d, n))))
        for name, optional in (("train", False), ("eval", False), ("validation", True), ("retrain", True),
                               ("reference", True))
    ),
    Rule(s.SearchSpec, "self.minSparsity <= self.maxSparsity", ".minSparsity",
         "minSparsity must be <= maxSparsity", lambda x: x.min_sparsity <= x.max_sparsity),
    # The CRD gives lists no default, so an unset list is absent (not []) when CEL runs: guard with has().
    Rule(s.GatesSpec, "!has(self.slices) || self.slices.all(a, self.slices.filter(b, b.name == a.name).size() == 1)",
         ".slices", "slices must have unique names", lambda g: len({x.name for x in g.slices}) == len(g.slices)),
    Rule(s.ServingSpec, "!has(self.grpcPort) || self.grpcPort != self.port", ".grpcPort",
         "grpcPort must differ from port", lambda x: x.grpc_port is None or x.grpc_port != x.port),
    Rule(s.AutoscalingSpec, "self.minReplicas <= self.maxReplicas", ".minReplicas",
         "minReplicas must be <= maxReplicas", lambda x: x.min_replicas <= x.max_replicas),
    Rule(s.AutoscalingSpec, "has(self.targetCPUUtilization) != has(self.targetConcurrency)",
         ".targetCPUUtilization", "set exactly one of targetCPUUtilization and targetConcurrency",
         lambda x: (x.target_cpu_utilization is None) != (x.target_concurrency is None)),
    Rule(s.DriftSpec, "self.mode != 'online' || self.detector in ['mmd', 'lsdd', 'cvm']", ".detector",
         "detector must be mmd, lsdd or cvm when mode is online",
         lambda x: x.mode != "online" or x.detector in s.ONLINE_DETECTORS),
    Rule(s.DriftSpec, "!has(self.categoricalFeatures) || "
         "self.categoricalFeatures.all(a, self.categoricalFeatures.filter(b, b.feature == a.feature).size() == 1)",
         ".categoricalFeatures", "categoricalFeatures must name each feature once",
         lambda x: len({c.feature for c in x.categorical_features}) == len(x.categorical_features)),
    Rule(s.PerformanceDriftSpec, "self.minLabels <= self.window", ".minLabels", "minLabels must be <= window",
         lambda x: x.min_labels <= x.window),
    Rule(s.CompressedModelSpec, "!has(self.drift.performance) || (self.serving.replicas <= 1 && "
         "!has(self.serving.autoscaling))", ".drift.performance",
         "drift.performance needs one serving replica and no autoscaling (each process remembers only the requests "
         "it answered)",
         lambda x: x.drift.performance is None or (x.serving.replicas <= 1 and x.serving.autoscaling is None)),
    Rule(s.CanarySpec, "!has(self.steps) || (self.steps.isSorted() && "
         "self.steps.all(x, x <= 99 && self.steps.filter(y, y == x).size() == 1))",
         ".steps", "canary steps must be increasing percentages below 100",
         lambda x: x.steps is None or (all(v <= 99 for v in x.steps)
                                       and all(a < b for a, b in zip(x.steps, x.steps[1:])))),
    Rule(s.CompressedModelSpec, "self.promotion.strategy == 'direct' || !has(self.promotion.onlineGates.minAccuracy) "
         "|| (self.serving.replicas <= 1 && !has(self.serving.autoscaling))", ".promotion.onlineGates.minAccuracy",
         "promotion.onlineGates.minAccuracy needs one serving replica and no autoscaling (each process remembers only "
         "the requests it answered)",
         lambda x: x.promotion.strategy == "direct" or x.promotion.online_gates.min_accuracy is None
         or (x.serving.replicas <= 1 and x.serving.autoscaling is None)),
    Rule(s.CompressedModelSpec, "self.drift.action != 'retrain' || has(self.data.retrain)", ".data.retrain",
         "data.retrain is required when drift.action is retrain",
         lambda x: x.drift.action != "retrain" or x.data.retrain is not None),
)


def rules_for(cls: type) -> list[Rule]:
    return [r for r in RULES if r.on is cls]


def check_rules(cls: type, obj: Any, path: str) -> list[tuple[str, str]]:
    """Every rule broken anywhere in ``obj``'s tree, as (path, message)."""
    import dataclasses

    from kompressor.api.wire import fields_of

    problems = []
    for rule in rules_for(cls):
        if not rule.holds(obj):
            problems.append((path + rule.field, rule.message))
    for info in fields_of(cls):
        value = getattr(obj, info.name)
        if dataclasses.is_dataclass(value):
            problems.extend(check_rules(type(value), value, f"{path}.{info.wire}"))
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if dataclasses.is_dataclass(item):
                    problems.extend(check_rules(type(item), item, f"{path}.{info.wire}[{i}]"))
    return problems
