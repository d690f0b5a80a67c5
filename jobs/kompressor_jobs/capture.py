"""Request capture: the inference server's inputs, kept on disk for the drift watcher.

Layout of a capture folder: rolling segment files ``seg-<seq>-r<revision>-n<first row>[-s].npyseq``, each a
sequence of ``.npy`` records appended one after another (one record = the rows of one or more requests;
the writer gathers the requests of up to 50 ms into one record). A record is either float32
``[rows, features]`` (every input flattened and concatenated: what ``submit`` of plain arrays writes) or a
structured array, one element per row, with a field ``in:<name>`` per model input in its own dtype and
shape (int64 token ids stay int64) and a field ``out:<name>`` per model output, when the server gives
them (the drift watcher's ``signal: outputs | embeddings``). A segment holds the traffic of one serving
revision; the writer starts a new one when the revision changes or the segment is full, and deletes the
oldest segments when the folder passes its size cap.

Every captured row has a *capture sequence*: its number among all rows ever captured in the folder
(``n<first row>`` in the name is the sequence of the segment's first row). Readers keep their place by
it, and count the rows the size cap deleted before they were read.

A segment named with ``-s`` starts a *serving stint*: its revision (re)started serving there (a
promotion, a rollback, or a server started on another revision than the one serving before). The server
calls ``start_serving`` at its start and on every hot swap; the writer then creates an empty ``-s``
segment, in order with the rows queued around it, even before any traffic -- so a rollback to a
revision that served before is told apart from its old traffic: the drift watcher tests only rows from
the newest stint of its revision on. A server restarted on the revision already serving goes on with
the same stint.

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
_SEGMENT = re.compile(r"^seg-(\d{12})-r(-?\d+)(?:-n(\d+))?(-s)?\.npyseq$")
MIN_SEGMENT_BYTES = 4096
SEGMENTS_PER_CAP = 8  # the cap is enforced in steps of cap/8
QUEUE_ROWS = 4096  # requests queued for the writer before new ones are dropped
BATCH_SECONDS = 0.05  # the writer gathers requests this long and writes them as one record
_END_OF_PASS = object()
_START_SERVING = object()  # a queue item: (_START_SERVING, revision)
INPUT_FIELD = "in:"
OUTPUT_FIELD = "out:"


@dataclass(frozen=True)
class Segment:
    path: Path
    seq: int
    revision: int
    first_row: int | None = None  # capture sequence of its first row (None: a segment named before it existed)
    starts_serving: bool = False  # its revision (re)started serving with this segment


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
            out.append(Segment(p, int(m.group(1)), int(m.group(2)),
                               int(m.group(3)) if m.group(3) is not None else None, m.group(4) is not None))
    return sorted(out, key=lambda s: s.seq)


def input_rows(record: np.ndarray) -> np.ndarray:
    """A record's inputs as float32 ``[rows, features]`` (every input flattened and concatenated)."""
    if record.dtype.names is None:
        return record
    return _flat([record[f] for f in record.dtype.names if f.startswith(INPUT_FIELD)])


def output_rows(record: np.ndarray) -> np.ndarray | None:
    """A record's outputs as float32 ``[rows, values]`` (every output flattened and concatenated), or None
    when the record holds none (captured without outputs)."""
    names = [f for f in (record.dtype.names or ()) if f.startswith(OUTPUT_FIELD)]
    return _flat([record[f] for f in names]) if names else None


def _flat(arrays: list[np.ndarray]) -> np.ndarray:
    flat = [np.asarray(a).reshape(len(a), -1).astype(np.float32, copy=False) for a in arrays]
    return np.ascontiguousarray(flat[0] if len(flat) == 1 else np.concatenate(flat, axis=1))


def rows_in_segment(path: Path) -> int:
    return sum(len(r) for r in read_segment(path))


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
        for record in reversed([input_rows(r) for r in read_segment(seg.path)]):
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
            chunks.extend(input_rows(r) for r in records[start:])
        pos = Position(seg.seq, max(len(records), start))
    rows = np.concatenate(chunks, axis=0) if chunks else None
    return rows, pos


SIGNAL_INPUTS = "inputs"


@dataclass
class Rows:
    """Rows of one revision read from a capture sequence on: their values (the signal: inputs or outputs,
    float32 ``[n, features]``), the capture sequence of each, the rows the size cap deleted before they
    could be read, and ``end``: the sequence after the newest row seen (of any revision)."""

    values: np.ndarray | None
    sequences: np.ndarray
    dropped: int
    end: int

    def __len__(self) -> int:
        return len(self.sequences)


def serving_start(folder: str | Path, revision: int | None) -> int:
    """Capture sequence where the newest serving stint of ``revision`` starts: its rows before it were served
    before a promotion or rollback to another revision. 0 when no stint is marked (everything counts)."""
    start = 0
    for seg, first in numbered_segments(list_segments(folder)):
        if seg.starts_serving and (revision is None or seg.revision == revision):
            start = first
    return start


def read_rows(folder: str | Path, revision: int | None, start: int, signal: str = SIGNAL_INPUTS) -> Rows:
    """The rows of ``revision`` (any when None) with capture sequence >= ``start``, oldest first. ``signal``
    ``inputs`` reads the request inputs; anything else the model outputs (rows captured without outputs
    are left out)."""
    segments = numbered_segments(list_segments(folder))
    values: list[np.ndarray] = []
    sequences: list[np.ndarray] = []
    dropped = max(0, segments[0][1] - start) if segments else 0  # deleted by the size cap, never read
    end = start
    for i, (seg, first) in enumerate(segments):
        following = segments[i + 1][1] if i + 1 < len(segments) else None
        if following is not None and following <= start:
            continue  # wholly before start: not even read
        wanted = revision is None or seg.revision == revision
        if not wanted and following is not None:
            end = max(end, following)
            continue
        row = first
        for record in read_segment(seg.path):
            n = len(record)
            if wanted and row + n > start:
                skip = max(0, start - row)
                part = record[skip:]
                got = input_rows(part) if signal == SIGNAL_INPUTS else output_rows(part)
                if got is not None:
                    values.append(got)
                    sequences.append(np.arange(row + skip, row + n, dtype=np.int64))
            row += n
        end = max(end, row)
    if not values:
        return Rows(None, np.zeros(0, np.int64), dropped, end)
    try:
        joined = np.concatenate(values, axis=0)
    except ValueError:  # a width change within one revision (never from one server): keep the newest width
        width = values[-1].shape[1]
        keep = [k for k, v in enumerate(values) if v.shape[1] == width]
        values, sequences = [values[k] for k in keep], [sequences[k] for k in keep]
        joined = np.concatenate(values, axis=0)
    return Rows(joined, np.concatenate(sequences), dropped, end)


def numbered_segments(segments: list[Segment]) -> list[tuple[Segment, int]]:
    """Each segment with the capture sequence of its first row (counted for segments named without it)."""
    out, running = [], 0
    for i, seg in enumerate(segments):
        first = seg.first_row if seg.first_row is not None else running
        out.append((seg, first))
        if i + 1 < len(segments):
            following = segments[i + 1].first_row
            running = following if following is not None else first + rows_in_segment(seg.path)
    return out


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
        numbered = numbered_segments(existing)
        self._next_row = numbered[-1][1] + rows_in_segment(existing[-1].path) if existing else 0
        # the revision serving when this writer starts: of the newest stint, else of the newest segment
        starts = [seg for seg in existing if seg.starts_serving]
        self._serving = (starts or existing)[-1].revision if existing else None
        self._rows_in: dict[int, int] = {}  # rows per segment written by this process
        self._current: Segment | None = None
        self._current_size = 0
        self._fh = None
        self._total = sum(_size(seg.path) for seg in existing)
        self._thread = threading.Thread(target=self._run, name="capture-writer", daemon=True)
        self._thread.start()

    def submit(self, rows, revision: int, outputs: dict[str, np.ndarray] | None = None) -> bool:
        """Queue rows for writing; never blocks. ``rows``: an array or a tuple of arrays sharing the batch
        dimension (flattened and concatenated to float32 by the writer thread), or a dict of named inputs
        (kept in their dtypes and shapes); ``outputs``: the model's outputs by name, kept beside them.
        False (and counted) when the queue is full."""
        item = rows if outputs is None and not isinstance(rows, dict) else (dict(rows) if isinstance(rows, dict)
                                                                           else _named(rows), outputs or {})
        try:
            self._queue.put_nowait((item, revision))
            return True
        except queue.Full:
            self._on_drop(_batch_size(rows), "queue_full")
            return False

    def start_serving(self, revision: int) -> None:
        """The server (re)started serving ``revision`` (at its start, or a hot swap). When that is another
        revision than the one serving before, a new serving stint starts: an empty ``-s`` segment, written in
        order with the rows queued before and after, so that even a stint without traffic is on disk."""
        self._queue.put((_START_SERVING, revision), timeout=10)  # never dropped: the stint boundary matters

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
                data = None if rows is None or rows is _START_SERVING else _record(rows)
                if data is not None and pending and revision == pending_revision and data.dtype == pending[0].dtype:
                    pending.append(data)
                    continue
                if pending:
                    self._write_safely(np.concatenate(pending) if len(pending) > 1 else pending[0], pending_revision)
                    pending = []
                if data is not None:
                    pending, pending_revision = [data], revision
                elif rows is _START_SERVING:
                    self._start_stint(revision)
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

    def _start_stint(self, revision: int) -> None:
        if revision == self._serving:
            return  # the same revision goes on serving (a restart): the same stint
        try:
            self._new_segment(revision, starts=True)
            self._serving = revision
        except OSError as err:
            from kompressor.console import log

            log("capture write failed", level="warning", error=str(err))

    def _new_segment(self, revision: int, starts: bool = False) -> Segment:
        name = f"seg-{self._next_seq:012d}-r{revision}-n{self._next_row:015d}{'-s' if starts else ''}{SEGMENT_SUFFIX}"
        seg = Segment(self.folder / name, self._next_seq, revision, self._next_row, starts)
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        self._fh = open(seg.path, "ab")
        self._next_seq += 1
        self._current, self._current_size = seg, 0
        return seg

    def _write(self, rows: np.ndarray, revision: int) -> None:
        seg = self._current
        if seg is None or seg.revision != revision or self._current_size >= self.segment_bytes:
            seg = self._new_segment(revision)
        data = _encode(rows)
        self._fh.write(data)  # one write per record: readers never see half a header
        self._fh.flush()
        self._current_size += len(data)
        self._next_row += len(rows)
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


def _named(rows) -> dict[str, np.ndarray]:
    arrays = rows if isinstance(rows, tuple) else (rows,)
    return {f"input{i}" if len(arrays) > 1 else "input": a for i, a in enumerate(arrays)}


def _batch_size(rows) -> int:
    if isinstance(rows, dict):
        return len(next(iter(rows.values()))) if rows else 0
    return len(rows[0] if isinstance(rows, tuple) else rows)


def _record(item) -> np.ndarray:
    """What one request becomes on disk: float32 rows for plain inputs; a structured array (one element per
    row, ``in:<name>`` and ``out:<name>`` fields in their own dtypes and shapes) for named inputs and outputs."""
    if not isinstance(item, tuple) or len(item) != 2 or not isinstance(item[0], dict):
        return _as_rows(item)
    inputs, outputs = item
    arrays = {f"{INPUT_FIELD}{k}": np.asarray(v) for k, v in inputs.items()}
    arrays.update({f"{OUTPUT_FIELD}{k}": np.asarray(v) for k, v in outputs.items()})
    n = len(next(iter(arrays.values())))
    # bool is kept as uint8 (numpy's bool in a structured field round-trips, but uint8 needs no care anywhere)
    dtype = np.dtype([(k, np.uint8 if v.dtype == np.bool_ else v.dtype.newbyteorder("<") if v.dtype.byteorder == ">"
                       else v.dtype, v.shape[1:]) for k, v in arrays.items()])
    record = np.empty(n, dtype=dtype)
    for k, v in arrays.items():
        record[k] = v
    return record


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0
