"""The Grafana dashboard queries only metrics the code defines (prometheus_client names found in the
operator, serving and drift-watcher code), with labels those metrics carry, and ships in the chart."""

from __future__ import annotations

import ast
import json
import re

import pytest

from chartkit import CHART, REPO, full_values, one, render

DASHBOARD = CHART / "dashboards" / "kompressor.json"
CODE = [REPO / "operator" / "kompressor", REPO / "jobs" / "kompressor_jobs"]
# Series suffixes prometheus_client adds: counters _total/_created, histograms _bucket/_sum/_count.
SUFFIXES = {"Counter": ("_total", "_created"), "Gauge": ("",), "Histogram": ("_bucket", "_sum", "_count"),
            "Summary": ("_sum", "_count")}
# Labels Prometheus adds when it scrapes (ServiceMonitor / PodMonitor targets), and a histogram's le.
TARGET_LABELS = {"namespace", "pod", "container", "service", "endpoint", "job", "instance"}
METRIC_TYPES = set(SUFFIXES)


def _definitions(source: str):
    """(type, name, labels) of each prometheus_client constructor call whose name and labels are literals."""
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        kind = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None
        if kind not in METRIC_TYPES or not node.args or not isinstance(node.args[0], ast.Constant):
            continue
        labels = node.args[2] if len(node.args) > 2 else next(
            (k.value for k in node.keywords if k.arg == "labelnames"), None)
        names = {e.value for e in getattr(labels, "elts", []) if isinstance(e, ast.Constant)}
        yield kind, node.args[0].value, names


def defined_metrics() -> dict[str, tuple[str, set[str]]]:
    """series name -> (metric type, its labels), from every prometheus_client definition in the code."""
    series = {}
    for root in CODE:
        for path in root.rglob("*.py"):
            for kind, name, label_set in _definitions(path.read_text()):
                if kind in ("Histogram", "Summary"):
                    label_set = label_set | {"le"}
                for suffix in SUFFIXES[kind]:
                    series[name + suffix] = (kind, label_set)
    return series


def expressions() -> list[str]:
    board = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in board["templating"]["list"] if v.get("definition")]
    return exprs


def test_dashboard_is_valid_grafana_json():
    board = json.loads(DASHBOARD.read_text())
    assert board["uid"] == "kompressor" and board["schemaVersion"] >= 36
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    titles = " ".join(p["title"] for p in board["panels"]).lower()
    for topic in ("phase", "rollback", "p-value", "latency"):
        assert topic in titles, f"the dashboard shows {topic}"
    for panel in board["panels"]:
        if panel["type"] != "row":
            assert panel["targets"] and panel["datasource"]["uid"] == "${datasource}", panel["title"]


def test_every_queried_metric_is_defined_in_the_code():
    series = defined_metrics()
    names = {n for n in series if n.startswith("kompressor_")}
    assert len(names) > 10, f"found too few metric definitions in the code: {sorted(names)}"
    for expr in expressions():
        assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}"), expr
        queried = set(re.findall(r"\bkompressor_[a-z0-9_]+\b", expr))
        assert queried, f"{expr}: queries no Kompressor metric"
        unknown = queried - names
        assert not unknown, f"{expr}: {sorted(unknown)} is not defined by the code"


def test_every_label_used_is_one_the_metric_carries():
    series = defined_metrics()
    for expr in expressions():
        queried = set(re.findall(r"\bkompressor_[a-z0-9_]+\b", expr))
        carried = set().union(*(series[name][1] for name in queried)) | TARGET_LABELS
        used = set(re.findall(r"([a-z_]+)\s*=~?\s*\"", expr))
        for group in re.findall(r"\bby\s*\(([^)]*)\)", expr):
            used |= {label.strip() for label in group.split(",") if label.strip()}
        used |= set(re.findall(r"label_values\([^,]+,\s*([a-z_]+)\)", expr))
        assert used - carried == set(), f"{expr}: labels {sorted(used - carried)} are not on {sorted(queried)}"


@pytest.mark.parametrize("enabled", [True, False])
def test_dashboard_ships_as_a_sidecar_configmap_behind_a_value(enabled):
    values = full_values() if enabled else {}
    configmaps = [o for o in render(values) if o["kind"] == "ConfigMap"]
    if not enabled:
        assert configmaps == []
        return
    configmap = one(configmaps, "ConfigMap")
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(configmap["data"]["kompressor.json"]) == json.loads(DASHBOARD.read_text())
