"""A bounded on-disk queue (SQLite) for telemetry and events while the broker is out of reach.

Every message gets the device's next sequence number when it is queued; the number and
the row are written in one transaction, so numbers are never reused after a restart. The
publisher sends rows in sequence order and deletes a row only when the broker acknowledged
it (PUBACK), so a message is sent at least once and a receiver de-duplicates by sequence
number. When the queue holds more than its budget (messages or bytes) the oldest rows are
dropped and counted; the count goes out in the next telemetry message (``queue.dropped``)
and the receiver sees the gap in sequence numbers.

SQLite runs in WAL mode with ``synchronous=NORMAL``: a power cut may lose the last queued
messages, never corrupt the queue. OTA state lives in ``state.json``, not here.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Row:
    seq: int
    topic: str
    payload: bytes


class Outbox:
    """The queue. Thread-safe; one instance per data directory."""

    def __init__(self, path: Path, *, max_messages: int = 10_000, max_bytes: int = 20 << 20) -> None:
        self.path = path
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        # Re-entrant: a payload builder (called under the lock) may read depth and dropped.
        self._lock = threading.RLock()
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS outbox (seq INTEGER PRIMARY KEY, topic TEXT NOT NULL, payload BLOB NOT NULL)"
        )
        self._db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL)")
        for key in ("next_seq", "dropped", "bytes"):
            self._db.execute("INSERT OR IGNORE INTO meta VALUES (?, 0)", (key,))
        self._count = int(self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])
        self._bytes = self._meta("bytes")
        self._listeners: list[Callable[[], None]] = []

    def _meta(self, key: str) -> int:
        return int(self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()[0])

    def on_put(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` after every ``put`` (the publisher wakes up)."""
        self._listeners.append(listener)

    def put(self, topic: str, build: Callable[[int], bytes]) -> int:
        """Queue one message; ``build(seq)`` makes its payload with the sequence number it gets. Returns seq."""
        with self._lock:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                seq = self._meta("next_seq")
                # Make room first, so a message that reports the drop count includes its own.
                self._count_dropped(self._enforce_budget(extra=1))
                payload = build(seq)
                db.execute("INSERT INTO outbox VALUES (?, ?, ?)", (seq, topic, payload))
                db.execute("UPDATE meta SET value = ? WHERE key = 'next_seq'", (seq + 1,))
                self._count += 1
                self._bytes += len(payload)
                self._count_dropped(self._enforce_budget())
                db.execute("UPDATE meta SET value = ? WHERE key = 'bytes'", (self._bytes,))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                self._count = int(db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])
                self._bytes = self._meta("bytes")
                raise
        for listener in self._listeners:
            listener()
        return seq

    def _count_dropped(self, dropped: int) -> None:
        if dropped:
            self._db.execute("UPDATE meta SET value = value + ? WHERE key = 'dropped'", (dropped,))

    def _enforce_budget(self, extra: int = 0) -> int:
        """Delete the oldest rows until ``extra`` more fit in the budget; return how many were deleted."""
        dropped = 0
        while self._count > 0 and (self._count + extra > self.max_messages or self._bytes > self.max_bytes):
            over = max(self._count + extra - self.max_messages, 1)
            rows = self._db.execute("SELECT seq, length(payload) FROM outbox ORDER BY seq LIMIT ?", (over,)).fetchall()
            if not rows:
                break
            last = rows[-1][0]
            self._db.execute("DELETE FROM outbox WHERE seq <= ?", (last,))
            self._count -= len(rows)
            self._bytes -= sum(int(r[1]) for r in rows)
            dropped += len(rows)
        return dropped

    def peek(self, limit: int, exclude: set[int] | frozenset[int] = frozenset()) -> list[Row]:
        """The oldest ``limit`` rows not in ``exclude`` (those in flight), in sequence order."""
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, topic, payload FROM outbox ORDER BY seq LIMIT ?", (limit + len(exclude),)
            ).fetchall()
        out = [Row(int(s), str(t), bytes(p)) for s, t, p in rows if int(s) not in exclude]
        return out[:limit]

    def ack(self, seq: int) -> None:
        """Delete a row the broker acknowledged (no-op if it was already dropped)."""
        with self._lock:
            row = self._db.execute("SELECT length(payload) FROM outbox WHERE seq = ?", (seq,)).fetchone()
            if row is None:
                return
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute("DELETE FROM outbox WHERE seq = ?", (seq,))
            self._count -= 1
            self._bytes -= int(row[0])
            self._db.execute("UPDATE meta SET value = ? WHERE key = 'bytes'", (self._bytes,))
            self._db.execute("COMMIT")

    @property
    def depth(self) -> int:
        return self._count

    @property
    def dropped(self) -> int:
        with self._lock:
            return self._meta("dropped")

    @property
    def next_seq(self) -> int:
        with self._lock:
            return self._meta("next_seq")

    def close(self) -> None:
        with self._lock:
            self._db.close()
