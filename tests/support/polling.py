"""Waiting for a condition in a test: poll it until it holds, or fail saying what never happened."""

from __future__ import annotations

import time
from typing import Any, Callable


def wait(predicate: Callable[[], Any], timeout: float, what: str, diagnostics: Callable[[], str] = lambda: "",
         interval: float = 0.2) -> Any:
    """The first truthy value of ``predicate()`` within ``timeout`` seconds; AssertionError naming ``what`` (and
    whatever ``diagnostics()`` adds) otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}\n{diagnostics()}".rstrip())
        time.sleep(interval)
