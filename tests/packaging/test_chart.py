"""The Helm chart, rendered by Helm's own engine: lint, CRD source of truth, what the defaults and
the full-featured values produce, and how the operator Pod is locked down."""

from __future__ import annotations

import helm_python
import pytest
import yaml

from chartkit import CHART, NAMESPACE, REPO, find, full_values, one, render


def operator_container(objects: list[dict]) -> dict:
    deployment = one(objects, "Deployment")
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    return container


def args_of(objects: list[dict]) -> list[str]:
    return operator_container(objects)["args"]


@pytest.mark.parametrize("values", ["default", "full"])
def test_helm_lint_strict_is_clean(values):
    report = helm_python.lint(CHART, full_values() if values == "full" else None, strict=True,
                              namespace=NAMESPACE, kube_version="v1.30.0")
    problems = [m for m in report["messages"] if m["severity"] >= 2] + report["errors"]
    assert problems == []
    assert report["total_charts_linted"] == 1


def test_chart_crd_is_a_byte_identical_copy_of_the_generated_one():
    source = REPO / "crds" / "compressedmodels.kompressor.io.yaml"
    copy = CHART / "crds" / "compressedmodels.kompressor.io.yaml"
    assert copy.read_bytes() == source.read_bytes(), (
        "charts/kompressor/crds/ is out of date: run python charts/render_bundle.py")


def test_crds_of_the_chart_are_what_helm_installs_first():
    with helm_python.Chart.load(CHART) as chart:
        names = sorted(doc["metadata"]["name"] for crd in chart.crds for doc in yaml.safe_load_all(crd["data"]) if doc)
    assert names == ["clusterkopfpeerings.kopf.dev", "compressedmodels.kompressor.io", "kopfpeerings.kopf.dev"]


def test_defaults_install_a_cluster_wide_peered_operator_without_gpus(default_objects):
    kinds = sorted({o["kind"] for o in default_objects})
    assert kinds == sorted(["ClusterKopfPeering", "ClusterRole", "ClusterRoleBinding", "Deployment",
                            "NetworkPolicy", "PersistentVolumeClaim", "Service", "ServiceAccount"])
    args = args_of(default_objects)
    assert "--all-namespaces" in args and "--peering=kompressor" in args
    assert "--artifact-store=pvc://kompressor-artifacts/artifacts" in args
    container = operator_container(default_objects)
    assert "nvidia.com/gpu" not in str(container["resources"])
    assert not find(default_objects, "Role") and not find(default_objects, "PriorityClass")
    # The peering object Kopf joins exists, cluster-wide, under the name the operator is given.
    assert one(default_objects, "ClusterKopfPeering")["metadata"]["name"] == "kompressor"


def test_every_namespaced_object_names_its_namespace(renderings):
    cluster_scoped = {"ClusterRole", "ClusterRoleBinding", "ClusterKopfPeering", "PriorityClass",
                      "CustomResourceDefinition", "Namespace"}
    for label, objects in renderings.items():
        for o in objects:
            if o["kind"] not in cluster_scoped:
                assert o["metadata"].get("namespace"), f"{label}: {o['kind']} {o['metadata']['name']}"


def test_operator_pod_is_locked_down(renderings):
    for label, objects in renderings.items():
        pod = one(objects, "Deployment")["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        [container] = pod["containers"]
        sc = container["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True, label
        assert sc["allowPrivilegeEscalation"] is False, label
        assert sc["capabilities"]["drop"] == ["ALL"] and "add" not in sc["capabilities"], label
        assert sc["seccompProfile"] == {"type": "RuntimeDefault"}, label
        assert container["resources"]["requests"] and container["resources"]["limits"], label
        # A read-only root needs a writable /tmp.
        tmp = next(m for m in container["volumeMounts"] if m["mountPath"] == "/tmp")
        assert "emptyDir" in next(v for v in pod["volumes"] if v["name"] == tmp["name"])


def test_probes_use_kopfs_liveness_endpoint_on_the_port_the_operator_is_given(renderings):
    for label, objects in renderings.items():
        container = operator_container(objects)
        liveness = next(a for a in container["args"] if a.startswith("--liveness="))
        url = liveness.split("=", 1)[1]
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        path = "/" + url.split("/", 3)[3]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            http = container[probe]["httpGet"]
            assert http["path"] == path and ports[http["port"]] == port, (label, probe)


def test_metrics_service_targets_the_port_the_operator_serves(renderings):
    for label, objects in renderings.items():
        container = operator_container(objects)
        port = int(next(a for a in container["args"] if a.startswith("--metrics-port=")).split("=")[1])
        service = one(objects, "Service")
        assert service["spec"]["ports"][0]["targetPort"] == "metrics"
        assert {p["name"]: p["containerPort"] for p in container["ports"]}["metrics"] == port, label
        # The Service selects the operator Pod.
        labels = one(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
        assert service["spec"]["selector"].items() <= labels.items()


def test_artifacts_claim_is_mounted_where_the_store_uri_says(renderings):
    from kompressor.store.stores import DEFAULT_PVC_ROOT

    for label, objects in renderings.items():
        container = operator_container(objects)
        store = next(a for a in container["args"] if a.startswith("--artifact-store=")).split("=", 1)[1]
        assert store.startswith("pvc://")
        claim = store[len("pvc://"):].split("/")[0]
        pod = one(objects, "Deployment")["spec"]["template"]["spec"]
        volume = next(v for v in pod["volumes"] if v.get("persistentVolumeClaim"))
        assert volume["persistentVolumeClaim"]["claimName"] == claim
        mount = next(m for m in container["volumeMounts"] if m["name"] == volume["name"])
        assert mount["mountPath"] == f"{DEFAULT_PVC_ROOT}/{claim}", label
        assert one(objects, "PersistentVolumeClaim")["metadata"]["name"] == claim


def test_existing_claim_is_used_and_none_is_created():
    objects = render({"artifacts": {"persistence": {"enabled": False, "existingClaim": "shared-models"}}})
    assert not find(objects, "PersistentVolumeClaim")
    assert "--artifact-store=pvc://shared-models/artifacts" in args_of(objects)


def test_namespaced_mode_grants_roles_only_in_the_watched_namespaces(full_objects, renderings):
    args = args_of(full_objects)
    assert [a for a in args if a.startswith("--namespace=")] == ["--namespace=team-a", "--namespace=team-b"]
    assert "--all-namespaces" not in args
    assert sorted(r["metadata"]["namespace"] for r in find(full_objects, "Role")) == ["team-a", "team-b"]
    assert sorted(b["metadata"]["namespace"] for b in find(full_objects, "RoleBinding")) == ["team-a", "team-b"]
    # One KopfPeering per watched namespace; no cluster peering.
    peerings = find(full_objects, "KopfPeering")
    assert sorted(p["metadata"]["namespace"] for p in peerings) == ["team-a", "team-b"]
    assert {p["metadata"]["name"] for p in peerings} == {"kompressor-peers"}
    assert "--peering=kompressor-peers" in args and not find(full_objects, "ClusterKopfPeering")
    # A single namespace given as a string works too; standalone when peering is off, never two at once.
    single = renderings["namespaced"]
    assert [a for a in args_of(single) if a.startswith("--")][:1] == ["--namespace=ml"]
    assert "--standalone" in args_of(single) and not find(single, "KopfPeering")
    assert one(single, "Deployment")["spec"]["strategy"] == {"type": "Recreate"}


def test_optional_features_render_when_enabled(full_objects):
    service_monitor = one(full_objects, "ServiceMonitor")
    assert service_monitor["spec"]["endpoints"][0]["port"] == "metrics"
    assert service_monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    pod_monitor = one(full_objects, "PodMonitor")
    assert pod_monitor["spec"]["namespaceSelector"] == {"matchNames": ["team-a", "team-b"]}
    priority = one(full_objects, "PriorityClass")
    assert priority["value"] == 100000 and priority["globalDefault"] is False
    policy = one(full_objects, "NetworkPolicy")
    assert set(policy["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    dashboard = one(full_objects, "ConfigMap", namespace="monitoring")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    image = operator_container(full_objects)["image"]
    assert image.endswith("@sha256:" + "0123456789abcdef" * 4)
    claim = one(full_objects, "PersistentVolumeClaim")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"] and claim["spec"]["storageClassName"] == "nfs-client"
    # checkov's image checks pass on their own once a digest and Always are set: no skip annotations left.
    annotations = one(full_objects, "Deployment")["metadata"]["annotations"]
    assert not [v for v in annotations.values() if v.startswith(("CKV_K8S_43", "CKV_K8S_15"))]


def test_optional_features_are_off_by_default(default_objects):
    for kind in ("ServiceMonitor", "PodMonitor", "PriorityClass", "ConfigMap", "Role", "KopfPeering"):
        assert not find(default_objects, kind), kind


def test_notes_tell_the_user_what_to_do_next():
    with helm_python.Chart.load(CHART) as chart:
        notes = chart.render({}, name="kompressor", namespace="models", is_install=True)["kompressor/templates/NOTES.txt"]
    assert "kubectl -n models rollout status deployment/kompressor" in notes
    assert "examples/digits-cpu.yaml" in notes and "get compressedmodels" in notes
    assert "kompressor.io/approve" in notes and "create your CompressedModels in \"models\"" in notes


def test_notes_point_to_a_watched_namespace_when_the_release_namespace_is_not_watched():
    with helm_python.Chart.load(CHART) as chart:
        notes = chart.render({"watchNamespace": ["team-a", "team-b"]}, name="kompressor", namespace="ops",
                             is_install=True)["kompressor/templates/NOTES.txt"]
    assert "kubectl -n team-a get compressedmodels" in notes
    assert "which the operator does not watch" in notes and 'a claim named "kompressor-artifacts"' in notes


def test_the_operator_cli_accepts_what_the_chart_passes(renderings):
    """The image's entrypoint is `kompressor operator`; the chart's args go after it."""
    from kompressor.cli import build_parser
    from kompressor.k8s.config import OperatorConfig
    from kompressor.k8s.storage import pod_store

    for label, objects in renderings.items():
        container = operator_container(objects)
        config = OperatorConfig.from_args(build_parser().parse_args(["operator", *container["args"]]))
        namespaces = [a.split("=", 1)[1] for a in container["args"] if a.startswith("--namespace=")]
        assert config.clusterwide == (not namespaces) and list(config.namespaces) == namespaces, label
        peering = one(objects, "Deployment")["spec"].get("strategy") != {"type": "Recreate"}
        assert config.standalone == (not peering), label
        if peering:  # the peering object Kopf will look for exists under that name
            peers = find(objects, "ClusterKopfPeering") + find(objects, "KopfPeering")
            assert {p["metadata"]["name"] for p in peers} == {config.peering}, label
        # The store the operator is given is one its Pods can mount, at the path the chart mounts it.
        store = pod_store(config.artifact_store)
        mounts = {m["mountPath"] for m in container["volumeMounts"]}
        assert store.mount["mountPath"] in mounts, label
        assert config.metrics_port == {p["name"]: p["containerPort"] for p in container["ports"]}["metrics"]
