"""Request capture: the inference server's inputs, kept on disk for the drift watcher.

Layout of a capture folder: rolling segment files ``seg-<seq>-r<revision>.npyseq``, each a
sequence of ``.npy`` records appended one after another (one record = the rows of one or more requests,
float32 ``[rows, features]``, every input flattened and concatenated; the writer gathers the requests of
up to 50 ms into one record). A segment holds the
traffic of one serving revision; the writer starts a new one when the revision changes or
the segment is full, and deletes the oldest segments when the folder passes its size cap.

The writer never blocks the request path: ``CaptureWriter.submit`` puts rows on a bounded
queue and returns; a background thread writes. Rows that cannot be kept (queue full, or
deleted by the size cap) are counted in ``kompressor_capture_dropped_rows_total``.

Readers (the drift watcher) tolerate a half-written last record: each record is written with
one ``write`` call, and a record that does not parse yet is simply not read yet.
"""

from __future__ import annotations

import io
import queue
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SEGMENT_SUFFIX = ".npyseq"
_SEGMENT = re.compile(r"^seg-(\d{12})-r(-?\d+)\.npyseq$")
MIN_SEGMENT_BYTES = 4096
SEGMENTS_PER_CAP = 8  # the cap is enforced in steps of cap/8
QUEUE_ROWS = 4096  # requests queued for the writer before new ones are dropped
BATCH_SECONDS = 0.05  # the writer gathers requests this long and writes them as one record
_END_OF_PASS = object()


@dataclass(frozen=True)
class Segment:
    path: Path
    seq: int
    revision: int


def list_segments(folder: str | Path) -> list[Segment]:
    """Segments oldest first."""
    out = []
    try:
        names = [p for p in Path(folder).iterdir()]
    except FileNotFoundError:
        return []
    for p in names:
        m = _SEGMENT.match(p.name)
        if m:
            out.append(Segment(p, int(m.group(1)), int(m.group(2))))
    return sorted(out, key=lambda s: s.seq)


def read_segment(path: Path) -> list[np.ndarray]:
    """Every complete record of one segment (a missing file reads as empty)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    records = []
    buf = io.BytesIO(data)
    while buf.tell() < len(data):
        try:
            records.append(np.load(buf, allow_pickle=False))
        except (ValueError, EOFError, OSError):  # a record still being written
            break
    return records


def read_newest(folder: str | Path, rows: int, revision: int | None = None) -> np.ndarray | None:
    """The newest ``rows`` captured rows (fewer if fewer exist), oldest first, optionally only
    those served by ``revision``. None when nothing matching was captured."""
    picked: list[np.ndarray] = []
    have = 0
    for seg in reversed(list_segments(folder)):
        if revision is not None and seg.revision != revision:
            continue
        for record in reversed(read_segment(seg.path)):
            picked.append(record)
            have += len(record)
            if have >= rows:
                break
        if have >= rows:
            break
    if not picked:
        return None
    out = np.concatenate(picked[::-1], axis=0)
    return out[-rows:]


@dataclass
class Position:
    """Where a reader stopped: segment ``seq`` and records read from it."""

    seq: int = -1
    records: int = 0


def read_since(folder: str | Path, position: Position, revision: int | None = None
               ) -> tuple[np.ndarray | None, Position]:
    """Rows captured after ``position`` (oldest first) and the new position. Segments deleted by
    the size cap in the meantime are skipped: reading resumes at the oldest one left."""
    chunks: list[np.ndarray] = []
    pos = Position(position.seq, position.records)
    for seg in list_segments(folder):
        if seg.seq < pos.seq:
            continue
        start = pos.records if seg.seq == pos.seq else 0
        records = read_segment(seg.path)
        if revision is None or seg.revision == revision:
            chunks.extend(records[start:])
        pos = Position(seg.seq, max(len(records), start))
    rows = np.concatenate(chunks, axis=0) if chunks else None
    return rows, pos


def _encode(rows: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, rows, allow_pickle=False)
    return buf.getvalue()


class CaptureWriter:
    """Appends captured rows to rolling segments from a background thread.

    ``on_drop(rows, reason)`` is called for rows that are not kept (reason ``queue_full`` or
    ``size_cap``); ``on_write(rows)`` for rows written."""

    def __init__(self, folder: str | Path, max_bytes: int, on_drop=None, on_write=None,
                 queue_size: int = QUEUE_ROWS):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max(int(max_bytes), MIN_SEGMENT_BYTES)
        self.segment_bytes = max(self.max_bytes // SEGMENTS_PER_CAP, MIN_SEGMENT_BYTES)
        self._on_drop = on_drop or (lambda rows, reason: None)
        self._on_write = on_write or (lambda rows: None)
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        existing = list_segments(self.folder)
        self._next_seq = existing[-1].seq + 1 if existing else 0
        self._rows_in: dict[int, int] = {}  # rows per segment written by this process
        self._current: Segment | None = None
        self._current_size = 0
        self._fh = None
        self._total = sum(_size(seg.path) for seg in existing)
        self._thread = threading.Thread(target=self._run, name="capture-writer", daemon=True)
        self._thread.start()

    def submit(self, rows: np.ndarray | tuple[np.ndarray, ...], revision: int) -> bool:
        """Queue rows (or a tuple of arrays sharing the batch dimension, flattened and concatenated by
        the writer thread) for writing; never blocks. False (and counted) when the queue is full."""
        try:
            self._queue.put_nowait((rows, revision))
            return True
        except queue.Full:
            self._on_drop(len(rows[0] if isinstance(rows, tuple) else rows), "queue_full")
            return False

    def flush(self, timeout: float = 10.0) -> None:
        """Wait until everything queued so far is written (for tests and shutdown)."""
        done = threading.Event()
        self._queue.put((None, done), timeout=timeout)
        done.wait(timeout)

    def close(self) -> None:
        self.flush()
        self._queue.put((None, None))
        self._thread.join(timeout=10)
        if self._fh is not None:
            self._fh.close()

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first[0] is not None:
                time.sleep(BATCH_SECONDS)  # let more requests queue up, then write them as one record
            items = [first]
            while True:
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            pending: list[np.ndarray] = []
            pending_revision = None
            for rows, revision in items + [(None, _END_OF_PASS)]:
                if rows is not None and revision == pending_revision:
                    pending.append(_as_rows(rows))
                    continue
                if pending:
                    self._write_safely(np.concatenate(pending) if len(pending) > 1 else pending[0], pending_revision)
                    pending = []
                if rows is not None:
                    pending, pending_revision = [_as_rows(rows)], revision
                elif revision is None:
                    return
                elif revision is not _END_OF_PASS:
                    revision.set()  # a flush marker: everything queued before it is written

    def _write_safely(self, rows: np.ndarray, revision: int) -> None:
        # no record bigger than a segment, so that the size cap can always drop whole old segments
        per_record = max(1, self.segment_bytes // max(1, rows[:1].nbytes))
        try:
            for start in range(0, len(rows), per_record):
                self._write(rows[start:start + per_record], revision)
        except OSError as err:  # a full disk must not take the server down
            self._on_drop(len(rows), "write_error")
            from kompressor.console import log

            log("capture write failed", level="warning", error=str(err))

    def _write(self, rows: np.ndarray, revision: int) -> None:
        seg = self._current
        if seg is None or seg.revision != revision or self._current_size >= self.segment_bytes:
            seg = Segment(self.folder / f"seg-{self._next_seq:012d}-r{revision}{SEGMENT_SUFFIX}",
                          self._next_seq, revision)
            self._next_seq += 1
            self._current, self._current_size = seg, 0
            if self._fh is not None:
                self._fh.close()
            self._fh = open(seg.path, "ab")
        data = _encode(rows)
        self._fh.write(data)  # one write per record: readers never see half a header
        self._fh.flush()
        self._current_size += len(data)
        self._total += len(data)
        self._rows_in[seg.seq] = self._rows_in.get(seg.seq, 0) + len(rows)
        self._on_write(len(rows))
        if self._total > self.max_bytes:
            self._enforce_cap()

    def _enforce_cap(self) -> None:
        segments = list_segments(self.folder)
        sizes = {s.seq: _size(s.path) for s in segments}
        total = sum(sizes.values())
        for seg in segments:
            if total <= self.max_bytes or seg.seq == self._current.seq:
                break
            dropped = self._rows_in.pop(seg.seq, None)
            if dropped is None:  # written before a restart
                dropped = sum(len(r) for r in read_segment(seg.path))
            seg.path.unlink(missing_ok=True)
            total -= sizes[seg.seq]
            self._on_drop(dropped, "size_cap")
        self._total = total


def _as_rows(item) -> np.ndarray:
    """One row per sample, float32: a request's inputs flattened and concatenated in input order."""
    arrays = item if isinstance(item, tuple) else (item,)
    flat = [np.asarray(a).reshape(len(a), -1) for a in arrays]
    rows = flat[0] if len(flat) == 1 else np.concatenate(flat, axis=1)
    return np.ascontiguousarray(rows, dtype=np.float32)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0
