"""Every malformed CompressedModel in tests/api/corpus/bad is refused by both layers.

(a) the API server: the committed CRD's schema, defaults and CEL rules (see schema_eval);
(b) the operator: ``kompressor.api.parse_manifest`` (what the embedded mode and the
    operator's handlers run) and ``kompressor validate``.

Each file starts with comment lines: a description, ``# expect: <field path>`` (the field
every rejection must name) and, for the few cases only the operator can judge,
``# layer: operator`` (the API server is then shown to accept it, so the marking stays true).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from kompressor.api import SpecError, parse_manifest
from kompressor.cli import main as kompressor

from schema_eval import admit, names_field

CORPUS = Path(__file__).parent / "corpus" / "bad"


@dataclass(frozen=True)
class Entry:
    path: Path
    expect: str
    layer: str  # "api" (both layers refuse) or "operator" (only the operator does)

    @property
    def doc(self):
        return yaml.safe_load(self.path.read_text())


def _load(path: Path) -> Entry:
    head = dict(re.findall(r"^# (expect|layer): (\S+)$", path.read_text(), re.MULTILINE))
    return Entry(path, head.get("expect", ""), head.get("layer", "api"))


ENTRIES = [_load(p) for p in sorted(CORPUS.glob("*.yaml"))]
IDS = [e.path.stem for e in ENTRIES]


def test_the_corpus_is_large_and_every_entry_names_its_field():
    assert len(ENTRIES) >= 50
    assert all(e.expect for e in ENTRIES), [e.path.name for e in ENTRIES if not e.expect]
    assert {e.layer for e in ENTRIES} <= {"api", "operator"}
    # Only a few cases may slip past the API server.
    assert sum(e.layer == "operator" for e in ENTRIES) <= 3


@pytest.mark.parametrize("entry", ENTRIES, ids=IDS)
def test_the_api_server_refuses_it(entry: Entry):
    _, problems = admit(entry.doc)
    if entry.layer == "operator":
        assert problems == [], "the API server refuses this entry now: drop its `# layer: operator` line"
        return
    assert problems, "the CRD accepts this malformed manifest"
    wrong = [str(p) for p in problems if not names_field(entry.expect, p.path, p.message)]
    assert not wrong, f"rejections that do not name {entry.expect}: {wrong}"


@pytest.mark.parametrize("entry", ENTRIES, ids=IDS)
def test_the_operator_refuses_it(entry: Entry):
    with pytest.raises(SpecError) as caught:
        parse_manifest(entry.doc)
    problems = caught.value.problems
    assert problems
    wrong = [f"{p}: {m}" for p, m in problems if not names_field(entry.expect, p, m)]
    assert not wrong, f"rejections that do not name {entry.expect}: {wrong}"


def test_kompressor_validate_refuses_every_entry_naming_its_field(capsys):
    code = kompressor(["validate", *(str(e.path) for e in ENTRIES)])
    out, err = capsys.readouterr()
    assert code != 0 and "ok:" not in out
    for entry in ENTRIES:
        lines = [line for line in err.splitlines() if line.startswith(f"error: {entry.path}:")]
        assert lines and all(entry.expect in line for line in lines), (entry.path.name, lines)
