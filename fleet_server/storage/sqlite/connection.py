"""SQLite connections, transactions and the query helpers every concern's module shares.

WAL, one connection per thread (sqlite-utils `Database`). Writers take `BEGIN IMMEDIATE` so that
read-modify-write (bucket sums, seq accounting) is serialised across threads and across ingest
processes sharing the file (SQLite allows one writer at a time).
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlite_utils import Database

from fleet_server.storage.query import decode, dumps, loads, where
from fleet_server.storage.sqlite.migrations import apply as apply_migrations

__all__ = ["Connection", "IntegrityError", "SqliteConnection", "decode", "dumps", "insert_row", "loads",
           "update_row", "where", "within"]


def within(column: str, values: Sequence[Any] | None) -> tuple[str, Any]:
    """The `where` term `column IN (?,?,...)`, left out when values is None."""
    if values is None:
        return "", None
    return f"{column} IN ({','.join('?' * len(values))})", list(values)


IntegrityError = sqlite3.IntegrityError
Connection = sqlite3.Connection


def insert_row(conn: sqlite3.Connection, table: str, row: dict[str, Any], *, or_replace: bool = False) -> int:
    """INSERT one row given as {column: value}; returns its rowid."""
    verb = "INSERT OR REPLACE" if or_replace else "INSERT"
    cur = conn.execute(
        f"{verb} INTO {table}({', '.join(row)}) VALUES ({', '.join('?' * len(row))})", list(row.values())
    )
    return int(cur.lastrowid or 0)


def update_row(conn: sqlite3.Connection, table: str, fields: dict[str, Any], match: dict[str, Any]) -> int:
    """UPDATE `table` SET fields WHERE every `match` column equals its value; returns rows changed."""
    sets = ", ".join(f"{k} = ?" for k in fields)
    cond = " AND ".join(f"{k} = ?" for k in match)
    return conn.execute(f"UPDATE {table} SET {sets} WHERE {cond}", [*fields.values(), *match.values()]).rowcount


class SqliteConnection:
    """The file, its per-thread connections and the transaction and row helpers."""

    def __init__(self, path: str | Path, *, migrate: bool = True) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._all: list[Database] = []
        self._lock = threading.Lock()
        if migrate:
            db = self.db
            with self._immediate():
                apply_migrations(db)

    @property
    def db(self) -> Database:
        db = getattr(self._local, "db", None)
        if db is None:
            conn = sqlite3.connect(str(self.path), timeout=30.0, check_same_thread=False)
            db = Database(conn)
            db.enable_wal()
            # NORMAL in WAL mode survives a process kill (kill -9); only an OS crash can lose
            # the last commits. busy_timeout lets concurrent ingest processes queue for the lock.
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA busy_timeout=30000")
            conn.execute("PRAGMA foreign_keys=ON")
            self._local.db = db
            with self._lock:
                self._all.append(db)
        return db

    @contextmanager
    def _immediate(self) -> Iterator[sqlite3.Connection]:
        conn = self.db.conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        else:
            conn.execute("COMMIT")

    def _rows(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> list[dict[str, Any]]:
        return list(self.db.query(sql, params))

    def _one(self, sql: str, params: Sequence[Any] = ()) -> dict[str, Any] | None:
        rows = self._rows(sql, params)
        return rows[0] if rows else None

    def _scalar(self, sql: str, params: Sequence[Any] = ()) -> Any:
        row = self.db.conn.execute(sql, params).fetchone()
        return row[0] if row else None

    def close(self) -> None:
        with self._lock:
            for db in self._all:
                with contextlib.suppress(sqlite3.ProgrammingError):  # closed from another thread
                    db.close()
            self._all.clear()
        self._local = threading.local()
