"""Child processes of the embedded runner: started in their own process group, logged to a file,
stopped with SIGTERM then SIGKILL, and never left behind.

Each child gets ``PR_SET_PDEATHSIG`` (Linux): if the runner itself is killed with SIGKILL, the
kernel still sends the children SIGTERM, so even an abrupt end leaves no orphans. It is set by a
tiny launcher that then execs the real command, not by a ``preexec_fn``: Python code between
fork and exec can deadlock in a process with threads (asyncio's child watchers are threads), and
a child stuck there would block the runner's event loop in ``Popen``.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path
from typing import Callable

from kompressor.console import log

STOP_GRACE_SECONDS = 10.0

# argv: [runner pid, command...]. Exits 1 without running anything if the runner is already gone.
_LAUNCHER = (
    "import ctypes, os, signal, sys\n"
    "try:\n"
    "    ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG\n"
    "except (OSError, AttributeError):\n"
    "    pass\n"
    "if os.getppid() != int(sys.argv[1]):\n"
    "    sys.exit(1)\n"
    "os.execvp(sys.argv[2], sys.argv[2:])\n"
)


def _executable(argv: list[str]) -> list[str]:
    """``kompressor ...`` runs with this interpreter, so a runner in a venv runs the venv's jobs."""
    if argv and argv[0] == "kompressor":
        argv = [sys.executable, "-m", "kompressor.cli", *argv[1:]]
    if sys.platform.startswith("linux"):
        return [sys.executable, "-I", "-S", "-c", _LAUNCHER, str(os.getpid()), *argv]
    return argv


class Child:
    """One running child process whose output goes to ``log_path``.

    ``on_line`` sees every output line (the jobs log JSON lines; the runner forwards progress).
    """

    def __init__(self, argv: list[str], log_path: Path, env: dict[str, str] | None = None,
                 on_line: Callable[[dict], None] | None = None):
        self.argv = argv
        self.log_path = log_path
        self.env = env
        self.on_line = on_line
        self.proc: asyncio.subprocess.Process | None = None
        self._pump: asyncio.Task | None = None
        self.tail: list[str] = []

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **(self.env or {})}
        creating = asyncio.ensure_future(asyncio.create_subprocess_exec(
            *_executable(self.argv), stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT, env=env, start_new_session=True,
        ))
        try:
            self.proc = await asyncio.shield(creating)
        except asyncio.CancelledError:  # stopped while starting: the process may exist; never leave it
            proc = await creating
            _signal_group(proc.pid, signal.SIGKILL)
            await proc.wait()
            raise
        self._pump = asyncio.create_task(self._copy_output())

    async def _copy_output(self) -> None:
        assert self.proc and self.proc.stdout
        with open(self.log_path, "ab") as fh:
            while line := await self.proc.stdout.readline():
                fh.write(line)
                fh.flush()
                text = line.decode(errors="replace").rstrip()
                self.tail = (self.tail + [text])[-20:]
                if self.on_line and text.startswith("{"):
                    try:
                        record = json.loads(text)
                    except ValueError:
                        continue
                    if isinstance(record, dict):
                        self.on_line(record)

    async def wait(self) -> int:
        assert self.proc
        code = await self.proc.wait()
        if self._pump:
            await self._pump
        return code

    def failure_message(self) -> str:
        """The child's last error line, for status messages."""
        for text in reversed(self.tail):
            try:
                record = json.loads(text)
            except ValueError:
                record = None
            if isinstance(record, dict) and record.get("level") == "error":
                return str(record.get("event"))
            if text.startswith("error:"):
                return text[len("error:"):].strip()
        return self.tail[-1] if self.tail else ""

    async def stop(self, grace: float = STOP_GRACE_SECONDS) -> None:
        """SIGTERM to the child's process group, SIGKILL after ``grace`` seconds."""
        if not self.proc:
            return
        if self.proc.returncode is None:
            _signal_group(self.proc.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), grace)
            except asyncio.TimeoutError:
                log("child did not stop in time; killing it", level="warning", pid=self.proc.pid)
                _signal_group(self.proc.pid, signal.SIGKILL)
                await self.proc.wait()
        # Whatever the child started in its group goes too (it may have exited before them).
        _signal_group(self.proc.pid, signal.SIGKILL)
        if self._pump:
            try:
                await asyncio.wait_for(self._pump, 5)
            except asyncio.TimeoutError:
                self._pump.cancel()


    def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            _signal_group(self.proc.pid, signal.SIGKILL)


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass
