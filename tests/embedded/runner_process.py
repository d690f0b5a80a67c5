"""`kompressor run` as a subprocess, seen from the outside: its files, its processes, its ports."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import yaml

from support.polling import wait

DIGITS = {
    "apiVersion": "kompressor.io/v1alpha1",
    "kind": "CompressedModel",
    "metadata": {"name": "digits", "namespace": "default"},
    "spec": {
        "model": {"uri": "builtin://digits-mlp"},
        "data": {"train": "builtin://digits?split=train", "eval": "builtin://digits?split=eval"},
        "compression": {"pruning": {"sparsity": 0.5, "fineTuneEpochs": 0}},
        "gates": {"maxAccuracyDrop": 0.05},
        "jobs": {"backoffLimit": 0},
        "drift": {"windowSize": 50, "checkIntervalSeconds": 1, "consecutiveWindows": 2,
                  "action": "rollback", "rollbackTo": "baseline", "cooldownSeconds": 0},
    },
}


def write_manifest(path: Path, *docs: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump_all(list(docs), sort_keys=False))
    os.replace(tmp, path)


def wait_for(what: str, check: Callable[[], Any], deadline: float, interval: float = 0.2) -> Any:
    return wait(check, deadline, what, interval=interval)


def children_of(pid: int) -> dict[int, str]:
    """Every live descendant of ``pid``: {pid: command line}."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        parents.setdefault(ppid, []).append(int(entry.name))
    out, todo = {}, list(parents.get(pid, []))
    while todo:
        child = todo.pop()
        out[child] = cmdline(child)
        todo.extend(parents.get(child, []))
    return out


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return ""


def alive(pid: int, command: str) -> bool:
    """The process still exists (and is the same program, not a reused pid) and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z" and cmdline(pid) == command


class RunnerProcess:
    def __init__(self, manifest: Path, workdir: Path, port: int, env: dict[str, str]):
        self.manifest, self.workdir, self.port = manifest, workdir, port
        self.log = workdir.parent / f"{workdir.name}-runner.log"
        self._log_fh = open(self.log, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kompressor.cli", "--json-logs", "run", str(manifest), "--workdir", str(workdir),
             "--port", str(port)],
            stdout=self._log_fh, stderr=subprocess.STDOUT, env=env,
        )

    def model_dir(self, name: str = "digits", namespace: str = "default") -> Path:
        return self.workdir / namespace / name

    def status(self, name: str = "digits") -> dict:
        try:
            return json.loads((self.model_dir(name) / "status.json").read_text())
        except FileNotFoundError:
            return {}

    def wait_status(self, what: str, check: Callable[[dict], Any], deadline: float, name: str = "digits") -> dict:
        def probe():
            if self.proc.poll() is not None:
                raise AssertionError(f"the runner exited ({self.proc.returncode}) while waiting for {what}:\n"
                                     + self.log_text()[-3000:])
            status = self.status(name)
            return status if check(status) else None

        try:
            return wait_for(what, probe, deadline)
        except AssertionError as err:
            raise AssertionError(f"{err}\nlast status: {json.dumps(self.status(name))[:2000]}\n"
                                 f"runner log tail:\n{self.log_text()[-3000:]}") from None

    def log_text(self) -> str:
        if not self._log_fh.closed:
            self._log_fh.flush()
        return self.log.read_text()

    def terminate(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"the runner did not stop within {timeout} s of SIGTERM:\n"
                                 + self.log_text()[-4000:]) from None
        finally:
            self._log_fh.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._log_fh.close()
