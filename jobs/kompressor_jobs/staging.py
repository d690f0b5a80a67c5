"""Writing an output folder all at once: nothing half-written is ever visible at its path."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def staged_folder(out: Path) -> Iterator[Path]:
    """Yield a private folder beside ``out`` to write into. On success it replaces ``out`` by renames
    (an older folder there is moved aside first, then removed); on any error it is deleted."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        yield staging
        staging.chmod(0o755)  # mkdtemp makes it private; servers and evaluators may run as other users
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.rename(out, old)
            os.rename(staging, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
