"""The examples users copy, and valid edge cases, pass both layers.

Both layers: the API server (the committed CRD's schema, defaults and CEL rules, see
schema_eval) and the operator (``parse_manifest``, ``kompressor validate``). The edge
cases in tests/api/corpus/good (all defaults, every bound at its limit, nulls, whole
numbers for doubles, dots that are not `..`) show the validators do not refuse too much.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from kompressor.api import CompressedModel, parse_manifest
from kompressor.api.spec import CompressedModelSpec
from kompressor.api.wire import from_wire
from kompressor.cli import main as kompressor

from schema_eval import admit, admit_file

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
EDGE_CASES = sorted((Path(__file__).parent / "corpus" / "good").glob("*.yaml"))
VALID = EXAMPLES + EDGE_CASES


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _models(paths) -> list[CompressedModel]:
    return [parse_manifest(doc) for path in paths for doc in _docs(path)]


@pytest.mark.parametrize("path", VALID, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_both_layers_accept_it_and_agree_on_its_defaults(path: Path):
    docs = _docs(path)
    for doc in docs:
        stored, problems = admit_file(path) if len(docs) == 1 else admit(doc)
        assert problems == [], [str(p) for p in problems]
        parsed = parse_manifest(doc)
        # What the operator reads back from the API server (CRD defaults applied) means
        # the same as what the user wrote, parsed with the Python defaults.
        assert from_wire(CompressedModelSpec, stored["spec"]) == parsed.spec


def test_every_example_has_a_header_comment_and_a_unique_name():
    assert len(EXAMPLES) >= 6
    for path in EXAMPLES:
        assert path.read_text().startswith("# "), f"{path.name} needs a header comment saying what it shows"
    keys = [m.key for m in _models(EXAMPLES)]
    assert len(keys) == len(set(keys))


def test_the_examples_cover_the_documented_scenarios():
    specs = [m.spec for m in _models(EXAMPLES)]
    scenarios = {
        "cpu only": lambda s: s.jobs.gpu == 0 and s.drift.action == "rollback",
        "gpu structured cnn": lambda s: (s.jobs.gpu >= 1 and s.jobs.tolerations and s.jobs.node_selector
                                        and s.compression.pruning.method == "structured"
                                        and s.model.uri == "builtin://digits-cnn"
                                        and s.compression.quantization.mode == "static-int8"),
        "retrain on drift": lambda s: s.drift.action == "retrain" and s.data.retrain,
        "rollback to baseline": lambda s: s.drift.action == "rollback" and s.drift.rollback_to == "baseline",
        "accuracy-aware search": lambda s: s.compression.search.enabled,
        "approval required": lambda s: s.promotion.require_approval,
        "own model with slice gates": lambda s: not s.model.uri.startswith("builtin://") and s.gates.slices,
        "gpu resnet": lambda s: s.jobs.gpu >= 1 and s.model.uri == "builtin://digits-resnet",
        "hugging face text classifier on a pvc": lambda s: (s.model.uri.startswith("pvc://")
                                                            and s.model.format == "huggingface"
                                                            and [i.dtype for i in s.model.inputs] == ["int64"] * 2),
    }
    missing = [name for name, shows in scenarios.items() if not any(shows(s) for s in specs)]
    assert missing == []


def test_kompressor_validate_accepts_every_example(capsys):
    code = kompressor(["validate", *map(str, VALID)])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out.count("ok: ") == sum(len(_docs(p)) for p in VALID)
