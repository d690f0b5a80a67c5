"""Loaded (as `sitecustomize`) by every Python process the process kubelet (e2e/cluster/kubelet.py)
starts for a container: the kubelet puts this folder first on the Pod's PYTHONPATH. It gives the
process three things a container has and a bare process lacks, and does nothing else:

1. Its own network address. A container that binds the wildcard address (0.0.0.0) listens on its Pod's
   IP only; here all Pods share the host's loopback, so a wildcard IPv4 bind is turned into a bind on
   the Pod's own address ($PROCESS_KUBELET_POD_IP). Two Pods can then both listen on :8080.
2. The standard ServiceAccount path. The kubernetes client's in-cluster loader reads
   /var/run/secrets/kubernetes.io/serviceaccount/{token,ca.crt}; the kubelet mounts that folder under
   the Pod's root folder ($PROCESS_KUBELET_POD_ROOT), where the loader is pointed when it is imported.
   (KUBERNETES_SERVICE_HOST/PORT are set by the kubelet as a real one does.)
3. Service names (there is no cluster DNS). socket.getaddrinfo answers ``svc.ns.svc.cluster.local``,
   ``svc.ns.svc``, ``svc.ns`` and ``svc`` (searched in the Pod's namespace, $PROCESS_KUBELET_POD_NAMESPACE,
   as resolv.conf's ``search ns.svc.cluster.local svc.cluster.local cluster.local`` would) from the file
   the kubelet keeps ($PROCESS_KUBELET_DNS_FILE: ``{"svc.ns.svc": [ready endpoint addresses]}``), read
   on every lookup. As for a headless Service: the name gives the Pods' addresses, not a ClusterIP (there
   is no kube-proxy), so a port is not remapped and a client reaches the Service where its ``port`` is
   its ``targetPort``. A known Service without ready endpoints does not resolve (EAI_NONAME); any other
   name goes to the real resolver.

Nothing here runs outside the process kubelet's Pods: without those variables it is a no-op.
"""

import os

_POD_IP = os.environ.get("PROCESS_KUBELET_POD_IP")
_POD_ROOT = os.environ.get("PROCESS_KUBELET_POD_ROOT")
_DNS_FILE = os.environ.get("PROCESS_KUBELET_DNS_FILE")


def service_key(host, namespace):
    """The key ("svc.ns.svc") a host name would resolve to in cluster DNS, or None for a name that is
    no Service's: ``svc.ns.svc.cluster.local``, ``svc.ns.svc``, ``svc.ns``, or ``svc`` in ``namespace``."""
    name = host.rstrip(".").lower()
    if name.endswith(".svc.cluster.local"):
        name = name[:-len(".cluster.local")]
    parts = name.split(".")
    if ":" in name or not all(parts) or all(p.isdigit() for p in parts):  # an IP literal, empty labels
        return None
    if len(parts) == 3 and parts[2] == "svc":
        return name
    if len(parts) == 2:
        return name + ".svc"
    if len(parts) == 1 and namespace:
        return f"{name}.{namespace}.svc"
    return None


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


if _DNS_FILE:
    import json
    import socket

    _getaddrinfo = socket.getaddrinfo

    def _service_getaddrinfo(host, port, family=0, type=0, proto=0, flags=0, _getaddrinfo=_getaddrinfo,
                             _file=_DNS_FILE, _namespace=os.environ.get("PROCESS_KUBELET_POD_NAMESPACE", "")):
        name = host.decode("ascii", "replace") if isinstance(host, bytes) else host
        key = service_key(name, _namespace) if isinstance(name, str) and not flags & socket.AI_NUMERICHOST else None
        if key is not None:
            try:
                with open(_file, encoding="utf-8") as fh:
                    addresses = json.load(fh).get(key)
            except (OSError, ValueError):
                addresses = None
            if addresses is not None:
                if not addresses:
                    raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
                # The real getaddrinfo on each IP literal: family, type, proto, port and flags as it treats them.
                return [info for ip in addresses for info in _getaddrinfo(ip, port, family, type, proto, flags)]
        return _getaddrinfo(host, port, family, type, proto, flags)

    socket.getaddrinfo = _service_getaddrinfo
