"""The process kubelet (e2e/cluster/kubelet.py) with the real control plane: Nodes, Pods as processes,
env and volumes, the ServiceAccount token (in-cluster config against the real authenticator), probes,
exit codes, deletion with grace periods, and the real Job / Deployment / EndpointSlice controllers on top."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

import pytest

from support.polling import wait

NAMESPACE = "kubelet-checks"
PY = "python:3.11-slim"  # not pulled: `python` is the venv's

pytestmark = [pytest.mark.slow, pytest.mark.cluster]


@pytest.fixture(scope="module")
def core(cluster, api_client):
    from kubernetes import client

    cluster.kubectl("create", "namespace", NAMESPACE, check=False)
    wait(lambda: _has_default_account(client.CoreV1Api(api_client)), 60, "the namespace's default ServiceAccount")
    yield client.CoreV1Api(api_client)
    cluster.kubectl("delete", "namespace", NAMESPACE, "--wait=false", check=False)


def _has_default_account(core) -> bool:
    return any(a.metadata.name == "default" for a in core.list_namespaced_service_account(NAMESPACE).items)


def _pod(name: str, script: str, **spec) -> dict:
    container = {"name": "main", "image": PY, "command": ["python", "-c", script]}
    container.update(spec.pop("container", {}))
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": NAMESPACE},
            "spec": {"restartPolicy": "Never", "containers": [container], **spec}}


def _phase(core, name: str) -> str | None:
    from kubernetes.client.exceptions import ApiException

    try:
        return core.read_namespaced_pod(name, NAMESPACE).status.phase
    except ApiException as err:
        if err.status == 404:
            return "Gone"
        raise


def test_nodes_are_registered_ready_with_capacity_taints_and_leases(cluster, api_client):
    from kubernetes import client

    nodes = {n.metadata.name: n for n in client.CoreV1Api(api_client).list_node().items}
    assert set(nodes) >= {"kompressor-cpu", "kompressor-gpu"}
    gpu, cpu = nodes["kompressor-gpu"], nodes["kompressor-cpu"]
    for node in (gpu, cpu):
        ready = [c for c in node.status.conditions if c.type == "Ready"]
        assert ready and ready[0].status == "True"
    assert gpu.status.allocatable["nvidia.com/gpu"] == "1" and "nvidia.com/gpu" not in cpu.status.allocatable
    assert [(t.key, t.value, t.effect) for t in gpu.spec.taints] == [("nvidia.com/gpu", "present", "NoSchedule")]
    assert not cpu.spec.taints
    lease = client.CoordinationV1Api(api_client).read_namespaced_lease("kompressor-gpu", "kube-node-lease")
    age = (datetime.now(timezone.utc) - lease.spec.renew_time).total_seconds()
    assert age < 30, f"lease renewed {age:.0f} s ago"


SCRIPT = r"""
import json, os, pathlib, ssl, urllib.request
from kubernetes import client
out = {"env": {k: os.environ.get(k) for k in ("POD_NAME", "POD_IP", "NODE", "FROM_CM", "FROM_SECRET", "LIMIT")}}
# Paths reach a process through its argv and env (there the kubelet maps them into the Pod's root).
out["file"] = pathlib.Path(os.environ["SETTINGS"], "greeting").read_text()
pathlib.Path(os.environ["SCRATCH"], "x").write_text("written")
out["scratch"] = pathlib.Path(os.environ["SCRATCH"], "x").read_text()
out["namespace"] = pathlib.Path(os.environ["SA"], "namespace").read_text()
# The loader our jobs use in a Pod (kubernetes 36's own in-cluster loader and generated client disagree on
# where the token goes, so its bare pair calls as system:anonymous).
from kompressor.k8s.client import load_configuration
api = client.ApiClient(load_configuration())
review = client.AuthenticationV1Api(api).create_self_subject_review(
    {"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"})
out["user"] = review.status.user_info.username
print(json.dumps(out), flush=True)
"""


def test_a_pod_gets_its_env_volumes_address_and_service_account(core, cluster):
    core.create_namespaced_config_map(NAMESPACE, {"metadata": {"name": "settings"},
                                                  "data": {"greeting": "hello", "key": "from-configmap"}})
    core.create_namespaced_secret(NAMESPACE, {"metadata": {"name": "creds"}, "stringData": {"password": "s3cret"}})
    env = [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
           {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
           {"name": "NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
           {"name": "FROM_CM", "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "key"}}},
           {"name": "FROM_SECRET", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "password"}}},
           {"name": "LIMIT", "valueFrom": {"resourceFieldRef": {"resource": "limits.memory"}}},
           {"name": "SETTINGS", "value": "/etc/settings"}, {"name": "SCRATCH", "value": "/scratch"},
           {"name": "SA", "value": "/var/run/secrets/kubernetes.io/serviceaccount"}]
    pod = _pod("everything", SCRIPT, container={
        "env": env, "resources": {"limits": {"memory": "256Mi"}},
        "volumeMounts": [{"name": "settings", "mountPath": "/etc/settings"}, {"name": "scratch", "mountPath": "/scratch"}]},
        volumes=[{"name": "settings", "configMap": {"name": "settings"}}, {"name": "scratch", "emptyDir": {}}])
    core.create_namespaced_pod(NAMESPACE, pod)
    wait(lambda: _phase(core, "everything") in ("Succeeded", "Failed"), 120, "the Pod to finish",
         lambda: cluster.pod_logs(NAMESPACE, "everything") + cluster.diagnostics())
    status = core.read_namespaced_pod("everything", NAMESPACE).status
    logs = cluster.pod_logs(NAMESPACE, "everything")
    assert status.phase == "Succeeded", logs
    assert status.container_statuses[0].state.terminated.exit_code == 0
    ip = status.pod_ip
    assert ip.startswith(("10.244.", "127.")) and ip != "127.0.0.1"  # its own address (kubelet --pod-cidr)
    out = json.loads([line for line in logs.splitlines() if line.startswith("{")][-1])
    assert out["env"] == {"POD_NAME": "everything", "POD_IP": ip, "NODE": "kompressor-cpu", "FROM_CM": "from-configmap",
                          "FROM_SECRET": "s3cret", "LIMIT": str(256 * 2**20)}
    assert out["file"] == "hello" and out["scratch"] == "written" and out["namespace"] == NAMESPACE
    assert out["user"] == f"system:serviceaccount:{NAMESPACE}:default"  # the real authenticator took the token


def test_exit_codes_and_deletion_grace(core, cluster):
    core.create_namespaced_pod(NAMESPACE, _pod("exits-3", "raise SystemExit(3)"))
    stubborn = ("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); "
                "time.sleep(600)")
    core.create_namespaced_pod(NAMESPACE, _pod("stubborn", stubborn, terminationGracePeriodSeconds=2))
    polite = "import time; print('up', flush=True); time.sleep(600)"
    core.create_namespaced_pod(NAMESPACE, _pod("polite", polite, terminationGracePeriodSeconds=30))
    wait(lambda: _phase(core, "exits-3") == "Failed", 60, "exits-3 to fail", cluster.diagnostics)
    assert core.read_namespaced_pod("exits-3", NAMESPACE).status.container_statuses[0].state.terminated.exit_code == 3
    for name in ("stubborn", "polite"):
        wait(lambda: "up" in cluster.pod_logs(NAMESPACE, name), 60, f"{name} to run", cluster.diagnostics)
    started = time.monotonic()
    core.delete_namespaced_pod("polite", NAMESPACE)  # exits on SIGTERM at once
    wait(lambda: _phase(core, "polite") == "Gone", 30, "polite to be gone")
    assert time.monotonic() - started < 10
    started = time.monotonic()
    core.delete_namespaced_pod("stubborn", NAMESPACE)  # ignores SIGTERM: SIGKILL after its 2 s
    wait(lambda: _phase(core, "stubborn") == "Gone", 30, "stubborn to be gone")
    assert 2 <= time.monotonic() - started < 15


def test_termination_messages_are_reported_as_the_kubelet_reports_them(core, cluster):
    """What a container writes to its terminationMessagePath becomes state.terminated.message; with
    FallbackToLogsOnError, a failed container that wrote nothing gets the last 80 lines of its log."""
    writes = "import os; open(os.environ['WHY'], 'w').write('the reason it failed'); raise SystemExit(3)"
    core.create_namespaced_pod(NAMESPACE, _pod("says-why", writes, container={
        "env": [{"name": "WHY", "value": "/dev/termination-log"}]}))  # the API server's default path
    crashes = "for i in range(100): print('line', i)\nraise SystemExit(1)"
    core.create_namespaced_pod(NAMESPACE, _pod("crashes", crashes, container={
        "terminationMessagePolicy": "FallbackToLogsOnError"}))
    for name in ("says-why", "crashes"):
        wait(lambda: _phase(core, name) == "Failed", 60, f"{name} to fail", cluster.diagnostics)
    said = core.read_namespaced_pod("says-why", NAMESPACE).status.container_statuses[0].state.terminated
    assert (said.exit_code, said.message) == (3, "the reason it failed")
    crashed = core.read_namespaced_pod("crashes", NAMESPACE).status.container_statuses[0].state.terminated
    assert crashed.exit_code == 1 and crashed.message.splitlines() == [f"line {i}" for i in range(20, 100)]


def test_probes_restarts_and_endpoints(core, cluster, api_client):
    from kubernetes import client

    apps, discovery = client.AppsV1Api(api_client), client.DiscoveryV1Api(api_client)
    labels = {"app": "web"}
    container = {"name": "web", "image": PY, "command": ["python", "-m", "http.server", "8000", "--bind", "0.0.0.0"],
                 "ports": [{"name": "http", "containerPort": 8000}],
                 "readinessProbe": {"httpGet": {"path": "/", "port": "http"}, "periodSeconds": 1},
                 "livenessProbe": {"tcpSocket": {"port": 8000}, "periodSeconds": 2}}
    apps.create_namespaced_deployment(NAMESPACE, {
        "metadata": {"name": "web"}, "spec": {"replicas": 2, "selector": {"matchLabels": labels},
                                              "template": {"metadata": {"labels": labels}, "spec": {"containers": [container]}}}})
    core.create_namespaced_service(NAMESPACE, {"metadata": {"name": "web"}, "spec": {
        "selector": labels, "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}})

    def ready_endpoints():
        out = []
        for item in discovery.list_namespaced_endpoint_slice(NAMESPACE, label_selector="kubernetes.io/service-name=web").items:
            out += [e.addresses[0] for e in item.endpoints or [] if e.conditions.ready]
        return sorted(out) if len(out) == 2 else None

    ips = wait(ready_endpoints, 120, "two ready endpoints", cluster.diagnostics)
    assert len(set(ips)) == 2  # both replicas listen on :8000, each on its own address
    for ip in ips:
        with urllib.request.urlopen(f"http://{ip}:8000/", timeout=5) as resp:
            assert resp.status == 200
    assert apps.read_namespaced_deployment("web", NAMESPACE).status.ready_replicas == 2

    # A failing liveness probe (exec) makes the kubelet restart the container.
    core.create_namespaced_pod(NAMESPACE, _pod("unhealthy", "import time; time.sleep(600)", restartPolicy="Always",
                                                container={"livenessProbe": {"exec": {"command": ["false"]},
                                                                             "periodSeconds": 1, "failureThreshold": 1}},
                                                terminationGracePeriodSeconds=1))
    wait(lambda: (s := core.read_namespaced_pod("unhealthy", NAMESPACE).status.container_statuses)
         and s[0].restart_count >= 1, 60, "a liveness restart", cluster.diagnostics)


DNS_CLIENT = r"""
import json, socket, sys, urllib.request
try:
    addresses = sorted({i[4][0] for i in socket.getaddrinfo(sys.argv[1], 8081, socket.AF_INET, socket.SOCK_STREAM)})
    print(json.dumps({"addresses": addresses}), flush=True)
    for name in sys.argv[1:]:
        with urllib.request.urlopen(f"http://{name}:8081/", timeout=10) as resp:
            assert resp.status == 200, resp.status
except (socket.gaierror, OSError) as err:
    reason = getattr(err, "reason", err)  # urllib wraps it in a URLError
    print("failed:", repr(reason), flush=True)
    if isinstance(reason, socket.gaierror):
        raise SystemExit(7 if reason.errno == socket.EAI_NONAME else 8)
    raise
"""


def test_pods_resolve_service_names_to_ready_endpoints(core, cluster, api_client):
    """No cluster DNS: the kubelet keeps each Service's ready endpoint addresses in a file and podshim answers
    getaddrinfo from it, as for a headless Service (port == targetPort: nothing remaps ports)."""
    from kubernetes import client

    discovery = client.DiscoveryV1Api(api_client)
    server = _pod("dns-server", "", terminationGracePeriodSeconds=1, container={
        "command": ["python", "-m", "http.server", "8081", "--bind", "0.0.0.0"],
        "readinessProbe": {"httpGet": {"path": "/", "port": 8081}, "periodSeconds": 1}})
    server["metadata"]["labels"] = {"app": "dns-web"}
    core.create_namespaced_pod(NAMESPACE, server)
    for name, app in (("dns-web", "dns-web"), ("dns-nobody", "nobody")):  # the second selects no Pod
        core.create_namespaced_service(NAMESPACE, {"metadata": {"name": name}, "spec": {
            "selector": {"app": app}, "ports": [{"port": 8081, "targetPort": 8081}]}})

    def slices(service):
        return discovery.list_namespaced_endpoint_slice(
            NAMESPACE, label_selector=f"kubernetes.io/service-name={service}").items

    def ready_addresses():
        return [a for item in slices("dns-web") for e in item.endpoints or [] if e.conditions.ready for a in e.addresses]

    server_ips = wait(ready_addresses, 120, "a ready endpoint of dns-web", cluster.diagnostics)
    assert server_ips == [core.read_namespaced_pod("dns-server", NAMESPACE).status.pod_ip]
    wait(lambda: slices("dns-nobody"), 60, "the (empty) EndpointSlice of dns-nobody", cluster.diagnostics)
    dns_file = cluster.kubelet_dir / "dns" / "services.json"
    wait(lambda: json.loads(dns_file.read_text()).get(f"dns-nobody.{NAMESPACE}.svc") == []
         and json.loads(dns_file.read_text()).get(f"dns-web.{NAMESPACE}.svc") == server_ips,
         30, "the kubelet's DNS file to hold both Services", lambda: dns_file.read_text())

    core.create_namespaced_pod(NAMESPACE, _pod("resolves-services", DNS_CLIENT, container={
        "args": [f"dns-web.{NAMESPACE}.svc", "dns-web"]}))
    core.create_namespaced_pod(NAMESPACE, _pod("resolves-nothing", DNS_CLIENT, container={
        "args": [f"dns-nobody.{NAMESPACE}.svc"]}))
    for name in ("resolves-services", "resolves-nothing"):
        wait(lambda: _phase(core, name) in ("Succeeded", "Failed"), 60, f"{name} to finish",
             lambda: cluster.pod_logs(NAMESPACE, name) + cluster.diagnostics())
    logs = cluster.pod_logs(NAMESPACE, "resolves-services")
    assert _phase(core, "resolves-services") == "Succeeded", logs
    out = json.loads([line for line in logs.splitlines() if line.startswith("{")][-1])
    assert out["addresses"] == server_ips  # the Pod's own address: no ClusterIP, no kube-proxy
    # A Service without ready endpoints does not resolve (EAI_NONAME), as a real resolver answers.
    nothing = core.read_namespaced_pod("resolves-nothing", NAMESPACE).status.container_statuses[0].state.terminated
    assert nothing.exit_code == 7, cluster.pod_logs(NAMESPACE, "resolves-nothing")


def test_jobs_complete_and_a_failed_job_stops_on_its_pod_failure_policy(core, cluster, api_client):
    from kubernetes import client

    batch = client.BatchV1Api(api_client)

    def job(name: str, code: int) -> dict:
        return {"metadata": {"name": name}, "spec": {
            "backoffLimit": 3,
            "podFailurePolicy": {"rules": [{"action": "FailJob", "onExitCodes": {"operator": "In", "values": [2]}}]},
            "template": {"spec": {"restartPolicy": "Never", "containers": [
                {"name": "main", "image": PY, "command": ["python", "-c", f"raise SystemExit({code})"]}]}}}}

    batch.create_namespaced_job(NAMESPACE, job("succeeds", 0))
    batch.create_namespaced_job(NAMESPACE, job("bad-input", 2))

    def condition(name: str):
        status = batch.read_namespaced_job(name, NAMESPACE).status
        done = [c for c in status.conditions or [] if c.type in ("Complete", "Failed") and c.status == "True"]
        return (done[0], status) if done else None

    done, status = wait(lambda: condition("succeeds"), 120, "the Job to complete", cluster.diagnostics)
    assert done.type == "Complete" and status.succeeded == 1
    done, status = wait(lambda: condition("bad-input"), 120, "the bad-input Job to fail", cluster.diagnostics)
    assert done.type == "Failed" and done.reason == "PodFailurePolicy" and status.failed == 1


def test_a_second_kubelet_gives_its_pods_addresses_of_its_own(core, cluster, tmp_path):
    """Two process kubelets on one machine (a test session's cluster and up.sh's, say) share the Pod
    network on lo: each takes its own /24 of it, so no two Pods get one address."""
    from kubernetes.client import V1DeleteOptions

    kubelet_py = Path(__file__).resolve().parents[2] / "e2e" / "cluster" / "kubelet.py"
    ready = tmp_path / "ready"
    with open(tmp_path / "kubelet.log", "wb") as out:
        second = subprocess.Popen([sys.executable, str(kubelet_py), "--kubeconfig", str(cluster.kubeconfig),
                                   "--state-dir", str(tmp_path / "state"), "--ready-file", str(ready),
                                   "--cpu-node", "second-cpu", "--gpu-node", "", "--no-provision"],
                                  stdout=out, stderr=subprocess.STDOUT)
    names = {"first-kubelet": "kompressor-cpu", "second-kubelet": "second-cpu"}
    try:
        wait(lambda: ready.exists() or second.poll() is not None, 60, "the second kubelet to be ready")
        assert second.poll() is None, (tmp_path / "kubelet.log").read_text()[-3000:]
        for name, node in names.items():
            core.create_namespaced_pod(NAMESPACE, _pod(name, "import time; time.sleep(600)", nodeName=node,
                                                       terminationGracePeriodSeconds=1))

        def addresses():
            pods = [core.read_namespaced_pod(name, NAMESPACE).status for name in names]
            return [p.pod_ip for p in pods] if all(p.phase == "Running" and p.pod_ip for p in pods) else None

        first_ip, second_ip = wait(addresses, 60, "both Pods to run with an address",
                                   lambda: cluster.diagnostics() + (tmp_path / "kubelet.log").read_text()[-2000:])
        blocks = {ip.rsplit(".", 1)[0] for ip in (first_ip, second_ip)}
        assert len(blocks) == 2, (first_ip, second_ip)  # different /24s, so never the same address
        assert json.loads(ready.read_text())["podAddresses"].startswith(second_ip.rsplit(".", 1)[0] + ".")
    finally:
        for name in names:
            core.delete_namespaced_pod(name, NAMESPACE, body=V1DeleteOptions(grace_period_seconds=0))
        wait(lambda: all(_phase(core, name) == "Gone" for name in names), 60, "both Pods to be gone")
        second.terminate()
        second.wait(30)
        core.delete_node("second-cpu")


def test_a_volume_over_the_checkout_does_not_hide_the_containers_program(core, cluster):
    """The repository and its venv stand for the image. An emptyDir mounted over a folder that holds them
    (the chart's emptyDir at /tmp, with the checkout under /tmp) must not hide the container's program."""
    repo = Path(__file__).resolve().parents[2]
    if repo.parent == Path("/"):
        pytest.skip("the checkout sits at the root: no folder above it to mount over")
    script = ("import pathlib, sys, kompressor; "
              f"pathlib.Path({str(repo.parent)!r}, 'scratch').write_text('x'); print('ran', kompressor.__name__)")
    core.create_namespaced_pod(NAMESPACE, _pod(
        "covered", script, container={"volumeMounts": [{"name": "scratch", "mountPath": str(repo.parent)}]},
        volumes=[{"name": "scratch", "emptyDir": {}}]))
    wait(lambda: _phase(core, "covered") in ("Succeeded", "Failed"), 60, "the covered Pod to finish",
         cluster.diagnostics)
    logs = cluster.pod_logs(NAMESPACE, "covered")
    assert _phase(core, "covered") == "Succeeded", logs
    assert "ran kompressor" in logs
    assert not (repo.parent / "scratch").exists(), "the write went to the volume, not to the host's folder"
