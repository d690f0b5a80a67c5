"""values.schema.json rejects bad values with a message that names the value, before anything renders."""

from __future__ import annotations

import helm_python
import pytest

from chartkit import CHART, full_values, render

# (values, the path Helm's message must name, a word of the reason)
BAD_VALUES = [
    ({"replicaCount": 0}, "/replicaCount", "minimum"),
    ({"replicaCount": "two"}, "/replicaCount", "want integer"),
    ({"image": {"pullPolicy": "Sometimes"}}, "/image/pullPolicy", "one of"),
    ({"image": {"digest": "sha256:abc"}}, "/image/digest", "pattern"),
    ({"image": {"repository": ""}}, "/image/repository", "minLength"),
    ({"replicaCount": 2, "peering": {"enabled": False}}, "/peering/enabled", "true"),
    ({"watchNamespace": "Bad_NS"}, "/watchNamespace", "pattern"),
    ({"watchNamespace": ["ok", "ok"]}, "/watchNamespace", "oneOf"),
    ({"artifacts": {"persistence": {"enabled": False}}}, "/artifacts/persistence/existingClaim", "minLength"),
    ({"artifacts": {"persistence": {"accessModes": ["ReadWriteSometimes"]}}}, "/artifacts/persistence/accessModes/0",
     "one of"),
    ({"artifacts": {"prefix": "../escape"}}, "/artifacts/prefix", "pattern"),
    ({"resources": {"limits": {"cpu": "lots"}}}, "/resources/limits/cpu", "pattern"),
    ({"securityContext": {"readOnlyRootFilesystem": False}}, "/securityContext/readOnlyRootFilesystem", "true"),
    ({"securityContext": {"allowPrivilegeEscalation": True}}, "/securityContext/allowPrivilegeEscalation", "false"),
    ({"podSecurityContext": {"runAsNonRoot": False}}, "/podSecurityContext/runAsNonRoot", "true"),
    ({"metrics": {"port": 70000}}, "/metrics/port", "maximum"),
    ({"metrics": {"serviceMonitor": {"interval": "often"}}}, "/metrics/serviceMonitor/interval", "pattern"),
    ({"networkPolicy": {"apiServerCIDRs": ["10.0.0.1"]}}, "/networkPolicy/apiServerCIDRs/0", "pattern"),
    ({"extraEnv": [{"name": "X", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}]},
     "/extraEnv/0/valueFrom", "not"),
    ({"unknownKey": 1}, "unknownKey", "not allowed"),
    ({"image": {"tagg": "typo"}}, "tagg", "not allowed"),
]


@pytest.mark.parametrize("values,path,reason", BAD_VALUES, ids=[p for _, p, _ in BAD_VALUES])
def test_bad_values_are_rejected_with_a_message_naming_them(values, path, reason):
    with helm_python.Chart.load(CHART) as chart:
        with pytest.raises(helm_python.HelmValuesError) as err:
            chart.validate_schema(chart.merge_values(values))
    message = str(err.value)
    assert path in message and reason in message, message
    # And an install with them renders nothing.
    with pytest.raises(helm_python.HelmValuesError):
        render(values)


def test_port_clash_fails_the_render_with_a_message():
    with pytest.raises(helm_python.HelmError, match="metrics.port and health.port must differ"):
        render({"metrics": {"port": 8081}})


@pytest.mark.parametrize("values", [{}, "full", {"watchNamespace": "ml"}, {"watchNamespace": ["a", "b-2"]},
                                    {"metrics": {"enabled": False}, "networkPolicy": {"enabled": False}}])
def test_good_values_pass_the_schema(values):
    values = full_values() if values == "full" else values
    with helm_python.Chart.load(CHART) as chart:
        chart.validate_schema(chart.merge_values(values))
    assert render(values)
