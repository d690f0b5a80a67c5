"""How the serving workload scales: fixed replicas or a HorizontalPodAutoscaler, a PodDisruptionBudget,
spreading over nodes, and which of those objects to remove. Pure: spec (and what the serving Deployment
records) in, decisions out; kompressor.k8s.scaling builds the objects.

- ``spec.serving.autoscaling`` set: the HPA owns the replica count. The Deployment is created with
  ``minReplicas`` replicas and later patches leave ``spec.replicas`` out (a merge patch keeps what the HPA
  set), as Argo Rollouts and KServe do; readiness then asks for ``minReplicas`` ready Pods, not for every
  Pod the HPA has just added.
- More than one replica, or autoscaling: a PodDisruptionBudget (``maxUnavailable`` 1).
- Possibly more than one replica: a soft ``topologySpreadConstraint`` over hostnames.
- A CPU-utilisation target needs a CPU request on the container (utilisation is a percentage of it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from kompressor.api import defaults as d
from kompressor.api.spec import ServingSpec

HPA = "HorizontalPodAutoscaler"
PDB = "PodDisruptionBudget"
OwnedKind = Literal["HorizontalPodAutoscaler", "PodDisruptionBudget"]


@dataclass(frozen=True)
class Autoscaler:
    min_replicas: int
    max_replicas: int
    metric: Literal["cpu", "concurrency"]
    target: int  # percent of the CPU request, or requests in flight per Pod


@dataclass(frozen=True)
class ServingScale:
    replicas: int | None  # the Deployment's spec.replicas on every apply; None: left to the HPA
    create_replicas: int  # spec.replicas when the Deployment is first created
    autoscaler: Autoscaler | None
    disruption_budget: bool
    spread: bool
    min_ready: int | None  # with an HPA: Pods that must be ready for serving to count as ready
    cpu_request: str | None  # a CPU request to add to the serving container (None: it has one)

    @property
    def owned(self) -> frozenset[str]:
        """The scaling objects the CompressedModel owns beside its Deployment."""
        return frozenset(k for k, on in ((HPA, self.autoscaler is not None), (PDB, self.disruption_budget)) if on)


def has_cpu_request(resources: dict | None) -> bool:
    """Whether the serving container gets a CPU request: the spec's (or, given a CPU limit alone, the API
    server's copy of it), or the default resources' when the spec sets none."""
    given = resources or d.SERVING_RESOURCES
    return any("cpu" in (given.get(part) or {}) for part in ("requests", "limits"))


def plan(serving: ServingSpec) -> ServingScale:
    auto = serving.autoscaling
    if auto is None:
        n = serving.replicas
        return ServingScale(replicas=n, create_replicas=n, autoscaler=None, disruption_budget=n > 1,
                            spread=n > 1, min_ready=None, cpu_request=None)
    if auto.target_cpu_utilization is not None:
        autoscaler = Autoscaler(auto.min_replicas, auto.max_replicas, "cpu", auto.target_cpu_utilization)
    else:
        autoscaler = Autoscaler(auto.min_replicas, auto.max_replicas, "concurrency", auto.target_concurrency)
    cpu_request = None
    if autoscaler.metric == "cpu" and not has_cpu_request(serving.resources):
        cpu_request = d.SERVING_AUTOSCALING_CPU_REQUEST
    return ServingScale(replicas=None, create_replicas=auto.min_replicas, autoscaler=autoscaler,
                        disruption_budget=True, spread=auto.max_replicas > 1, min_ready=auto.min_replicas,
                        cpu_request=cpu_request)


def to_delete(recorded: frozenset[str] | set[str], scale: ServingScale) -> list[str]:
    """The scaling objects the serving Deployment says were made and the spec no longer wants, in a stable
    order. Deleted before the Deployment is patched to record the new set, so a crash in between only
    repeats a delete (404 is success)."""
    return sorted(set(recorded) - scale.owned)


def wanted_ready(replicas: int, min_ready: int | None) -> int:
    """How many updated, ready Pods make the serving Deployment ready: every replica, or with an HPA at
    most minReplicas of them (Pods it adds under load are not a reason to leave Ready)."""
    return replicas if min_ready is None else min(replicas, min_ready)
