"""The sparsity search's probing strategy (compress/search.py `explore`), on verdict patterns a bisection
gets wrong: accuracy that does not fall steadily with sparsity."""

from __future__ import annotations

import pytest

from kompressor_jobs.compress.search import explore, plan_grid


def run(passes, lo=0.0, hi=0.95, max_probes=6):
    calls = []

    def judge(s):
        calls.append(s)
        return passes(s)

    tried = explore(lo, hi, max_probes, judge)
    assert [s for s, _ in tried] == calls  # every call is reported, in order
    assert len(calls) == len(set(calls)) <= max_probes  # never the same sparsity twice, never over budget
    assert all(lo <= s <= hi for s in calls)
    return tried


def sparsest_pass(tried):
    return max((s for s, ok in tried if ok), default=None)


def test_a_pass_above_a_failing_sparsity_is_found():
    # passes low, fails in the middle, passes again higher up (the fine-tuned model recovers), fails at the top
    def passes(s):
        return s <= 0.3 or 0.55 <= s <= 0.7

    tried = run(passes)
    assert sparsest_pass(tried) >= 0.55
    # a bisection from the ends (0.95 fails, 0.0 passes, 0.475 fails, ...) never leaves [0, 0.475]:
    assert 0.475 not in [s for s, _ in tried][:3]


def test_every_sparser_grid_point_is_tried_before_one_is_accepted():
    def passes(s):
        return s <= 0.4

    tried = run(passes)
    grid = plan_grid(0.0, 0.95, 6)
    accepted = next(s for s, ok in tried if ok and s in grid)
    assert all(s in [t for t, _ in tried] for s in grid if s > accepted)
    assert all(not ok for s, ok in tried if s > 0.4)
    # the rest of the budget refines above the accepted grid point
    assert sparsest_pass(tried) > accepted


def test_the_top_of_the_range_passing_costs_one_probe():
    assert run(lambda s: True) == [(0.95, True)]


def test_nothing_passing_spends_the_budget_on_the_widest_gaps():
    tried = run(lambda s: False)
    assert len(tried) == 6 and sparsest_pass(tried) is None
    points = sorted(s for s, _ in tried)
    assert max(b - a for a, b in zip(points, points[1:])) <= 0.95 / 3 + 1e-9


@pytest.mark.parametrize("max_probes", [1, 2, 3, 4, 9])
def test_budgets(max_probes):
    tried = run(lambda s: s <= 0.5, max_probes=max_probes)
    assert tried[0][0] == 0.95 and len(tried) <= max_probes


def test_kubectl_explain_documents_the_alternates_cap():
    """`kubectl explain compressedmodel.spec.compression.search.maxAlternates` prints the committed CRD's
    description and default (the chart ships the same CRD)."""
    from pathlib import Path

    import yaml

    from kompressor.api import defaults as d

    root = Path(__file__).resolve().parents[2]
    for crd_file in (root / "crds" / "compressedmodels.kompressor.io.yaml",
                     root / "charts" / "kompressor" / "crds" / "compressedmodels.kompressor.io.yaml"):
        schema = yaml.safe_load(crd_file.read_text())["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
        search = schema["properties"]["spec"]["properties"]["compression"]["properties"]["search"]
        field = search["properties"]["maxAlternates"]
        assert (field["type"], field["default"], field["minimum"], field["maximum"]) == (
            "integer", d.SEARCH_MAX_ALTERNATES, 0, 19), crd_file
        text = " ".join(field["description"].split())
        assert "alternates/" in text and "full copy of the model" in text and "0 keeps none" in text
        assert "the evaluate Job tries only these" in text and "says when none is left" in text
