"""How every command talks to a person or a log collector.

On a terminal: Rich text and progress bars. Otherwise (in a Pod, under CI, with
--json-logs): one JSON object per line, so log pipelines can parse progress too.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from typing import Any, Iterator

_json_mode: bool | None = None


def use_json_logs(enabled: bool) -> None:
    global _json_mode
    _json_mode = enabled


def json_logs() -> bool:
    if _json_mode is not None:
        return _json_mode
    if os.environ.get("KOMPRESSOR_JSON_LOGS"):
        return os.environ["KOMPRESSOR_JSON_LOGS"] not in ("0", "false", "")
    return not sys.stderr.isatty()


def log(event: str, level: str = "info", **fields: Any) -> None:
    """One event. ``event`` is a short human sentence; ``fields`` are its facts."""
    if json_logs():
        record = {"ts": round(time.time(), 3), "level": level, "event": event, **fields}
        print(json.dumps(record, default=str), file=sys.stderr, flush=True)
        return
    from rich.console import Console
    from rich.markup import escape

    style = {"error": "bold red", "warning": "yellow"}.get(level, "")
    text = escape(event)  # event text is data, never markup: "[r1]" must print as is
    facts = " ".join(f"[dim]{k}=[/dim]{escape(str(v))}" for k, v in fields.items())
    Console(stderr=True).print(f"[{style}]{text}[/{style}] {facts}" if style else f"{text} {facts}")


class Progress:
    """A progress handle: ``advance()`` after each step of ``total``."""

    def __init__(self, update):
        self._update = update

    def advance(self, steps: int = 1, **fields: Any) -> None:
        self._update(steps, fields)


@contextlib.contextmanager
def progress(description: str, total: int) -> Iterator[Progress]:
    if json_logs():
        done = 0

        def update(steps: int, fields: dict) -> None:
            nonlocal done
            done += steps
            log(description, step=done, total=total, **fields)

        yield Progress(update)
        return
    from rich.progress import Progress as RichProgress

    with RichProgress(transient=False) as bar:
        task = bar.add_task(description, total=total)
        yield Progress(lambda steps, fields: bar.update(task, advance=steps))
