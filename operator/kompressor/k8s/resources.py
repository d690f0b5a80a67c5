"""The Kubernetes resources the operator reads or writes."""

from kompressor.api import defaults as d
from kompressor.k8s.access import Resource

COMPRESSEDMODELS = Resource(d.GROUP, d.VERSION, d.PLURAL)
JOBS = Resource("batch", "v1", "jobs")
DEPLOYMENTS = Resource("apps", "v1", "deployments")
SERVICES = Resource("", "v1", "services")
CONFIGMAPS = Resource("", "v1", "configmaps")
SERVICEACCOUNTS = Resource("", "v1", "serviceaccounts")
ROLEBINDINGS = Resource("rbac.authorization.k8s.io", "v1", "rolebindings")
EVENTS = Resource("", "v1", "events")
PODS = Resource("", "v1", "pods")
HORIZONTALPODAUTOSCALERS = Resource("autoscaling", "v2", "horizontalpodautoscalers")
PODDISRUPTIONBUDGETS = Resource("policy", "v1", "poddisruptionbudgets")

# Labels every child carries; the indexes select on MANAGED_BY.
LABEL_NAME = "app.kubernetes.io/name"
LABEL_INSTANCE = "app.kubernetes.io/instance"
LABEL_COMPONENT = d.LABEL_COMPONENT
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_REVISION = d.LABEL_REVISION
LABEL_GENERATION = f"{d.GROUP}/generation"
ANNOTATION_APPLIED_HASH = f"{d.GROUP}/applied-hash"
MANAGED_BY = "kompressor"

# The ClusterRole the chart installs for the drift watcher pods; the operator binds it per namespace.
WATCHER_ACCOUNT = "kompressor-drift-watcher"
WATCHER_CLUSTER_ROLE = "kompressor-drift-watcher"
