"""`kompressor run FILE.yaml --workdir DIR [--port PORT]`: CompressedModels without Kubernetes.

Same reconcile core as the operator, same job command lines (kompressor.commands), run as
local subprocesses. Runs until SIGINT/SIGTERM, then stops every child it started.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import socket
from pathlib import Path

from kompressor.api.manifest import CompressedModel, load_manifests
from kompressor.console import log
from kompressor.embedded.runner import Runner, check_unique
from kompressor.embedded.serving import HOST
from kompressor.errors import UserError


def validate_manifest(path: Path) -> list[CompressedModel]:
    """Refuse a bad manifest before anything starts (SpecError -> exit 2 with one line per problem)."""
    if not path.is_file():
        raise UserError(f"{path}: no such manifest file")
    models = load_manifests(path)
    check_unique(models, path)
    return models


def check_ports_free(first_port: int, models: list[CompressedModel]) -> None:
    """Each model serves on its own port (first_port, first_port + 1, ...): refuse busy ones up front."""
    for offset, cm in enumerate(models):
        port = first_port + offset
        with socket.socket() as sock:
            # Like the server: SO_REUSEADDR, so a port whose last connections are in TIME_WAIT counts as free.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((HOST, port))
            except OSError as err:
                raise UserError(f"port {port} on {HOST} (for {cm.key}) is not free ({err.strerror}); "
                                f"choose another first port with --port") from None


async def run_until_signalled(runner: Runner, stop: asyncio.Event | None = None) -> None:
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await runner.run(stop)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def main(args: argparse.Namespace) -> int:
    manifest = Path(args.file).resolve()
    check_ports_free(args.port, validate_manifest(manifest))
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    log("kompressor run", manifest=str(manifest), workdir=str(workdir), first_port=args.port)
    asyncio.run(run_until_signalled(Runner(manifest, workdir, args.port)))
    return 0
