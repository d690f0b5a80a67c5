"""The objects a CompressedModel owns, built as plain dicts. Pure: no API access here."""

from __future__ import annotations

import copy
import hashlib
import json

from kompressor import commands
from kompressor.api import defaults as d
from kompressor.api.manifest import CompressedModel
from kompressor.core import names
from kompressor.core.actions import RunJob, Serve
from kompressor.errors import BAD_INPUT_EXIT_CODE, TERMINATION_LOG_ENV
from kompressor.k8s import resources as r
from kompressor.k8s import scaling
from kompressor.k8s.storage import PodStore, pod_path_of

SPEC_FILE = "compressedmodel.yaml"
SPEC_MOUNT = "/etc/kompressor"
SPEC_VOLUME = "spec"
CAPTURE_KEY = "{namespace}/{name}/capture"
DRIFT_STATE_KEY = "{namespace}/{name}/drift-state"
CACHE_KEY = "_cache"
TMP_VOLUME = "tmp"
TMP_MOUNT = "/tmp"  # HOME and temp files of the jobs image; the root filesystem is read-only
# A Job's container writes why it failed here (kompressor.errors.write_termination_message); the kubelet
# reports it in the Pod's status, the operator copies it into the CompressedModel's. A crash that writes
# nothing (a traceback, a signal) leaves the tail of its log there instead.
TERMINATION_LOG = "/dev/termination-log"
METRICS_PORT_NAME = "metrics"  # the chart's PodMonitor scrapes this port on watcher Pods ("http" on serving)

# The non-root user of the jobs image (jobs/Dockerfile: USER 10001:10001). Set explicitly, so that a custom
# spec.jobs.image runs as non-root too, and as the group that owns what the Pods write on the artifact claim.
JOBS_UID = 10001

# Every Pod the operator creates meets the Pod Security "restricted" profile.
POD_SECURITY_CONTEXT = {
    "runAsNonRoot": True, "runAsUser": JOBS_UID, "runAsGroup": JOBS_UID,
    "fsGroup": JOBS_UID, "fsGroupChangePolicy": "OnRootMismatch",  # chown a large claim only once
    "seccompProfile": {"type": "RuntimeDefault"},
}
CONTAINER_SECURITY_CONTEXT = {
    "allowPrivilegeEscalation": False, "privileged": False, "readOnlyRootFilesystem": True,
    "runAsNonRoot": True, "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"},
}

# checkov policies that do not fit these Pods, skipped by annotation with the reason (as the chart does).
_SKIP_DIGEST = ("CKV_K8S_43", "spec.jobs.image is pinned by a release tag; give it as image@sha256:... "
                "to pull by digest.")
_SKIP_PULL_POLICY = ("CKV_K8S_15", "IfNotPresent with pinned tags (or a digest) is deterministic and works "
                     "with preloaded images.")
_SKIP_CPU_LIMIT = ("CKV_K8S_11", "No CPU limit by default: it only throttles pruning, inference and drift "
                   "checks; set one in spec.jobs.resources or spec.serving.resources.")
_SKIP_TOKEN = ("CKV_K8S_38", "The drift watcher patches its CompressedModel's status, so it needs its "
               "ServiceAccount token.")
_SKIP_NETWORK_POLICY = ("CKV2_K8S_6", "Traffic of model Pods follows the namespace's own NetworkPolicies; "
                        "the operator creates none (docs/deploy.md shows one).")


def labels(cm: CompressedModel, component: str, revision: int | None = None) -> dict[str, str]:
    out = {
        r.LABEL_NAME: "kompressor", r.LABEL_INSTANCE: cm.name, r.LABEL_COMPONENT: component,
        r.LABEL_MANAGED_BY: r.MANAGED_BY,
    }
    if revision is not None:
        out[r.LABEL_REVISION] = str(revision)
    return out


def owner_reference(cm: CompressedModel) -> dict:
    return {"apiVersion": d.API_VERSION, "kind": d.KIND, "name": cm.name, "uid": cm.uid,
            "controller": True, "blockOwnerDeletion": True}


def _metadata(cm: CompressedModel, name: str, component: str, revision: int | None = None) -> dict:
    return {"name": name, "namespace": cm.namespace, "labels": labels(cm, component, revision),
            "ownerReferences": [owner_reference(cm)]}


def spec_configmap_name(cm: CompressedModel) -> str:
    return f"{cm.name}-spec-g{cm.generation}"


def spec_configmap(cm: CompressedModel) -> dict:
    """The resource as the user wrote it, for the jobs' --spec (one per generation: immutable)."""
    doc = {"apiVersion": d.API_VERSION, "kind": d.KIND,
           "metadata": {"name": cm.name, "namespace": cm.namespace, "generation": cm.generation},
           "spec": cm.raw_spec}
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _metadata(cm, spec_configmap_name(cm), "spec"),
            # JSON is YAML, and ~20x cheaper to write than PyYAML's emitter at thousands of resources.
            "data": {SPEC_FILE: json.dumps(doc, indent=2)}}


def _spec_volume(cm: CompressedModel) -> tuple[dict, dict]:
    volume = {"name": SPEC_VOLUME, "configMap": {"name": spec_configmap_name(cm)}}
    mount = {"name": SPEC_VOLUME, "mountPath": SPEC_MOUNT, "readOnly": True}
    return volume, mount


def _pod_spec(container: dict, volumes: list[dict], token: bool = False) -> dict:
    """A restricted Pod: non-root, no privilege, read-only root with an emptyDir at /tmp."""
    container = {**container, "securityContext": copy.deepcopy(CONTAINER_SECURITY_CONTEXT),
                 "volumeMounts": [*container.get("volumeMounts", []), {"name": TMP_VOLUME, "mountPath": TMP_MOUNT}]}
    return {"securityContext": copy.deepcopy(POD_SECURITY_CONTEXT), "automountServiceAccountToken": token,
            "containers": [container], "volumes": [*volumes, {"name": TMP_VOLUME, "emptyDir": {}}]}


def _resources(given: dict | None, default: dict) -> dict:
    """The spec's resources as given; the defaults only when it sets none (never mixed: requests > limits)."""
    return copy.deepcopy(given or default)


def _checkov_skips(meta: dict, container: dict, *extra: tuple[str, str]) -> None:
    skips = [_SKIP_PULL_POLICY, _SKIP_NETWORK_POLICY, *extra]
    if "@sha256:" not in container["image"]:
        skips.append(_SKIP_DIGEST)
    if "cpu" not in (container.get("resources") or {}).get("limits", {}):
        skips.append(_SKIP_CPU_LIMIT)
    annotations = meta.setdefault("annotations", {})
    for i, (check, reason) in enumerate(sorted(skips), start=1):
        annotations[f"checkov.io/skip{i}"] = f"{check}={reason}"


def _env(store: PodStore) -> list[dict]:
    return [*store.env, {"name": "KOMPRESSOR_CACHE", "value": store.path(CACHE_KEY)},
            {"name": "KOMPRESSOR_JSON_LOGS", "value": "1"}]


def pod_failure_policy(container: str) -> dict:
    """Bad input (exit 2) fails the Job at once: a retry would fail the same way, after waiting for a node
    (a GPU one, perhaps) and pulling the image again. A Pod preempted, evicted or drained (the
    DisruptionTarget condition) is retried without counting against backoffLimit. Needs restartPolicy Never."""
    return {"rules": [
        {"action": "FailJob",
         "onExitCodes": {"containerName": container, "operator": "In", "values": [BAD_INPUT_EXIT_CODE]}},
        {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
    ]}


def job(cm: CompressedModel, action: RunJob, store: PodStore) -> dict:
    jobs = cm.spec.jobs
    spec_path = f"{SPEC_MOUNT}/{SPEC_FILE}"
    if action.kind == "prune":
        argv = commands.prune_argv(spec_path, store.path(action.candidate_key), action.revision,
                                   store.path(f"{CACHE_KEY}/baselines"), retrain=action.retrain)
    else:
        argv = commands.evaluate_argv(spec_path, store.path(action.candidate_key), store.path(action.eval_key))
    resources = _resources(jobs.resources, d.JOB_RESOURCES)
    if action.kind == "prune" and jobs.gpu > 0:
        resources.setdefault("limits", {})["nvidia.com/gpu"] = jobs.gpu
    spec_volume, spec_mount = _spec_volume(cm)
    meta = _metadata(cm, action.name, action.kind, action.revision)
    meta["labels"][r.LABEL_GENERATION] = str(action.generation)
    container = {"name": action.kind, "image": jobs.image, "command": argv,
                 "env": [*_env(store), {"name": TERMINATION_LOG_ENV, "value": TERMINATION_LOG}],
                 "resources": resources, "volumeMounts": [spec_mount, store.mount],
                 "terminationMessagePath": TERMINATION_LOG, "terminationMessagePolicy": "FallbackToLogsOnError"}
    _checkov_skips(meta, container)
    pod_spec = {"restartPolicy": "Never", **_pod_spec(container, [spec_volume, store.volume])}
    if jobs.node_selector:
        pod_spec["nodeSelector"] = dict(jobs.node_selector)
    if jobs.tolerations:
        pod_spec["tolerations"] = copy.deepcopy(jobs.tolerations)
    return {
        "apiVersion": "batch/v1", "kind": "Job", "metadata": meta,
        "spec": {"backoffLimit": jobs.backoff_limit, "activeDeadlineSeconds": jobs.active_deadline_seconds,
                 "podFailurePolicy": pod_failure_policy(container["name"]),
                 "template": {"metadata": {"labels": dict(meta["labels"])}, "spec": pod_spec}},
    }


FEEDBACK_TOKEN_MOUNT = "/var/run/kompressor/feedback-token"  # spec.serving.feedback.tokenSecretRef, read-only


def serving_deployment(cm: CompressedModel, action: Serve, store: PodStore) -> dict:
    serving = cm.spec.serving
    capture = store.path(CAPTURE_KEY.format(namespace=cm.namespace, name=cm.name))
    performance = cm.spec.drift.performance if cm.spec.drift.enabled else None
    candidate = action.candidate
    online = commands.OnlineServing.of(cm.spec, None if candidate is None else (
        pod_path_of(candidate.artifact.uri), candidate.artifact.sha256, candidate.mode, candidate.weight))
    labels_taken = performance is not None or (online is not None and online.labels)
    token = serving.feedback.token_secret_ref if serving.feedback is not None and labels_taken else None
    argv = commands.serve_argv(pod_path_of(action.artifact.uri), cm.name, serving.port, capture,
                               grpc_port=serving.grpc_port, workers=serving.workers, batching=serving.batching,
                               performance=performance,
                               feedback_token_file=f"{FEEDBACK_TOKEN_MOUNT}/{token.key}" if token else None,
                               online=online)
    meta = _metadata(cm, names.serving_name(cm.name), "serving", action.revision)
    probe = {"httpGet": {"path": "/v2/health/ready", "port": "http"}, "periodSeconds": 5}
    container = {
        "name": "serve", "image": cm.spec.jobs.image, "command": argv, "env": _env(store),
        "ports": [{"name": "http", "containerPort": serving.port}, *_grpc_port(serving, "containerPort")],
        "readinessProbe": probe,
        "livenessProbe": {"httpGet": {"path": "/v2/health/live", "port": "http"}, "periodSeconds": 10},
        "resources": _resources(serving.resources, d.SERVING_RESOURCES), "volumeMounts": [store.mount],
    }
    _checkov_skips(meta, container)
    volumes = [store.volume]
    if token is not None:  # spec.serving.feedback.tokenSecretRef: the one key, read-only
        volumes.append({"name": "feedback-token", "secret": {"secretName": token.name, "defaultMode": 0o400,
                                                              "items": [{"key": token.key, "path": token.key}]}})
        container["volumeMounts"].append({"name": "feedback-token", "mountPath": FEEDBACK_TOKEN_MOUNT,
                                          "readOnly": True})
    body = _deployment(meta, serving.replicas, "serving", container, volumes, sha256=action.artifact.sha256)
    return scaling.shape_deployment(cm, body)  # replicas or an HPA, spreading, a CPU request for a CPU target


def watcher_deployment(cm: CompressedModel, action: Serve, store: PodStore) -> dict:
    key = {"namespace": cm.namespace, "name": cm.name}
    argv = commands.watcher_argv(
        f"{SPEC_MOUNT}/{SPEC_FILE}", store.path(CAPTURE_KEY.format(**key)), f"k8s://{cm.namespace}/{cm.name}",
        action.revision, reference=action.drift_reference, state=store.path(DRIFT_STATE_KEY.format(**key)),
        metrics_port=d.DRIFT_METRICS_PORT, artifact=pod_path_of(action.artifact.uri),
        serving_metrics_url=(f"http://{names.serving_name(cm.name)}.{cm.namespace}.svc:{cm.spec.serving.port}/metrics"
                             if cm.spec.drift.performance is not None else None))
    spec_volume, spec_mount = _spec_volume(cm)
    meta = _metadata(cm, names.watcher_name(cm.name), "drift-watcher", action.revision)
    # The metrics server starts once the detector is built (importing Alibi Detect and loading the
    # reference take a while): the startup probe allows for that, the others then watch the process.
    metrics = {"httpGet": {"path": "/metrics", "port": METRICS_PORT_NAME}}
    container = {"name": "watch-drift", "image": cm.spec.jobs.image, "command": argv, "env": _env(store),
                 "ports": [{"name": METRICS_PORT_NAME, "containerPort": d.DRIFT_METRICS_PORT}],
                 "startupProbe": {**metrics, "periodSeconds": 5, "failureThreshold": 60},
                 "readinessProbe": {**metrics, "periodSeconds": 10},
                 "livenessProbe": {**metrics, "periodSeconds": 30, "timeoutSeconds": 5},
                 "resources": copy.deepcopy(d.DRIFT_WATCHER_RESOURCES), "volumeMounts": [spec_mount, store.mount]}
    _checkov_skips(meta, container, _SKIP_TOKEN)
    body = _deployment(meta, 1, "drift-watcher", container, [spec_volume, store.volume], token=True)
    body["spec"]["strategy"] = {"type": "Recreate"}  # never two watchers patching one status
    body["spec"]["template"]["spec"]["serviceAccountName"] = r.WATCHER_ACCOUNT
    return with_hash(body)


def _deployment(meta: dict, replicas: int, component: str, container: dict, volumes: list[dict],
                sha256: str | None = None, token: bool = False) -> dict:
    selector = {r.LABEL_INSTANCE: meta["labels"][r.LABEL_INSTANCE], r.LABEL_COMPONENT: component}
    template_meta = {"labels": dict(meta["labels"])}
    if sha256:
        template_meta["annotations"] = {f"{d.GROUP}/sha256": sha256}
    body = {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta,
        "spec": {"replicas": replicas, "selector": {"matchLabels": selector},
                 "template": {"metadata": template_meta, "spec": _pod_spec(container, volumes, token)}},
    }
    return with_hash(body)


def _grpc_port(serving, key: str) -> list[dict]:
    """The gRPC port entry of the serving container ("containerPort") or Service ("port"), when spec.serving.grpcPort
    is set. Named "grpc" (what service meshes read as the protocol), HTTP/2 without TLS."""
    if serving.grpc_port is None:
        return []
    entry = {"name": "grpc", key: serving.grpc_port}
    if key == "port":
        entry.update(targetPort="grpc", appProtocol="kubernetes.io/h2c")
    return [entry]


def service(cm: CompressedModel) -> dict:
    port = cm.spec.serving.port
    return with_hash({
        "apiVersion": "v1", "kind": "Service", "metadata": _metadata(cm, names.serving_name(cm.name), "serving"),
        "spec": {"selector": {r.LABEL_INSTANCE: cm.name, r.LABEL_COMPONENT: "serving"},
                 "ports": [{"name": "http", "port": port, "targetPort": "http"}, *_grpc_port(cm.spec.serving, "port")]},
    })


def watcher_account(namespace: str) -> dict:
    return {"apiVersion": "v1", "kind": "ServiceAccount",
            "metadata": {"name": r.WATCHER_ACCOUNT, "namespace": namespace,
                         "labels": {r.LABEL_NAME: "kompressor", r.LABEL_COMPONENT: "drift-watcher",
                                    r.LABEL_MANAGED_BY: r.MANAGED_BY}}}


def watcher_binding(namespace: str) -> dict:
    """Binds the chart's ClusterRole (get compressedmodels, patch their status) in one namespace."""
    account = watcher_account(namespace)
    return {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": account["metadata"],
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                        "name": r.WATCHER_CLUSTER_ROLE},
            "subjects": [{"kind": "ServiceAccount", "name": r.WATCHER_ACCOUNT, "namespace": namespace}]}


def with_hash(body: dict) -> dict:
    """Stamp the desired state's digest, so an unchanged object is never patched."""
    digest = hashlib.sha256(json.dumps([body["metadata"].get("labels"), body["spec"]], sort_keys=True,
                                       default=str).encode()).hexdigest()[:16]
    body["metadata"].setdefault("annotations", {})[r.ANNOTATION_APPLIED_HASH] = digest
    return body


def applied_hash(obj: dict | None) -> str | None:
    return ((obj or {}).get("metadata") or {}).get("annotations", {}).get(r.ANNOTATION_APPLIED_HASH)
