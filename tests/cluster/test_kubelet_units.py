"""The process kubelet's pure parts (e2e/cluster/kubelet.py) and its in-Pod shim, without a cluster:
how a container's command, paths and environment become a local process's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "e2e" / "cluster"))

import kubelet  # noqa: E402  (e2e/cluster/kubelet.py)


def test_images_map_to_their_dockerfile_entrypoints():
    operator = {"image": "ghcr.io/kompressor/kompressor-operator:0.3.0", "args": ["--all-namespaces"]}
    assert kubelet.container_argv(operator) == ["kompressor", "operator", "--all-namespaces"]
    jobs = {"image": "registry.example/x/kompressor-jobs@sha256:abc"}
    assert kubelet.container_argv(jobs) == ["kompressor", "--help"]
    # A command replaces the entrypoint, args then follow it.
    assert kubelet.container_argv({"image": "busybox", "command": ["sleep"], "args": ["5"]}) == ["sleep", "5"]
    assert kubelet.image_repository("localhost:5000/a/b/kompressor-jobs:1.2@sha256:ff") == "kompressor-jobs"


def test_variable_expansion_is_kubernetes_style():
    env = {"A": "1", "B": "two"}
    assert kubelet.expand("$(A)-$(B)", env) == "1-two"
    assert kubelet.expand("$(MISSING) $$(A)", env) == "$(MISSING) $(A)"


def test_pod_root_rewrites_paths_under_and_above_mounts(tmp_path):
    claim, tmp_volume = tmp_path / "claim", tmp_path / "tmpvol"
    claim.mkdir()
    tmp_volume.mkdir()
    root = kubelet.PodRoot(tmp_path / "root", {"/var/lib/kompressor/pvc/artifacts": claim, "/tmp": tmp_volume})
    mapped = root.map_value("/var/lib/kompressor/pvc/artifacts/store/r1")
    assert mapped == f"{tmp_path}/root/var/lib/kompressor/pvc/artifacts/store/r1"
    # A parent of a mount (KOMPRESSOR_PVC_ROOT) lands in the root too, where the claim is a link.
    parent = Path(root.map_value("/var/lib/kompressor/pvc"))
    (claim / "f").write_text("x")
    assert (parent / "artifacts" / "f").read_text() == "x"
    assert root.map_value("--spec=/tmp/a.yaml") == f"--spec={tmp_path}/root/tmp/a.yaml"
    # Paths outside every mount, relative values and "/" stay as they are.
    for value in ("/usr/bin/python", "/tmpfoo", "builtin://digits", "/", "pvc://artifacts/x", "--port=8080"):
        assert root.map_value(value) == value


def _run_in_pod(code: str, env: dict[str, str]) -> str:
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True,
                         env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(kubelet.SHIM_DIR), **env}, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip()


def test_shim_binds_wildcard_addresses_to_the_pod_ip():
    code = ("import socket; s = socket.socket(); s.bind(('0.0.0.0', 0)); "
            "t = socket.socket(); t.bind(('127.0.0.1', 0)); print(s.getsockname()[0], t.getsockname()[0])")
    assert _run_in_pod(code, {"PROCESS_KUBELET_POD_IP": "127.0.0.7"}).split() == ["127.0.0.7", "127.0.0.1"]
    assert _run_in_pod(code, {}).split() == ["0.0.0.0", "127.0.0.1"]  # outside a Pod: untouched


def test_shim_points_the_in_cluster_loader_at_the_pod_service_account(tmp_path):
    folder = tmp_path / kubelet.SA_DIR.lstrip("/")
    folder.mkdir(parents=True)
    (folder / "token").write_text("the-token")
    (folder / "ca.crt").write_text("-----BEGIN CERTIFICATE-----\n")
    code = ("import json; from kubernetes import client, config; c = client.Configuration(); "
            "config.load_incluster_config(client_configuration=c); "
            "print(json.dumps([c.host, c.get_api_key_with_prefix('BearerToken') "
                "or c.get_api_key_with_prefix('authorization')]))")  # kubernetes 37 / 36 and older
    host, auth = json.loads(_run_in_pod(code, {
        "PROCESS_KUBELET_POD_ROOT": str(tmp_path), "KUBERNETES_SERVICE_HOST": "127.0.0.1",
        "KUBERNETES_SERVICE_PORT": "6443"}))
    assert (host, auth.strip()) == ("https://127.0.0.1:6443", "bearer the-token")


@pytest.mark.parametrize("port,expected", [(8080, 8080), ("9090", 9090), ("http", 8080)])
def test_probe_ports_resolve_by_name(port, expected):
    assert kubelet._port(port, {"ports": [{"name": "http", "containerPort": 8080}]}) == expected


def test_exit_codes_of_signalled_processes_are_128_plus_the_signal():
    assert kubelet._exit_code(-15) == 143 and kubelet._exit_code(-9) == 137 and kubelet._exit_code(2) == 2


@pytest.mark.parametrize("text,value", [("250m", 0.25), ("2Gi", 2 * 2**30), ("1", 1), (3, 3), ("1e3", 1000), ("5M", 5e6)])
def test_quantities_parse_like_kubernetes(text, value):
    assert kubelet.parse_quantity(text) == pytest.approx(value)


def test_each_kubelet_takes_its_own_block_of_pod_addresses(tmp_path):
    """Two kubelets on one machine (two processes here: a test session's and up.sh's) never share a
    Pod address: each holds the lock of its own /24, and the kernel frees it when the holder dies."""
    shim = REPO / "e2e" / "cluster"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time, kubelet; a = kubelet.PodAddresses('10.244', sys.argv[1]); "
         "print(a.cidr, a.allocate('u1'), flush=True); time.sleep(600)", str(tmp_path)],
        stdout=subprocess.PIPE, text=True, env={"PYTHONPATH": str(shim)})
    try:
        other_cidr, other_ip = holder.stdout.readline().split()
        mine = kubelet.PodAddresses("10.244", tmp_path)
        assert mine.cidr != other_cidr
        ips = [mine.allocate(f"pod-{i}") for i in range(253)]  # .2 to .254 of its block
        assert len(set(ips)) == 253 and other_ip not in ips
        with pytest.raises(RuntimeError, match="no Pod address left"):
            mine.allocate("one-too-many")
        mine.release("pod-7")
        assert mine.allocate("next") == ips[7]
    finally:
        holder.kill()
        holder.wait()
    again = kubelet.PodAddresses("10.244", tmp_path)  # the killed kubelet's block is free again
    assert again.cidr == other_cidr
    mine.close()
    again.close()


def _shim():
    """podshim/sitecustomize.py as a plain module (without the kubelet's variables it patches nothing)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("podshim_sitecustomize", kubelet.SHIM_DIR / "sitecustomize.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("host,key", [
    ("web.ns1.svc.cluster.local", "web.ns1.svc"), ("web.ns1.svc.cluster.local.", "web.ns1.svc"),
    ("web.ns1.svc", "web.ns1.svc"), ("web.ns1", "web.ns1.svc"), ("web", "web.mine.svc"), ("WEB", "web.mine.svc"),
    ("10.244.0.5", None), ("::1", None), ("a.b.c.d", None), ("web.ns1.cluster.local", None), ("", None),
])
def test_service_names_map_to_their_dns_keys_as_the_search_list_would(host, key):
    assert _shim().service_key(host, "mine") == key


def test_the_kubelet_keeps_each_services_ready_endpoint_addresses():
    def slice_(service, ns, *endpoints, kind="IPv4"):
        return {"metadata": {"namespace": ns, "labels": {"kubernetes.io/service-name": service}}, "addressType": kind,
                "endpoints": [{"addresses": [ip], "conditions": {} if ready is None else {"ready": ready}}
                              for ip, ready in endpoints]}

    slices = [slice_("web", "a", ("10.244.0.9", True), ("10.244.0.3", None), ("10.244.0.4", False)),
              slice_("web", "a", ("10.244.0.2", True)), slice_("idle", "a"), slice_("web", "b", ("10.244.0.7", False)),
              slice_("v6", "a", ("fd00::1", True), kind="IPv6"), {"metadata": {"namespace": "a"}, "endpoints": []}]
    assert kubelet.service_addresses(slices) == {
        "idle.a.svc": [], "web.a.svc": ["10.244.0.2", "10.244.0.3", "10.244.0.9"], "web.b.svc": []}


def test_shim_resolves_service_names_from_the_kubelets_file(tmp_path):
    dns = tmp_path / "services.json"
    dns.write_text(json.dumps({"web.ns1.svc": ["10.244.9.3", "10.244.9.2"], "idle.ns1.svc": []}))
    code = r"""
import json, socket
out = {}
for host in ("web", "web.ns1", "web.ns1.svc", "web.ns1.svc.cluster.local", "idle", "localhost"):
    try:
        out[host] = sorted({(i[0] == socket.AF_INET, i[1] == socket.SOCK_STREAM, i[4][:2])
                            for i in socket.getaddrinfo(host, 8080, type=socket.SOCK_STREAM)})
    except socket.gaierror as err:
        out[host] = err.errno == socket.EAI_NONAME
print(json.dumps(out))
"""
    out = json.loads(_run_in_pod(code, {"PROCESS_KUBELET_DNS_FILE": str(dns), "PROCESS_KUBELET_POD_NAMESPACE": "ns1"}))
    web = [[True, True, ["10.244.9.3", 8080]], [True, True, ["10.244.9.2", 8080]]]
    for host in ("web", "web.ns1", "web.ns1.svc", "web.ns1.svc.cluster.local"):
        assert sorted(out[host]) == sorted(web), host
    assert out["idle"] is True  # a Service without ready endpoints: EAI_NONAME
    assert out["localhost"] and out["localhost"] is not True  # not a Service: the real resolver's answer
