"""Embedded mode: CompressedModels on one machine, no Kubernetes.

`kompressor run` (main.py, runner.py) drives the operator's own reconcile core with local
stand-ins for the cluster: jobs.py (Jobs as subprocesses), serving.py (the serving and
drift-watcher Deployments), layout.py (the workdir's files: status.json and friends).
`kompressor demo` (demo.py) runs it on the bundled demo.yaml with traffic and an injected
drift; report.py turns any workdir into a self-contained HTML report.
"""
