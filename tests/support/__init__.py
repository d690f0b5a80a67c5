"""Test support shared by tests/operator and e2e/: a loopback Kubernetes API (kmock) and a
fixture that plays the cluster's controllers (Jobs, Deployments) with local subprocesses.

``tests/`` is on pytest's pythonpath (pyproject.toml), so import it as e.g.
``from support.cluster import Cluster, digits_model``:

- ``support.emulator``: ``Emulator`` (KubernetesEmulator + the kmock 0.8 workarounds), ``write_kubeconfig``.
- ``support.controllers``: ``ClusterControllers`` (runs Job/Deployment pods as local subprocesses).
- ``support.cluster``: ``Cluster`` (emulator + controllers + the real ``kompressor operator`` process).
"""
