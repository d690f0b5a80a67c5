"""`kompressor operator`: Kopf underneath, in-process (``kopf.operator``)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys

from kompressor.k8s.config import OperatorConfig

# kubernetes 36 ships kubernetes_asyncio inside its own distribution, and Kopf imports it whenever it is
# there, only to recognise that client's model objects, which the operator never hands it: about 30 MB of
# the operator's memory for nothing (bench/operator_real.py). A None entry makes that import fail, as when
# the package is absent.
sys.modules.setdefault("kubernetes_asyncio", None)


async def run(config: OperatorConfig, stop_flag=None, ready_flag=None) -> None:
    import kopf

    from kompressor.k8s.handlers import build_registry
    from kompressor.k8s.storage import pod_store

    pod_store(config.artifact_store)  # a store the pods cannot mount is refused before starting
    await kopf.operator(
        registry=build_registry(), memo=kopf.Memo(config=config), clusterwide=config.clusterwide,
        namespaces=() if config.clusterwide else config.namespaces, standalone=config.standalone,
        peering_name=None if config.standalone else config.peering, liveness_endpoint=config.liveness, stop_flag=stop_flag,
        ready_flag=ready_flag,
    )


def main(args: argparse.Namespace) -> int:
    import kopf

    from kompressor.console import json_logs

    config = OperatorConfig.from_args(args)
    kopf.configure(log_format=kopf.LogFormat.JSON if json_logs() else kopf.LogFormat.PLAIN,
                   verbose=bool(os.environ.get("KOMPRESSOR_VERBOSE")))
    if not os.environ.get("KOMPRESSOR_VERBOSE"):
        # Kopf logs every handled event at INFO; per-object noise at 1000s of resources.
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    if config.metrics_port:
        from prometheus_client import start_http_server

        start_http_server(config.metrics_port)
    asyncio.run(run(config))
    return 0
