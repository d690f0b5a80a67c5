"""The objects the operator creates, built by the builders it calls (kompressor.k8s.children) for every
CompressedModel in examples/ (the GPU one included), checked offline by real tools: the Kubernetes 1.30
schemas (kubernetes-validate, strict), checkov (no failed check; each skip justified on the object
itself), and the Pod Security "restricted" profile of Kubernetes 1.30 (its rules are written out below:
no admission controller runs here). Also: the chart's PodMonitor finds the serving and watcher metrics
ports, and the Pods run as the jobs image's user."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from kompressor.api import defaults as d
from kompressor.api.manifest import parse_manifest
from kompressor.api.status import Artifact
from kompressor.core import names
from kompressor.core.actions import RunJob, Serve
from kompressor.errors import BAD_INPUT_EXIT_CODE
from kompressor.k8s import children
from kompressor.k8s.storage import pod_store

REPO = Path(__file__).resolve().parents[2]
K8S_VERSION = "1.30.0"
STORE = "pvc://kompressor-artifacts/artifacts"  # the chart's default artifact store
NAMESPACE = "models"  # for examples that name none (checkov flags the "default" namespace: the user's pick)


def _chartkit():
    """tests/packaging/chartkit.py (the chart rendered by Helm's engine, the checkov binary), loaded by path:
    a package named `packaging` would shadow the PyPI one."""
    spec = importlib.util.spec_from_file_location("chartkit", REPO / "tests" / "packaging" / "chartkit.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


chartkit = _chartkit()


def example_models():
    models = []
    for path in sorted((REPO / "examples").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") == d.KIND:
                doc["metadata"].setdefault("namespace", NAMESPACE)
                doc["metadata"].update(uid=f"uid-{doc['metadata']['name']}", generation=2)
                models.append(parse_manifest(doc))
    return models


def children_of(cm, store_uri: str = STORE) -> list[dict]:
    """Everything the controller creates for one model, as Controller.apply builds it."""
    store = pod_store(store_uri)
    revision, generation = 1, cm.generation
    candidate = names.candidate_key(cm.namespace, cm.name, revision)
    jobs = [children.job(cm, RunJob(kind, names.job_name(cm.name, kind, revision, generation), revision,
                                    generation, candidate, names.eval_key(cm.namespace, cm.name, revision)), store)
            for kind in ("prune", "evaluate")]
    serve = Serve(revision, Artifact(uri=f"{store_uri}/{candidate}", sha256="0" * 64),
                  drift_reference=cm.spec.data.reference or cm.spec.data.eval)
    return [children.spec_configmap(cm), *jobs, children.serving_deployment(cm, serve, store), children.service(cm),
            children.watcher_deployment(cm, serve, store), children.watcher_account(cm.namespace),
            children.watcher_binding(cm.namespace)]


MODELS = example_models()


@pytest.fixture(scope="module")
def objects() -> dict[str, list[dict]]:
    return {cm.name: children_of(cm) for cm in MODELS}


def pod_specs(objs: list[dict]) -> list[tuple[str, dict]]:
    return [(f"{o['kind']} {o['metadata']['name']}", o["spec"]["template"]["spec"])
            for o in objs if o["kind"] in ("Job", "Deployment")]


def container(objs: list[dict], component: str) -> dict:
    [obj] = [o for o in objs if o["kind"] == "Deployment"
             and o["metadata"]["labels"]["app.kubernetes.io/component"] == component]
    return obj["spec"]["template"]["spec"]["containers"][0]


# --- Pod Security Standards, "restricted" (Kubernetes 1.30: baseline + restricted rules) -----------------

RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                      "projected", "secret"}
SAFE_SYSCTLS = {"kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range", "net.ipv4.tcp_syncookies",
                "net.ipv4.ping_group_range", "net.ipv4.ip_unprivileged_port_start",
                "net.ipv4.ip_local_reserved_ports", "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout",
                "net.ipv4.tcp_keepalive_intvl", "net.ipv4.tcp_keepalive_probes"}


def restricted_violations(pod: dict) -> list[str]:
    """What the Pod Security admission controller ("restricted", v1.30) would reject in this pod spec."""
    out = []
    pod_sc = pod.get("securityContext") or {}
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(field):
            out.append(f"{field} is set")
    for volume in pod.get("volumes", []):
        kinds = set(volume) - {"name"}
        if not kinds <= RESTRICTED_VOLUMES:
            out.append(f"volume {volume['name']}: {sorted(kinds)} is not allowed")
    for sysctl in pod_sc.get("sysctls", []):
        if sysctl["name"] not in SAFE_SYSCTLS:
            out.append(f"sysctl {sysctl['name']}")
    containers = [*pod.get("initContainers", []), *pod.get("containers", []), *pod.get("ephemeralContainers", [])]
    if not containers:
        out.append("no containers")
    for c in containers:
        sc = c.get("securityContext") or {}
        where = f"container {c['name']}"

        def effective(key, sc=sc):
            return sc[key] if key in sc else pod_sc.get(key)

        if sc.get("privileged"):
            out.append(f"{where}: privileged")
        if sc.get("allowPrivilegeEscalation") is not False:
            out.append(f"{where}: allowPrivilegeEscalation must be false")
        if effective("runAsNonRoot") is not True:
            out.append(f"{where}: runAsNonRoot must be true")
        if effective("runAsUser") == 0:
            out.append(f"{where}: runAsUser 0")
        seccomp = (effective("seccompProfile") or {}).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            out.append(f"{where}: seccompProfile.type must be RuntimeDefault or Localhost, not {seccomp}")
        capabilities = sc.get("capabilities") or {}
        if "ALL" not in capabilities.get("drop", []):
            out.append(f"{where}: capabilities must drop ALL")
        if set(capabilities.get("add", [])) - {"NET_BIND_SERVICE"}:
            out.append(f"{where}: adds capabilities {capabilities['add']}")
        if sc.get("procMount", "Default") != "Default":
            out.append(f"{where}: procMount")
        if (sc.get("windowsOptions") or pod_sc.get("windowsOptions") or {}).get("hostProcess"):
            out.append(f"{where}: hostProcess")
        if any(p.get("hostPort") for p in c.get("ports", [])):
            out.append(f"{where}: hostPort")
    return out


def test_the_checker_finds_what_restricted_rejects():
    bad = {"hostNetwork": True, "volumes": [{"name": "h", "hostPath": {"path": "/"}}],
           "containers": [{"name": "c", "securityContext": {"privileged": True, "capabilities": {"add": ["SYS_ADMIN"]}},
                           "ports": [{"containerPort": 80, "hostPort": 80}]}]}
    found = " | ".join(restricted_violations(bad))
    for what in ("hostNetwork", "hostPath", "privileged", "allowPrivilegeEscalation", "runAsNonRoot",
                 "seccompProfile", "drop ALL", "SYS_ADMIN", "hostPort"):
        assert what in found, what


@pytest.mark.parametrize("cm", MODELS, ids=lambda cm: cm.name)
def test_every_pod_meets_pod_security_restricted(cm):
    pods = pod_specs(children_of(cm))
    assert len(pods) == 4  # prune, evaluate, serving, drift watcher
    for where, pod in pods:
        assert restricted_violations(pod) == [], where


def test_the_gpu_example_is_among_them():
    gpu = [cm for cm in MODELS if cm.spec.jobs.gpu > 0]
    assert gpu, "examples/ has a GPU CompressedModel"
    prune = next(o for o in children_of(gpu[0]) if o["kind"] == "Job" and o["metadata"]["name"].endswith("-prune"))
    pod = prune["spec"]["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == gpu[0].spec.jobs.gpu
    assert pod["tolerations"] and pod["nodeSelector"]


def test_a_file_store_is_restricted_but_for_its_host_path(tmp_path):
    """file:// (single-node development clusters) mounts a hostPath: Pod Security "baseline" and
    "restricted" refuse that volume, and nothing else."""
    for where, pod in pod_specs(children_of(MODELS[0], f"file://{tmp_path}")):
        assert restricted_violations(pod) == ["volume artifacts: ['hostPath'] is not allowed"], where


def test_pods_run_as_the_jobs_image_user_with_a_writable_tmp_and_claim(objects):
    """Read-only root filesystem: everything the jobs write goes to /tmp (HOME, temp files: an emptyDir)
    or the artifact claim (KOMPRESSOR_CACHE, artifacts), which fsGroup makes writable for that user."""
    dockerfile = (REPO / "jobs" / "Dockerfile").read_text()
    [user] = re.findall(r"^USER (\d+):(\d+)$", dockerfile, re.M)
    assert user == (str(children.JOBS_UID),) * 2
    home = re.search(r"\bHOME=(\S+)", dockerfile).group(1)
    for objs in objects.values():
        for where, pod in pod_specs(objs):
            sc = pod["securityContext"]
            assert (sc["runAsUser"], sc["runAsGroup"], sc["fsGroup"]) == (children.JOBS_UID,) * 3, where
            [c] = pod["containers"]
            assert c["securityContext"]["readOnlyRootFilesystem"] is True, where
            volumes = {v["name"]: v for v in pod["volumes"]}
            writable = [m["mountPath"] for m in c["volumeMounts"]
                        if not m.get("readOnly") and set(volumes[m["name"]]) & {"emptyDir", "persistentVolumeClaim"}]
            assert children.TMP_MOUNT in writable, where
            env = {e["name"]: e["value"] for e in c["env"]}
            for path in (home, "/tmp", env["KOMPRESSOR_CACHE"]):
                assert any(path == m or path.startswith(m.rstrip("/") + "/") for m in writable), (where, path)
            # only the drift watcher talks to the API server
            assert pod["automountServiceAccountToken"] is (pod.get("serviceAccountName") == "kompressor-drift-watcher")


def test_resources_are_the_spec_s_or_the_defaults(objects):
    for cm in MODELS:
        objs = objects[cm.name]
        for o in objs:
            if o["kind"] != "Job":
                continue
            resources = o["spec"]["template"]["spec"]["containers"][0]["resources"]
            expected = json.loads(json.dumps(cm.spec.jobs.resources or d.JOB_RESOURCES))
            if o["metadata"]["labels"]["app.kubernetes.io/component"] == "prune" and cm.spec.jobs.gpu:
                expected.setdefault("limits", {})["nvidia.com/gpu"] = cm.spec.jobs.gpu
            assert resources == expected
        assert container(objs, "serving")["resources"] == (cm.spec.serving.resources or d.SERVING_RESOURCES)
        assert container(objs, "drift-watcher")["resources"] == d.DRIFT_WATCHER_RESOURCES


def jobs_of(objs: list[dict]) -> list[dict]:
    return [o for o in objs if o["kind"] == "Job"]


def test_bad_input_fails_a_job_at_once_and_disruptions_are_not_counted(objects):
    """Exit 2 (kompressor.errors.UserError) is FailJob: no second Pod waits for a GPU node to fail the same
    way. A preempted or evicted Pod (DisruptionTarget) is retried without counting against backoffLimit."""
    seen = 0
    for objs in objects.values():
        for job in jobs_of(objs):
            pod = job["spec"]["template"]["spec"]
            assert pod["restartPolicy"] == "Never"  # the API server refuses a podFailurePolicy otherwise
            [c] = pod["containers"]
            rules = job["spec"]["podFailurePolicy"]["rules"]
            fail_job = [r for r in rules if r["action"] == "FailJob"]
            assert [r["onExitCodes"] for r in fail_job] == [
                {"containerName": c["name"], "operator": "In", "values": [BAD_INPUT_EXIT_CODE]}]
            ignore = [r for r in rules if r["action"] == "Ignore"]
            assert [r["onPodConditions"] for r in ignore] == [[{"type": "DisruptionTarget", "status": "True"}]]
            assert len(rules) == 2
            seen += 1
    assert seen == 2 * len(MODELS)


def test_a_job_says_why_it_failed_in_its_termination_message(objects):
    """The job writes its error line where the kubelet reads the termination message (the CLI is told the
    path by env); a crash that writes nothing leaves the tail of its log there instead."""
    from kompressor.errors import TERMINATION_LOG_ENV

    seen = 0
    for objs in objects.values():
        for job in jobs_of(objs):
            [c] = job["spec"]["template"]["spec"]["containers"]
            assert c["terminationMessagePath"] == children.TERMINATION_LOG == "/dev/termination-log"
            assert c["terminationMessagePolicy"] == "FallbackToLogsOnError"
            assert {"name": TERMINATION_LOG_ENV, "value": c["terminationMessagePath"]} in c["env"]
            seen += 1
    assert seen == 2 * len(MODELS)


def test_the_schema_check_sees_the_pod_failure_policy(objects):
    """The 1.30 schema validates podFailurePolicy: a misspelt rule is refused (so the test above it is not
    checking a field the schema ignores)."""
    job = copy.deepcopy(jobs_of(next(iter(objects.values())))[0])
    kubernetes_validate.validate(job, K8S_VERSION, strict=True)
    job["spec"]["podFailurePolicy"]["rules"][0]["onExitCode"] = job["spec"]["podFailurePolicy"]["rules"][0].pop(
        "onExitCodes")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(job, K8S_VERSION, strict=True)


# --- real tools ---------------------------------------------------------------------------------------

def test_every_object_is_valid_for_kubernetes_1_30(objects):
    kinds = set()
    for model, objs in objects.items():
        for obj in objs:
            try:
                kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
            except kubernetes_validate.ValidationError as err:
                pytest.fail(f"{model}: {obj['kind']} {obj['metadata']['name']}: {err}")
            kinds.add(obj["kind"])
    assert kinds == {"ConfigMap", "Job", "Deployment", "Service", "ServiceAccount", "RoleBinding"}


@pytest.fixture(scope="module")
def checkov_report(objects, tmp_path_factory) -> dict:
    binary = chartkit.require_tool("checkov", chartkit.checkov_binary(), "set KOMPRESSOR_CHECKOV; .ci/run installs it")
    root = tmp_path_factory.mktemp("checkov-children")
    for model, objs in objects.items():
        (root / f"{model}.yaml").write_text("---\n".join(yaml.safe_dump(o) for o in objs))
    proc = subprocess.run([binary, "--directory", str(root), "--framework", "kubernetes", "--output", "json",
                           "--skip-download", "--compact"],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "BC_SKIP_MAPPING": "TRUE"})
    try:
        report = json.loads(proc.stdout)
    except json.JSONDecodeError:
        pytest.fail(f"checkov gave no JSON (exit {proc.returncode}): {proc.stderr[-2000:]}")
    assert isinstance(report, dict) and report["check_type"] == "kubernetes", report
    return report


@pytest.mark.slow
def test_checkov_fails_nothing_on_any_object(checkov_report, objects):
    failed = [f"{c['check_id']} {c['check_name']}: {c['resource']} ({c['file_path']})"
              for c in checkov_report["results"]["failed_checks"]]
    assert failed == []
    assert checkov_report["summary"]["parsing_errors"] == 0
    checked = {c["resource"] for c in checkov_report["results"]["passed_checks"]}
    for objs in objects.values():
        for o in objs:
            if o["kind"] in ("Job", "Deployment"):
                assert f"{o['kind']}.{o['metadata']['namespace']}.{o['metadata']['name']}" in checked


@pytest.mark.slow
def test_every_checkov_skip_is_justified_on_the_object(checkov_report, objects):
    justified = {}
    for objs in objects.values():
        for o in objs:
            for key, value in (o["metadata"].get("annotations") or {}).items():
                if key.startswith("checkov.io/skip"):
                    check, _, reason = value.partition("=")
                    assert re.fullmatch(r"CKV2?_K8S_\d+", check), value
                    assert len(reason.split()) >= 5, f"{value}: say why the check does not apply"
                    justified[check] = reason
    skipped = {c["check_id"] for c in checkov_report["results"]["skipped_checks"]}
    assert skipped <= set(justified), f"skipped without a reason: {skipped - set(justified)}"
    # The security checks are met, not skipped.
    for check in ("CKV_K8S_20", "CKV_K8S_22", "CKV_K8S_23", "CKV_K8S_28", "CKV_K8S_31", "CKV_K8S_37",
                  "CKV_K8S_40"):
        assert check not in skipped, check


# --- metrics: what the chart's PodMonitor scrapes -----------------------------------------------------

def _selects(selector: dict, labels: dict) -> bool:
    for expr in selector.get("matchExpressions", []):
        if expr["operator"] != "In" or labels.get(expr["key"]) not in expr["values"]:
            return False
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def test_the_drift_watcher_serves_metrics_on_its_named_port(objects):
    for objs in objects.values():
        watcher = container(objs, "drift-watcher")
        [port] = watcher["ports"]
        assert port == {"name": "metrics", "containerPort": d.DRIFT_METRICS_PORT}
        argv = watcher["command"]
        assert argv[argv.index("--metrics-port") + 1] == str(d.DRIFT_METRICS_PORT)
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert watcher[probe]["httpGet"] == {"path": "/metrics", "port": "metrics"}


def test_the_chart_podmonitor_scrapes_serving_and_watcher_pods(objects):
    values = {"metrics": {"podMonitor": {"enabled": True}}}
    [monitor] = chartkit.find(chartkit.render(values), "PodMonitor")
    endpoints = {e["port"]: e for e in monitor["spec"]["podMetricsEndpoints"]}
    assert monitor["spec"]["namespaceSelector"] == {"any": True}
    for objs in objects.values():
        for component in ("serving", "drift-watcher"):
            [deployment] = [o for o in objs if o["kind"] == "Deployment"
                            and o["metadata"]["labels"]["app.kubernetes.io/component"] == component]
            template = deployment["spec"]["template"]
            assert _selects(monitor["spec"]["selector"], template["metadata"]["labels"]), component
            ports = {p["name"] for c in template["spec"]["containers"] for p in c.get("ports", [])}
            scraped = ports & set(endpoints)
            assert len(scraped) == 1, (component, ports)
            assert endpoints[scraped.pop()]["path"] == "/metrics"
    # the operator's own Pods are not among them (its Service/ServiceMonitor covers it)
    operator_pod = chartkit.one(chartkit.render(values), "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert not _selects(monitor["spec"]["selector"], operator_pod)


def test_spec_serving_grpc_port_opens_the_grpc_port_on_the_pod_and_service():
    """spec.serving.grpcPort: `kompressor serve --grpc-port`, a "grpc" container port and Service port (HTTP/2
    without TLS), valid for Kubernetes 1.30; unset (the default): REST only, as before."""
    base = copy.deepcopy(next(iter(MODELS)))
    for grpc_port in (9000, None):
        cm = copy.deepcopy(base)
        cm.spec.serving.grpc_port = grpc_port
        objs = children_of(cm)
        serving = container(objs, "serving")
        [svc] = [o for o in objs if o["kind"] == "Service"]
        for obj in (svc, *[o for o in objs if o["kind"] == "Deployment"]):
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        argv = serving["command"]
        if grpc_port is None:
            assert "--grpc-port" not in argv
            assert [p["name"] for p in serving["ports"]] == ["http"]
            assert [p["name"] for p in svc["spec"]["ports"]] == ["http"]
            continue
        assert argv[argv.index("--grpc-port") + 1] == "9000"
        assert {"name": "grpc", "containerPort": 9000} in serving["ports"]
        assert {"name": "grpc", "port": 9000, "targetPort": "grpc", "appProtocol": "kubernetes.io/h2c"} in \
            svc["spec"]["ports"]


def test_spec_serving_workers_and_batching_reach_the_serve_command():
    """spec.serving.workers (unset: `--workers 0`, one per CPU of the container's limit) and spec.serving.batching
    (unset: no dynamic batching) become `kompressor serve` flags that the real command line accepts."""
    from kompressor.api.spec import BatchingSpec
    from kompressor.cli import build_parser

    base = copy.deepcopy(next(iter(MODELS)))
    for workers, batching in ((None, None), (3, BatchingSpec(max_batch_size=16, max_delay_ms=5))):
        cm = copy.deepcopy(base)
        cm.spec.serving.workers, cm.spec.serving.batching = workers, batching
        argv = container(children_of(cm), "serving")["command"]
        args = build_parser().parse_args(argv[1:])
        assert args.workers == (workers or 0)
        assert args.max_batch_size == (batching.max_batch_size if batching else 0)
        if batching:
            assert args.max_batch_delay_ms == 5
        else:
            assert "--max-batch-size" not in argv
