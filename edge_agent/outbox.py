"""Store-and-forward outbox in SQLite: every telemetry window and event waits here until the
server acknowledges its seq.

`seq` is one per-device counter over all queued messages. synchronous=FULL because a power
cut must never roll `seq` back: a reused seq would be dropped by the server as a duplicate.
A new outbox (a new install, or a data dir wiped under the same device id) starts at its
creation time in seconds shifted left by `SEQ_INSTALL_SHIFT` bits, so a reinstalled device's
seqs start far above the previous install's and the server neither drops them as duplicates
nor counts the jump as lost messages (protocol.md, "Sequence numbers").
Acks are deleted in batches, so a week of backlog drains without an fsync per message.

A broker's PUBACK only frees the message's in-flight slot: the broker may still lose it (a crash
before its next autosave, nobody subscribed). The message stays here, remembered in memory as
awaiting since its PUBACK, and is sent again if the server's acknowledgement (`DeliveryAck` on
`ack`) does not come within `resend_after_s`, or at once after a reconnect. After a restart
everything still here is sent again; the server dedupes by (device, seq) and acknowledges again.
"""

from __future__ import annotations

import errno
import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edge_agent.protocol import SEQ_INSTALL_SHIFT

log = logging.getLogger("edge_agent.outbox")

SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    seq INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,
    payload BLOB NOT NULL,
    size INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


def is_write_failure(exc: BaseException) -> bool:
    """SQLite could not write: the disk (or the quota) is full, or an I/O error. Serving goes on
    without the outbox; anything else is a bug and is raised."""
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EIO)
    name = getattr(exc, "sqlite_errorname", "") or ""
    if name.startswith(("SQLITE_FULL", "SQLITE_IOERR", "SQLITE_READONLY", "SQLITE_CANTOPEN")):
        return True
    text = str(exc).lower()
    return isinstance(exc, sqlite3.OperationalError) and ("disk is full" in text or "disk i/o error" in text)


def first_seq(now: float) -> int:
    """The first seq of an outbox created at `now` (an install's seqs start here)."""
    return max(0, int(now)) << SEQ_INSTALL_SHIFT


@dataclass
class Message:
    seq: int
    kind: str
    payload: bytes


class Outbox:
    """A bounded, persistent FIFO of outgoing messages keyed by `seq`."""

    def __init__(self, path: str | Path, max_bytes: int = 16 * 1024 * 1024, resend_after_s: float = 120.0,
                 clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.resend_after_s = resend_after_s
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)
        self._next_seq = self._meta("next_seq", -1)
        last = self._db.execute("SELECT MAX(seq) FROM messages").fetchone()[0]
        if last is not None and last >= self._next_seq:
            self._next_seq = last + 1
        if self._next_seq < 0:  # a new outbox: this install's first seq, kept from now on
            self._next_seq = first_seq(clock())
            with self._db:
                self._db.execute("BEGIN")
                self._db.executemany("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                                     [("next_seq", self._next_seq), ("first_seq", self._next_seq)])
        self.first_seq = self._meta("first_seq", 0)  # this install's first seq (0 before seqs had one)
        self.dropped_total = self._meta("dropped_total", 0)  # byte-bound drops and write failures
        self._dropped_saved = self.dropped_total
        self.lost_total = 0  # messages lost since opening because SQLite could not write
        self.write_error: str | None = None  # the last write failure, until a write succeeds
        self._lost_in_episode = 0
        self._bytes = self._db.execute("SELECT COALESCE(SUM(size), 0) FROM messages").fetchone()[0]
        self._acked: list[int] = []
        self._cursor = -1  # highest seq handed to the link since this outbox was opened
        # seq -> when the broker took it (PUBACK), oldest first: sent, waiting for the server.
        self._awaiting: dict[int, float] = {}

    def _meta(self, key: str, default: int) -> int:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return int(row[0]) if row else default

    def append(self, kind: str, build: Callable[[int], bytes]) -> int | None:
        """Queue a message; `build(seq)` makes its payload with the seq it is given.

        Returns the seq, or None when SQLite cannot write (a full disk): the message is lost,
        but its seq is used up and the loss counted in `dropped_total`, so the server sees a
        gap the device explains, and the next message that can be written carries the count.
        """
        with self._lock:
            seq = self._next_seq
            payload = build(seq)
            db = self._db
            freed: list[tuple[int, int]] = []
            try:
                db.execute("BEGIN IMMEDIATE")
                db.execute(
                    "INSERT INTO messages (seq, kind, payload, size) VALUES (?, ?, ?, ?)",
                    (seq, kind, payload, len(payload)),
                )
                total = self._bytes + len(payload)
                while total > self.max_bytes:
                    # Drop the oldest: recent windows matter more to the server than stale ones.
                    row = db.execute("SELECT seq, size FROM messages ORDER BY seq LIMIT 1").fetchone()
                    if row is None or row[0] == seq:
                        break
                    db.execute("DELETE FROM messages WHERE seq = ?", (row[0],))
                    freed.append((row[0], row[1]))
                    total -= row[1]
                db.execute(
                    "INSERT OR REPLACE INTO meta (key, value) VALUES ('next_seq', ?)", (seq + 1,)
                )
                dropped_total = self.dropped_total + len(freed)
                if dropped_total != self._dropped_saved:
                    db.execute(
                        "INSERT OR REPLACE INTO meta (key, value) VALUES ('dropped_total', ?)", (dropped_total,)
                    )
                db.execute("COMMIT")
            except sqlite3.Error as exc:
                self._abort(exc)
                if not is_write_failure(exc):
                    raise
                # Lost: the seq stays used (a gap) and the loss is counted (written with the
                # next message that can be stored).
                self._next_seq = seq + 1
                self.dropped_total += 1
                self.lost_total += 1
                self._note_failure(exc)
                return None
            except BaseException:
                self._abort(None)
                raise
            for old, _size in freed:
                self._awaiting.pop(old, None)
            self._bytes = total
            self._next_seq = seq + 1
            self.dropped_total = self._dropped_saved = dropped_total
            if self.write_error is not None:
                log.warning("outbox writes again after %d lost message(s): %s", self._lost_in_episode,
                            self.write_error)
                self.write_error = None
                self._lost_in_episode = 0
            return seq

    def _abort(self, exc: BaseException | None) -> None:
        """Roll back the open transaction, if SQLite has not already (after SQLITE_FULL at COMMIT
        it has, and a second ROLLBACK would raise "no transaction is active")."""
        if self._db.in_transaction:
            try:
                self._db.execute("ROLLBACK")
            except sqlite3.Error:
                log.warning("outbox rollback failed after %s", exc)

    def _note_failure(self, exc: sqlite3.Error) -> None:
        if self.write_error is None:
            log.error("outbox cannot write (%s): messages are lost and counted in dropped_total until it can", exc)
        self.write_error = str(exc)
        self._lost_in_episode += 1

    def pending(self, after: int = -1, limit: int = 100) -> list[Message]:
        """Oldest queued messages with seq > `after` (not yet acknowledged)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, kind, payload FROM messages WHERE seq > ? ORDER BY seq LIMIT ?",
                (after, limit),
            ).fetchall()
        return [Message(seq, kind, bytes(payload)) for seq, kind, payload in rows]

    def due(self, now: float, limit: int, inflight: set[int] | None = None) -> list[Message]:
        """What to send now, at most `limit`, oldest first: messages the broker took but the server
        has not acknowledged for `resend_after_s`, then messages not yet sent since opening.

        Call `sent(seq)` for each one the link accepted.
        """
        if limit <= 0:
            return []
        inflight = inflight or set()
        with self._lock:
            resend = []
            cutoff = now - self.resend_after_s
            for seq, since in self._awaiting.items():  # oldest PUBACK first
                if since > cutoff or len(resend) >= limit:
                    break
                if seq not in inflight:
                    resend.append(seq)
            out: list[Message] = []
            if resend:
                marks = ",".join("?" * len(resend))
                rows = self._db.execute(
                    f"SELECT seq, kind, payload FROM messages WHERE seq IN ({marks}) ORDER BY seq", resend
                ).fetchall()
                out = [Message(seq, kind, bytes(payload)) for seq, kind, payload in rows]
                for seq in set(resend) - {m.seq for m in out}:
                    del self._awaiting[seq]  # acknowledged or dropped meanwhile
            if len(out) < limit:
                rows = self._db.execute(
                    "SELECT seq, kind, payload FROM messages WHERE seq > ? ORDER BY seq LIMIT ?",
                    (max(self._cursor, max(inflight, default=-1)), limit - len(out)),
                ).fetchall()
                out += [Message(seq, kind, bytes(payload)) for seq, kind, payload in rows]
        return out

    def sent(self, seq: int) -> None:
        """The link accepted this message: it is in flight until its PUBACK (`broker_took`)."""
        with self._lock:
            self._awaiting.pop(seq, None)
            if seq > self._cursor:
                self._cursor = seq

    def broker_took(self, seq: int, now: float) -> None:
        """PUBACK: the broker has the message; it now waits for the server's acknowledgement."""
        with self._lock:
            self._awaiting.pop(seq, None)
            self._awaiting[seq] = now

    def resend_all(self) -> None:
        """After a reconnect: every message awaiting the server's acknowledgement is due at once
        (a restarted broker may have lost it)."""
        with self._lock:
            for seq in self._awaiting:
                self._awaiting[seq] = float("-inf")

    @property
    def awaiting(self) -> int:
        """Messages the broker took that the server has not acknowledged yet."""
        return len(self._awaiting)

    def ack(self, seq: int) -> None:
        """Mark a message delivered (the server's acknowledgement); deleted at the next `commit_acks`."""
        with self._lock:
            self._acked.append(seq)

    def commit_acks(self) -> int:
        """Delete the acknowledged messages in one transaction; returns how many acks there were.
        When SQLite cannot write (a full disk) the acks are kept for the next call."""
        with self._lock:
            acked, self._acked = self._acked, []
            if not acked:
                return 0
            db = self._db
            total = 0
            try:
                db.execute("BEGIN IMMEDIATE")
                for seq in acked:
                    row = db.execute("SELECT size FROM messages WHERE seq = ?", (seq,)).fetchone()
                    if row is not None:
                        total += row[0]
                        db.execute("DELETE FROM messages WHERE seq = ?", (seq,))
                db.execute("COMMIT")
            except sqlite3.Error as exc:
                self._abort(exc)
                if not is_write_failure(exc):
                    raise
                self._acked = acked + self._acked  # deleted later; the server dedupes resends
                self._note_failure(exc)
                return 0
            for seq in acked:
                self._awaiting.pop(seq, None)
            self._bytes -= total
            return len(acked)

    def count(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM messages").fetchone()[0]

    @property
    def bytes(self) -> int:
        return self._bytes

    @property
    def next_seq(self) -> int:
        return self._next_seq

    def close(self) -> None:
        self.commit_acks()
        with self._lock:
            self._db.close()
