"""The prediction log: every served row, and the ground truth sent back, as JSON Lines.

Why not ``bentoml.monitor``: it writes each record synchronously in the request (measured -26%
req/s), rotates by file age rather than by day, and has no request id to tie a record to an
answer or to its feedback. Here a request only appends its rows to an in-memory list (bounded:
past ``max_pending`` rows new ones are counted as dropped, never blocking the answer); one thread
per worker process writes them every ``flush_s`` seconds, one ``write`` per file and batch, to
``<folder>/date=YYYY-MM-DD/{predictions,feedback}-<pid>.jsonl`` (UTC day of the record). One file
per process: workers never interleave. :meth:`PredictionLog.close` writes what is left.

Records (one line each):
- prediction, one per row: ``{"ts", "request_id", "row", "model_version", "inputs": {feature:
  value}, "label", "probabilities": {class: p}}``, plus ``"shadow": {"model_version", "label",
  "probabilities"}`` when the challenger scored the row too (shadow scoring). Category labels are
  written as text, whatever JSON type the client sent.
- feedback: ``{"ts", "request_id", "labels": [true class of each row, in row order]}``.
- ``<folder>/models/<version>.json``: what the service knows of each model it served (classes,
  feature kinds, test metrics), so the log describes itself to the monitor.
- ``<folder>/requests.sqlite``: the index of the requests written (id, rows, day; the last
  31 days), shared by the workers: ``/feedback`` looks a request up there in one query, whatever
  the log's size.
- ``<folder>/date=YYYY-MM-DD/rejects-<pid>.jsonl``: ``{"ts", "request_id", "kind", "row",
  "reason"}`` for each record that could not be encoded (a non-finite number), never written
  to the log itself.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pydantic_core

from ..core.features import category_label
from ..core.fileio import atomic_write_text
from ..core.paths import LOGGED_MODELS_DIR, PREDICTION_LOG_DIR, PREDICTION_LOG_ENV, REQUEST_INDEX

logger = logging.getLogger(__name__)

PREDICTIONS, FEEDBACK, REJECTS = "predictions", "feedback", "rejects"
# What PredictionLog counts (each a Prometheus counter in the service): lines written, lines
# dropped (the buffer was full while writes failed), failed writes, records that could not be
# encoded (written to the rejects file instead).
COUNTS = ("written", "dropped", "write_errors", "rejected")
CHUNK_BYTES = 1 << 20  # the most one write call carries
INDEX_DAYS = 31  # how long /feedback can name a request
ROWS_QUERY = "SELECT rows FROM requests WHERE request_id = ?"  # the rows an id was logged with


def log_folder(explicit: Path | None = None) -> Path:
    """Where the log is: ``explicit``, else ``PREDICTION_LOG_DIR``, else ``logs/predictions``."""
    return explicit or Path(os.environ.get(PREDICTION_LOG_ENV) or PREDICTION_LOG_DIR)


class _Line:
    """One encoded line waiting to be written; ``done`` bytes of it are on disk already."""

    __slots__ = ("data", "done", "path")

    def __init__(self, path: Path, data: bytes) -> None:
        self.path, self.data, self.done = path, data, 0


class PredictionLog:
    """Collects records in memory; a background thread appends them to day-partitioned files.

    Nothing one record or one write does stops the writer: a record that cannot be encoded
    (a non-finite number) goes to ``rejects-<pid>.jsonl`` with its request id and the reason; a
    failed write (disk full, file too large) is retried with backoff (``retry_s``: first and
    longest wait), the lines buffered meanwhile, at most ``max_pending`` waiting to be encoded
    and as many encoded: past that the oldest are dropped and counted. A write that stopped
    part-way resumes at the byte it stopped at, so no line is torn or written twice. When
    writes succeed again, the buffer drains by itself. :meth:`healthy` says whether the writer
    is alive, not stuck and not failing for ``stuck_s`` seconds (the service's readiness).
    """

    def __init__(
        self,
        folder: str | Path,
        *,
        categorical: Sequence[str] = (),
        max_pending: int = 100_000,
        flush_s: float = 0.5,
        retry_s: tuple[float, float] = (0.5, 10.0),
        stuck_s: float = 30.0,
        on_count: Callable[[str, int], None] | None = None,
    ) -> None:
        self.folder, self.max_pending, self.flush_s = Path(folder), max_pending, flush_s
        self.retry_s, self.stuck_s, self.on_count = retry_s, stuck_s, on_count
        self.categorical = tuple(categorical)
        self.counts = dict.fromkeys(COUNTS, 0)
        self._pending: deque[tuple[str, str, tuple[Any, ...], int]] = deque()
        self._rows = 0
        self._out: deque[_Line] = deque()
        self._indexed: list[tuple[str, int, str]] = []  # (request id, rows, day) to index
        self._pruned = ""  # the day the index was last pruned
        self._lock = threading.Lock()  # the pending records and the counts
        self._writing = threading.Lock()  # the encoded lines: the thread or close(), not both
        self._stop = threading.Event()
        self._beat = time.monotonic()
        self._wait = flush_s
        self._failing_since: float | None = None
        self._thread = threading.Thread(target=self._run, name="prediction-log", daemon=True)
        self._thread.start()

    @property
    def dropped(self) -> int:
        """Lines lost so far (each prediction row and each feedback is one line)."""
        return self.counts["dropped"]

    def record(
        self,
        request_id: str,
        model_version: str,
        rows: Sequence[Any],
        answers: Sequence[dict[str, Any]],
        shadow: tuple[str, Sequence[dict[str, Any]]] | None = None,
    ) -> None:
        """Queue one request's rows and answers (cheap: no serialisation, no I/O)."""
        self._queue(PREDICTIONS, len(rows), (request_id, model_version, rows, answers, shadow))

    def feedback(self, request_id: str, labels: Sequence[str]) -> None:
        """Queue the true classes of a request's rows."""
        self._queue(FEEDBACK, 1, (request_id, list(labels)))

    def _queue(self, kind: str, size: int, item: tuple[Any, ...]) -> None:
        now = datetime.now(UTC).isoformat(timespec="microseconds")
        with self._lock:
            self._pending.append((kind, now, item, size))
            self._rows += size
            # The writer is behind (stuck, or dead): the oldest go, never the request.
            while self._rows > self.max_pending and len(self._pending) > 1:
                self._rows -= self._pending[0][3]
                self._count("dropped", self._pending.popleft()[3])

    def _count(self, name: str, n: int = 1) -> None:
        self.counts[name] += n
        if self.on_count is not None:
            self.on_count(name, n)

    def _run(self) -> None:
        while not self._stop.wait(self._wait):
            self._beat = time.monotonic()
            try:
                ok = self.flush()
            except Exception:  # a bug here must not end the thread: log it, keep going
                logger.exception("prediction log: the writer failed; retrying")
                ok = False
            first, longest = self.retry_s
            self._wait = self.flush_s if ok else min(longest, max(first, self._wait * 2))

    def healthy(self) -> tuple[bool, str]:
        """(True, "") while the writer works; else (False, why): dead, stuck, or failing."""
        now = time.monotonic()
        if not self._thread.is_alive() and not self._stop.is_set():
            return False, "the prediction log writer is dead"
        if now - self._beat > self.stuck_s + self._wait:
            return False, f"the prediction log writer is stuck for {now - self._beat:.1f} s"
        since = self._failing_since
        if since is not None and now - since > self.stuck_s:
            return False, f"the prediction log cannot write for {now - since:.1f} s"
        return True, ""

    def flush(self) -> bool:
        """Encode what is queued and write what is encoded; True when nothing is left."""
        with self._writing:
            with self._lock:
                batch, self._pending, self._rows = self._pending, deque(), 0
            for kind, ts, item, size in batch:
                self._encode(kind, ts, item)
                if kind == PREDICTIONS:
                    self._indexed.append((item[0], size, ts[:10]))
            self._bound()
            # Indexed once written: an id the index knows has its lines on disk.
            if not (self._write() and self._index()):
                return False
            if self._failing_since is not None:
                logger.warning("prediction log: writing again (%d lines dropped)", self.dropped)
                self._failing_since = None
            return True

    def _encode(self, kind: str, ts: str, item: tuple[Any, ...]) -> None:
        pid, request_id = os.getpid(), item[0]
        folder = self.folder / f"date={ts[:10]}"
        for row, line in self._lines(kind, ts, item):
            if isinstance(line, Exception):
                self._count("rejected")
                reject = {"ts": ts, "request_id": request_id, "kind": kind, "row": row}
                text = json.dumps(reject | {"reason": f"{type(line).__name__}: {line}"})
                self._out.append(_Line(folder / f"{REJECTS}-{pid}.jsonl", f"{text}\n".encode()))
            else:
                self._out.append(_Line(folder / f"{kind}-{pid}.jsonl", line + b"\n"))

    def _bound(self) -> None:
        """Drop the oldest encoded lines past ``max_pending`` (a line half written stays)."""
        del self._indexed[: -self.max_pending]
        dropped = 0
        while len(self._out) > self.max_pending:
            if self._out[0].done:
                del self._out[1]
            else:
                self._out.popleft()
            dropped += 1
        if dropped:
            with self._lock:
                self._count("dropped", dropped)

    def _write(self) -> bool:
        while self._out:
            path = self._out[0].path
            chunk, size = [], 0
            for line in self._out:
                if line.path != path or size >= CHUNK_BYTES:
                    break
                chunk.append(line)
                size += len(line.data) - line.done
            data = b"".join(line.data[line.done :] for line in chunk)
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
                try:
                    written = os.write(fd, data)
                finally:
                    os.close(fd)
            except OSError as exc:
                self._failed(path, exc)
                return False
            self._advance(written)
        return True

    def _index(self) -> bool:
        """Add the written requests to the index (SQLite, shared by the workers); prune it of
        days older than INDEX_DAYS once a day. False when it cannot be written."""
        if not self._indexed:
            return True
        path, today = self.folder / REQUEST_INDEX, self._indexed[-1][2]
        try:
            with closing(sqlite3.connect(path, timeout=10)) as db, db:
                db.execute("PRAGMA journal_mode=WAL")
                db.execute(
                    "CREATE TABLE IF NOT EXISTS requests"
                    " (request_id TEXT PRIMARY KEY, rows INTEGER NOT NULL, day TEXT NOT NULL)"
                )
                db.executemany("INSERT OR REPLACE INTO requests VALUES (?, ?, ?)", self._indexed)
                if today != self._pruned:
                    cutoff = datetime.fromisoformat(today).toordinal() - INDEX_DAYS
                    day = datetime.fromordinal(cutoff).date().isoformat()
                    db.execute("DELETE FROM requests WHERE day < ?", (day,))
        except sqlite3.Error as exc:
            self._failed(path, OSError(errno.EIO, f"{type(exc).__name__}: {exc}"))
            return False
        self._pruned = today
        self._indexed.clear()
        return True

    def _advance(self, written: int) -> None:
        """Mark ``written`` bytes from the head of the queue as on disk."""
        lines = 0
        while written and self._out:
            head = self._out[0]
            step = min(written, len(head.data) - head.done)
            head.done += step
            written -= step
            if head.done == len(head.data):
                self._out.popleft()
                lines += 1
        with self._lock:
            self._count("written", lines)

    def _failed(self, path: Path, exc: OSError) -> None:
        with self._lock:
            self._count("write_errors")
        if self._failing_since is None:
            self._failing_since = time.monotonic()
        name = errno.errorcode.get(exc.errno or 0, "?")
        logger.warning(
            "prediction log: cannot write %s (%s: %s); %d lines waiting, %d dropped so far",
            path, name, exc.strerror, len(self._out), self.dropped,
        )  # fmt: skip

    def _lines(
        self, kind: str, ts: str, item: tuple[Any, ...]
    ) -> Iterator[tuple[int | None, bytes | Exception]]:
        """(row, line) for each record of ``item``; the exception when it cannot be encoded."""
        if kind == FEEDBACK:
            request_id, labels = item
            yield None, _encoded({"ts": ts, "request_id": request_id, "labels": labels})
            return
        request_id, version, rows, answers, shadow = item
        shadow_version, shadow_answers = shadow or (None, [None] * len(rows))
        for i, (row, answer, other) in enumerate(zip(rows, answers, shadow_answers, strict=True)):
            record = {"ts": ts, "request_id": request_id, "row": i, "model_version": version}
            try:
                record |= {"inputs": self._inputs(row), **answer}
            except Exception as exc:
                yield i, exc
                continue
            if other is not None:
                record["shadow"] = {"model_version": shadow_version, **other}
            yield i, _encoded(record)

    def _inputs(self, row: Any) -> dict[str, Any]:
        values = row.model_dump() if hasattr(row, "model_dump") else dict(row)
        for name in self.categorical:
            values[name] = category_label(values[name])
        return values

    def describe(self, version: str, card: dict[str, Any]) -> None:
        """Write ``models/<version>.json`` (the model's classes, kinds and test metrics)."""
        path = self.folder / LOGGED_MODELS_DIR / f"{version}.json"
        text = json.dumps(card, indent=2, sort_keys=True) + "\n"
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, text)

    def close(self, timeout: float = 10.0) -> None:
        """Stop the writer thread and write what is left, retrying for up to ``timeout``
        seconds; what still cannot be written is counted as dropped."""
        self._stop.set()
        self._thread.join(timeout=timeout)
        deadline = time.monotonic() + timeout
        while not self.flush() and time.monotonic() < deadline:
            time.sleep(min(self.retry_s[0], max(0.0, deadline - time.monotonic())))
        with self._writing:
            if self._out:
                with self._lock:
                    self._count("dropped", len(self._out))
                logger.error("prediction log: %d lines not written at exit", len(self._out))
                self._out.clear()


def _encoded(record: dict[str, Any]) -> bytes | Exception:
    """The JSON line of ``record``, or the reason it has none (NaN, inf, an odd type).

    pydantic-core's encoder (6 us a served row against json's 30 us, measured): the writer shares
    the worker's interpreter lock with the requests, and with json it fell behind under load
    (24,000 lines in 150 s at 1,170 req/s on one worker). It writes non-finite floats as the
    bare tokens NaN and Infinity: a line holding either token anywhere (a string included) is
    encoded again by json, strictly, which rejects it or, when the token was text, writes it.
    """
    try:
        line = pydantic_core.to_json(record, inf_nan_mode="constants")
        if b"NaN" not in line and b"Infinity" not in line:
            return line
    except (pydantic_core.PydanticSerializationError, TypeError, ValueError):
        pass  # json names the reason below
    try:
        return json.dumps(record, allow_nan=False).encode()
    except (TypeError, ValueError) as exc:
        return exc


def count_rows(folder: str | Path, request_id: str) -> int:
    """How many rows the log holds for ``request_id`` (0: none it knows of), from its index:
    one lookup whatever the log's size (for feedback on a request another worker answered)."""
    path = Path(folder) / REQUEST_INDEX
    if not path.exists():
        return 0
    with closing(sqlite3.connect(path, timeout=10)) as db:
        found = db.execute(ROWS_QUERY, (request_id,)).fetchone()
    return int(found[0]) if found else 0


class RequestIndex:
    """Lookups in the request index for ``/feedback``: :func:`count_rows` on one connection
    per thread, kept open (a lookup then takes ~3 us; opening a connection for each took
    ~200 us, the better part of an unknown-id feedback's cost to the worker).

    No connection is opened before the index exists (opening one would create an empty file).
    A connection follows the file: one to a file since deleted or replaced (the folder cleaned,
    a volume mounted again) is dropped for a new one. A connection that fails is dropped and
    the lookup tried once on a new one.
    """

    def __init__(self, folder: str | Path) -> None:
        self.path = Path(folder) / REQUEST_INDEX
        self._local = threading.local()

    def rows(self, request_id: str) -> int:
        """Like :func:`count_rows`: the rows logged under ``request_id``, 0 when unknown."""
        try:
            return self._lookup(request_id)
        except sqlite3.Error:
            self._drop()
            return self._lookup(request_id)  # on a new connection; a second failure raises

    def _lookup(self, request_id: str) -> int:
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            self._drop()
            return 0
        file = (stat.st_dev, stat.st_ino)
        if getattr(self._local, "file", None) != file:
            self._drop()
        if getattr(self._local, "db", None) is None:
            self._local.db, self._local.file = sqlite3.connect(self.path, timeout=10), file
        found = self._local.db.execute(ROWS_QUERY, (request_id,)).fetchone()
        return int(found[0]) if found else 0

    def _drop(self) -> None:
        db, self._local.db, self._local.file = getattr(self._local, "db", None), None, None
        if db is not None:
            db.close()
