"""How the serving workload scales (kompressor.core.scaling), decided from spec.serving alone: fixed replicas
or an HPA that owns the count, a PodDisruptionBudget, spreading over nodes, a CPU request for a CPU target,
readiness under an HPA, and which scaling objects to delete when the spec drops them."""

from __future__ import annotations

import pytest

from kompressor.api import defaults as d
from kompressor.api.spec import ServingSpec
from kompressor.api.wire import from_wire
from kompressor.core.scaling import HPA, PDB, plan, to_delete, wanted_ready


def serving(**wire) -> ServingSpec:
    return from_wire(ServingSpec, wire, "spec.serving")


@pytest.mark.parametrize("replicas, budget, spread", [(0, False, False), (1, False, False), (2, True, True),
                                                      (100, True, True)])
def test_fixed_replicas_are_applied_with_a_budget_and_spreading_above_one(replicas, budget, spread):
    scale = plan(serving(replicas=replicas))
    assert (scale.replicas, scale.create_replicas) == (replicas, replicas)
    assert scale.autoscaler is None and scale.min_ready is None and scale.cpu_request is None
    assert (scale.disruption_budget, scale.spread) == (budget, spread)
    assert scale.owned == ({PDB} if budget else set())


def test_the_default_is_one_replica_and_nothing_else():
    scale = plan(ServingSpec())
    assert scale.replicas == d.SERVING_REPLICAS == 1
    assert scale.owned == frozenset() and not scale.spread


def test_autoscaling_leaves_the_count_to_the_hpa_and_creates_at_min_replicas():
    scale = plan(serving(replicas=7, autoscaling={"minReplicas": 2, "maxReplicas": 5, "targetConcurrency": 8}))
    assert scale.replicas is None  # replicas (7) is not applied: the HPA owns the count
    assert scale.create_replicas == 2
    assert scale.autoscaler.metric == "concurrency" and scale.autoscaler.target == 8
    assert (scale.autoscaler.min_replicas, scale.autoscaler.max_replicas) == (2, 5)
    assert scale.owned == {HPA, PDB}
    assert scale.spread and scale.min_ready == 2
    assert scale.cpu_request is None  # a concurrency target divides by nothing


def test_autoscaling_to_one_replica_at_most_keeps_a_budget_but_does_not_spread():
    scale = plan(serving(autoscaling={"maxReplicas": 1, "targetCPUUtilization": 60}))
    assert scale.owned == {HPA, PDB}
    assert not scale.spread
    assert scale.create_replicas == scale.min_ready == d.SERVING_AUTOSCALING_MIN_REPLICAS


@pytest.mark.parametrize("resources, added", [
    (None, None),  # the default resources request CPU
    ({"requests": {"cpu": "500m", "memory": "1Gi"}}, None),
    ({"limits": {"cpu": "2"}}, None),  # the API server copies a lone CPU limit into the request
    ({"requests": {"memory": "1Gi"}, "limits": {"memory": "2Gi"}}, d.SERVING_AUTOSCALING_CPU_REQUEST),
    ({}, None),  # empty: the defaults apply
])
def test_a_cpu_target_gets_a_cpu_request_when_the_spec_sets_none(resources, added):
    spec = {"autoscaling": {"maxReplicas": 4, "targetCPUUtilization": 70}}
    if resources is not None:
        spec["resources"] = resources
    assert plan(serving(**spec)).cpu_request == added
    # the same resources with a concurrency target are never touched
    spec["autoscaling"] = {"maxReplicas": 4, "targetConcurrency": 3}
    assert plan(serving(**spec)).cpu_request is None


def test_dropped_scaling_objects_are_deleted_and_kept_ones_are_not():
    auto = plan(serving(autoscaling={"maxReplicas": 4, "targetConcurrency": 3}))
    fixed_two, fixed_one = plan(serving(replicas=2)), plan(serving(replicas=1))
    assert to_delete(auto.owned, fixed_two) == [HPA]  # autoscaling removed: the HPA goes, the budget stays
    assert to_delete(auto.owned, fixed_one) == [HPA, PDB]
    assert to_delete(fixed_two.owned, fixed_one) == [PDB]
    assert to_delete(fixed_one.owned, auto) == []  # made, not deleted
    assert to_delete(frozenset(), fixed_one) == []  # a Deployment that records nothing: nothing to ask for
    assert to_delete({HPA, PDB}, auto) == []


@pytest.mark.parametrize("replicas, min_ready, wanted", [(3, None, 3), (0, None, 0), (5, 2, 2), (1, 2, 1),
                                                         (2, 2, 2)])
def test_under_an_hpa_serving_is_ready_with_min_replicas_ready(replicas, min_ready, wanted):
    """Scaling up under load adds Pods that are not ready yet: that must not clear Ready."""
    assert wanted_ready(replicas, min_ready) == wanted
