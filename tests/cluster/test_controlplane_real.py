"""Smoke test of the local control plane itself (e2e/cluster/bin/controlplane: etcd, kube-apiserver,
kube-controller-manager and kube-scheduler from the Kubernetes Go modules): it is a real Kubernetes
1.37 — version, namespaces, the authenticator and RBAC authorizer, PodSecurity admission, the Job,
Deployment/ReplicaSet and garbage-collector controllers, ServiceAccount tokens and the CRD."""

from __future__ import annotations

import base64
import json
import re
import uuid

import pytest

from support.polling import wait

NAMESPACE = "controlplane-smoke"

pytestmark = [pytest.mark.slow, pytest.mark.cluster]


@pytest.fixture(scope="module")
def core(cluster, api_client):
    from kubernetes import client

    core = client.CoreV1Api(api_client)
    cluster.kubectl("create", "namespace", NAMESPACE, check=False)
    wait(lambda: any(a.metadata.name == "default" for a in core.list_namespaced_service_account(NAMESPACE).items),
         60, "the default ServiceAccount of a new namespace (the serviceaccount controller)")
    yield core
    cluster.kubectl("delete", "namespace", NAMESPACE, "--wait=false", check=False)


def _gone(read) -> bool:
    from kubernetes.client.exceptions import ApiException

    try:
        read()
    except ApiException as err:
        if err.status == 404:
            return True
        raise
    return False


def test_it_is_kubernetes_1_37_with_the_system_namespaces(cluster, api_client, core):
    from kubernetes import client

    version = client.VersionApi(api_client).get_code()
    assert (version.major, version.minor) == ("1", "37") and version.git_version.startswith("v1.37."), version
    names = {ns.metadata.name for ns in core.list_namespace().items}
    assert {"default", "kube-system", "kube-public", "kube-node-lease", NAMESPACE} <= names
    # The root CA publisher (controller-manager) put the cluster CA into every namespace.
    ca = core.read_namespaced_config_map("kube-root-ca.crt", NAMESPACE).data["ca.crt"]
    assert ca.startswith("-----BEGIN CERTIFICATE-----")


def test_rbac_is_enforced_for_a_service_account_token(cluster, api_client, core):
    """A TokenRequest token authenticates as the ServiceAccount; RBAC refuses it (403) until a Role is
    bound, then allows exactly what the Role grants."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    core.create_namespaced_service_account(NAMESPACE, {"metadata": {"name": "nobody"}})
    token = core.create_namespaced_service_account_token(
        "nobody", NAMESPACE, {"spec": {"expirationSeconds": 600}}).status.token
    claims = json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "=="))
    assert claims["iss"] == "https://kubernetes.default.svc.cluster.local"
    assert claims["sub"] == f"system:serviceaccount:{NAMESPACE}:nobody"

    conf = client.Configuration()
    conf.host = api_client.configuration.host
    conf.ssl_ca_cert = api_client.configuration.ssl_ca_cert
    conf.api_key = {"BearerToken": f"Bearer {token}", "authorization": f"Bearer {token}"}  # 37 and 36
    as_nobody = client.ApiClient(conf)
    review = client.AuthenticationV1Api(as_nobody).create_self_subject_review({})
    assert review.status.user_info.username == f"system:serviceaccount:{NAMESPACE}:nobody"

    def list_pods(namespace: str) -> int:
        try:
            client.CoreV1Api(as_nobody).list_namespaced_pod(namespace)
        except ApiException as err:
            return err.status
        return 200

    assert list_pods(NAMESPACE) == 403
    assert list_pods("kube-system") == 403
    rbac = client.RbacAuthorizationV1Api(api_client)
    rbac.create_namespaced_role(NAMESPACE, {
        "metadata": {"name": "pod-reader"},
        "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]}]})
    rbac.create_namespaced_role_binding(NAMESPACE, {
        "metadata": {"name": "nobody-reads-pods"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "pod-reader"},
        "subjects": [{"kind": "ServiceAccount", "name": "nobody", "namespace": NAMESPACE}]})
    wait(lambda: list_pods(NAMESPACE) == 200, 30, "the RoleBinding to take effect")
    assert list_pods("kube-system") == 403  # a Role grants nothing outside its namespace
    with pytest.raises(ApiException) as err:
        client.CoreV1Api(as_nobody).create_namespaced_config_map(NAMESPACE, {"metadata": {"name": "x"}})
    assert err.value.status == 403


def test_pod_security_admission_enforces_a_namespace_level(cluster, core):
    from kubernetes.client.exceptions import ApiException

    ns = f"{NAMESPACE}-restricted"
    core.create_namespace({"metadata": {"name": ns, "labels": {"pod-security.kubernetes.io/enforce": "restricted"}}})
    try:
        pod = {"metadata": {"name": "privileged"}, "spec": {"containers": [
            {"name": "main", "image": "busybox", "command": ["true"], "securityContext": {"privileged": True}}]}}
        with pytest.raises(ApiException) as err:
            core.create_namespaced_pod(ns, pod)
        assert err.value.status == 403 and "violates PodSecurity" in err.value.body
    finally:
        core.delete_namespace(ns)


def test_a_job_gets_its_pods_from_the_real_job_controller(api_client, core):
    from kubernetes import client

    batch = client.BatchV1Api(api_client)
    job = batch.create_namespaced_job(NAMESPACE, {
        "metadata": {"name": "smoke"},
        "spec": {"backoffLimit": 0, "template": {"spec": {"restartPolicy": "Never", "containers": [
            {"name": "main", "image": "python:3.11-slim", "command": ["python", "-c", "print('ok')"]}]}}}})

    def pods():
        return core.list_namespaced_pod(NAMESPACE, label_selector="batch.kubernetes.io/job-name=smoke").items

    found = wait(pods, 60, "the Job controller to create a Pod")
    owner = found[0].metadata.owner_references[0]
    assert (owner.kind, owner.name, owner.uid, owner.controller) == ("Job", "smoke", job.metadata.uid, True)
    # The scheduler bound it to a Node (the process kubelet's) and the Job completes.
    wait(lambda: (core.read_namespaced_pod(found[0].metadata.name, NAMESPACE).spec.node_name
                  or _gone(lambda: core.read_namespaced_pod(found[0].metadata.name, NAMESPACE))), 60,
         "the scheduler to bind the Job's Pod")
    wait(lambda: batch.read_namespaced_job_status("smoke", NAMESPACE).status.succeeded == 1, 120,
         "the Job to succeed")


def test_a_deployment_gets_a_replicaset_and_the_garbage_collector_removes_it(api_client, core):
    from kubernetes import client

    apps = client.AppsV1Api(api_client)
    labels = {"app": "smoke-web"}
    dep = apps.create_namespaced_deployment(NAMESPACE, {
        "metadata": {"name": "smoke-web"},
        "spec": {"replicas": 1, "selector": {"matchLabels": labels}, "template": {
            "metadata": {"labels": labels},
            "spec": {"containers": [{"name": "main", "image": "python:3.11-slim",
                                     "command": ["python", "-c", "import time; time.sleep(3600)"]}]}}}})

    def replicasets():
        return [rs for rs in apps.list_namespaced_replica_set(NAMESPACE, label_selector="app=smoke-web").items
                if any(o.uid == dep.metadata.uid and o.controller for o in rs.metadata.owner_references or [])]

    rs = wait(replicasets, 60, "the Deployment controller to create a ReplicaSet")[0]
    wait(lambda: core.list_namespaced_pod(NAMESPACE, label_selector="app=smoke-web").items, 60,
         "the ReplicaSet controller to create a Pod")
    apps.delete_namespaced_deployment("smoke-web", NAMESPACE, propagation_policy="Background")
    wait(lambda: _gone(lambda: apps.read_namespaced_replica_set(rs.metadata.name, NAMESPACE)), 60,
         "the garbage collector to delete the orphaned ReplicaSet")


def test_the_garbage_collector_deletes_dependents_of_a_deleted_owner(core):
    owner = core.create_namespaced_config_map(NAMESPACE, {"metadata": {"name": "owner"}})
    child = {"metadata": {"name": "child", "ownerReferences": [
        {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner.metadata.uid}]}}
    core.create_namespaced_config_map(NAMESPACE, child)
    stray = {"metadata": {"name": "stray", "ownerReferences": [
        {"apiVersion": "v1", "kind": "ConfigMap", "name": "ghost", "uid": str(uuid.uuid4())}]}}
    core.create_namespaced_config_map(NAMESPACE, stray)  # its owner never existed
    core.delete_namespaced_config_map("owner", NAMESPACE)
    wait(lambda: _gone(lambda: core.read_namespaced_config_map("child", NAMESPACE)), 60,
         "the garbage collector to delete the owned ConfigMap")
    wait(lambda: _gone(lambda: core.read_namespaced_config_map("stray", NAMESPACE)), 60,
         "the garbage collector to delete a ConfigMap whose owner does not exist")


def test_the_crd_is_accepted_and_explained(cluster, crd):
    """(tests/cluster/test_api_server_real.py checks the CRD in depth: columns, corpus, CEL.)"""
    out = cluster.kubectl("explain", "compressedmodel.spec").stdout
    for field in ("model", "data", "compression", "gates"):
        assert re.search(rf"^\s+{field}\s", out, re.MULTILINE), f"{field} missing from kubectl explain:\n{out}"
    assert cluster.kubectl("get", "cmodel", "-A").returncode == 0  # the short name, through real discovery
