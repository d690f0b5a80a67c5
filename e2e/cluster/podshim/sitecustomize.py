"""Loaded (as `sitecustomize`) by every Python process the process kubelet (e2e/cluster/kubelet.py)
starts for a container: the kubelet puts this folder first on the Pod's PYTHONPATH. It gives the
process the two things a container has and a bare process lacks, and does nothing else:

1. Its own network address. A container that binds the wildcard address (0.0.0.0) listens on its Pod's
   IP only; here all Pods share the host's loopback, so a wildcard IPv4 bind is turned into a bind on
   the Pod's own 127.0.0.N ($PROCESS_KUBELET_POD_IP). Two Pods can then both listen on :8080.
2. The standard ServiceAccount path. The kubernetes client's in-cluster loader reads
   /var/run/secrets/kubernetes.io/serviceaccount/{token,ca.crt}; the kubelet mounts that folder under
   the Pod's root folder ($PROCESS_KUBELET_POD_ROOT), where the loader is pointed when it is imported.
   (KUBERNETES_SERVICE_HOST/PORT are set by the kubelet as a real one does.)

Nothing here runs outside the process kubelet's Pods: without those variables it is a no-op.
"""

import os

_POD_IP = os.environ.get("PROCESS_KUBELET_POD_IP")
_POD_ROOT = os.environ.get("PROCESS_KUBELET_POD_ROOT")

if _POD_IP:
    import socket

    _bind = socket.socket.bind

    def _pod_bind(self, address, _bind=_bind, _ip=_POD_IP):
        if self.family == socket.AF_INET and isinstance(address, tuple) and address[0] in ("", "0.0.0.0"):
            address = (_ip, *address[1:])
        return _bind(self, address)

    socket.socket.bind = _pod_bind

if _POD_ROOT:
    import importlib.abc
    import importlib.machinery
    import sys

    _MODULE = "kubernetes.config.incluster_config"

    class _InClusterPaths(importlib.abc.MetaPathFinder):
        """Points the kubernetes client's in-cluster loader at the Pod's ServiceAccount folder."""

        def find_spec(self, name, path, target=None):
            if name != _MODULE:
                return None
            spec = importlib.machinery.PathFinder.find_spec(name, path)
            if spec is None or spec.loader is None:
                return spec
            exec_module = spec.loader.exec_module

            def exec_and_point(module, exec_module=exec_module):
                exec_module(module)
                for attr in ("SERVICE_TOKEN_FILENAME", "SERVICE_CERT_FILENAME"):
                    value = getattr(module, attr, None)
                    if isinstance(value, str) and value.startswith("/"):
                        setattr(module, attr, _POD_ROOT + value)

            spec.loader.exec_module = exec_and_point
            return spec

    sys.meta_path.insert(0, _InClusterPaths())
