"""A benchmark's own part of a docs page, between its two markers, rewritten in place; the rest is kept."""

from __future__ import annotations

from pathlib import Path


def write_section(doc: Path, begin: str, end: str, section: str, title: str = "# Benchmarks") -> None:
    text = doc.read_text() if doc.exists() else f"{title}\n"
    if begin not in text or end not in text:
        text = text.rstrip() + f"\n\n{begin}\n{end}\n"
    head, rest = text.split(begin, 1)
    doc.write_text(f"{head}{begin}\n{section.strip()}\n{end}{rest.split(end, 1)[1]}")
