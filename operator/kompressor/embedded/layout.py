"""Where the embedded runner keeps things under its --workdir, and how it writes them.

    DIR/store/                          the artifact store (file://DIR/store); baselines under store/baselines
    DIR/<namespace>/<name>/status.json  the status, exactly as the operator writes it (to_wire)
                          object.json   the generation and the spec it was assigned to (the API server's job)
                          jobs.json     finished jobs (so a restarted runner does not run them again)
                          events.jsonl  EmitEvent actions, one JSON object a line (the Events of a cluster)
                          drift.jsonl   every drift verdict the watcher wrote, in order
                          serving.jsonl every revision the local server started serving, with the time
                          online.jsonl  the online stage's evidence each time it changed (shadow, canary)
                          spec-g<N>.yaml  the manifest handed to the jobs of generation N
                          verdict.json  the drift watcher's latest verdict (copied into status.drift)
                          verdict.history.jsonl  every verdict the watcher wrote (one per window)
                          capture/      inputs captured by the server, read by the watcher
                          logs/         one log file per child process

Every file is replaced atomically (temp file + rename): readers never see half a file.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

STATUS_FILE = "status.json"
EVENTS_FILE = "events.jsonl"
DRIFT_HISTORY_FILE = "drift.jsonl"
VERDICT_FILE = "verdict.json"
VERDICT_HISTORY_FILE = "verdict.history.jsonl"  # every verdict the watcher wrote (drift.sinks.history_path)
SERVING_HISTORY_FILE = "serving.jsonl"
ONLINE_HISTORY_FILE = "online.jsonl"


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:12]}.tmp"  # open() honours the umask; mkstemp: 0600
    try:
        with open(tmp, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: Path, data: Any) -> None:
    write_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def read_json(path: Path, default: Any = None) -> Any:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return default


def append_jsonl(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fh.write(json.dumps(record, sort_keys=True, default=str) + "\n")


def read_jsonl(path: Path) -> list[dict]:
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return []
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except ValueError:  # a line being appended right now
            continue
    return out


@dataclass(frozen=True)
class ModelDir:
    """The files of one CompressedModel under the workdir."""

    root: Path

    @classmethod
    def of(cls, workdir: Path, namespace: str, name: str) -> "ModelDir":
        return cls(Path(workdir) / namespace / name)

    @property
    def status(self) -> Path:
        return self.root / STATUS_FILE

    @property
    def object(self) -> Path:
        return self.root / "object.json"

    @property
    def jobs(self) -> Path:
        return self.root / "jobs.json"

    @property
    def events(self) -> Path:
        return self.root / EVENTS_FILE

    @property
    def drift_history(self) -> Path:
        return self.root / DRIFT_HISTORY_FILE

    @property
    def serving_history(self) -> Path:
        return self.root / SERVING_HISTORY_FILE

    @property
    def online_history(self) -> Path:
        return self.root / ONLINE_HISTORY_FILE

    @property
    def verdict(self) -> Path:
        return self.root / VERDICT_FILE

    @property
    def verdict_history(self) -> Path:
        return self.root / VERDICT_HISTORY_FILE

    @property
    def capture(self) -> Path:
        return self.root / "capture"

    @property
    def drift_state(self) -> Path:
        return self.root / "drift-state"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    def spec_file(self, generation: int) -> Path:
        return self.root / f"spec-g{generation}.yaml"


def store_root(workdir: Path) -> Path:
    return Path(workdir) / "store"


def store_uri(workdir: Path) -> str:
    return store_root(workdir).resolve().as_uri()
