"""PostgreSQL connections (a psycopg_pool pool), transactions and the shared query helpers.

Every method borrows a pooled connection for one transaction. Where SQLite serialises writers
with `BEGIN IMMEDIATE`, PostgreSQL writers run concurrently (several nodes and ingest processes):
read-modify-write of one device's rows takes a transaction-level advisory lock per device
(`lock_devices`), and singleton maintenance (bucket compaction) one lock of its own.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg.rows import dict_row, tuple_row
from psycopg_pool import ConnectionPool, PoolTimeout

from fleet_server.storage.base import StorageError, StorageUnavailable
from fleet_server.storage.postgres.migrations import apply as apply_migrations
from fleet_server.storage.query import decode, dumps, loads, where

__all__ = ["Connection", "IntegrityError", "PostgresConnection", "decode", "dumps", "insert_row", "loads",
           "lock_devices", "tuples", "update_row", "where", "within"]

IntegrityError = psycopg.errors.UniqueViolation
Connection = psycopg.Connection

# Namespaces of advisory lock keys (the first argument of the two-key form).
DEVICE_LOCK = 0x6566_0001
COMPACTION_LOCK = 0x6566_0002


def within(column: str, values: Sequence[Any] | None) -> tuple[str, Any]:
    """The `where` term `column = ANY(%s)`, left out when values is None."""
    if values is None:
        return "", None
    return f"{column} = ANY(%s)", [list(values)]


def within_ids(column: str, ids: Sequence[str] | None) -> tuple[str, Any]:
    """`within` for device ids, sent as one comma-joined text: a list of 10,000 ids costs psycopg
    some 15 ms to quote element by element, the text nothing (an id has no comma: ID_PATTERN)."""
    if ids is None:
        return "", None
    joined = ",".join(ids)
    if not ids or joined.count(",") != len(ids) - 1:
        return within(column, ids)
    return f"{column} = ANY(string_to_array(%s, ','))", [joined]


def _param(value: Any) -> Any:
    # SQLite stores a bool as 0/1 in an INTEGER column; PostgreSQL refuses bool for bigint.
    return int(value) if isinstance(value, bool) else value


def insert_row(conn: psycopg.Connection, table: str, row: dict[str, Any], *, key: Sequence[str] = (),
               returning: str | None = None) -> Any:
    """INSERT one row given as {column: value}; with `key`, replace the row that has the same key
    (SQLite's INSERT OR REPLACE). Returns the `returning` column's value."""
    sql = f"INSERT INTO {table}({', '.join(row)}) VALUES ({', '.join(['%s'] * len(row))})"
    if key:
        rest = [c for c in row if c not in key]
        sql += f" ON CONFLICT ({', '.join(key)}) DO " + (
            "UPDATE SET " + ", ".join(f"{c} = excluded.{c}" for c in rest) if rest else "NOTHING"
        )
    if returning:
        sql += f" RETURNING {returning}"
    cur = conn.cursor(row_factory=tuple_row).execute(sql, [_param(v) for v in row.values()])
    return cur.fetchone()[0] if returning else None


def tuples(conn: psycopg.Connection, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
    """The rows of a query as tuples (the pool's connections return dicts)."""
    return conn.cursor(row_factory=tuple_row).execute(sql, params).fetchall()


def update_row(conn: psycopg.Connection, table: str, fields: dict[str, Any], match: dict[str, Any]) -> int:
    """UPDATE `table` SET fields WHERE every `match` column equals its value; returns rows changed."""
    sets = ", ".join(f"{k} = %s" for k in fields)
    cond = " AND ".join(f"{k} = %s" for k in match)
    cur = conn.execute(f"UPDATE {table} SET {sets} WHERE {cond}",
                       [*map(_param, fields.values()), *map(_param, match.values())])
    return cur.rowcount


def lock_devices(conn: psycopg.Connection, devices: Iterable[str]) -> None:
    """Take the transaction's advisory lock of each device, in one order (no deadlock between two
    transactions locking overlapping sets); released at commit or rollback."""
    keys = sorted(set(devices))
    if keys:
        conn.execute(
            "SELECT pg_advisory_xact_lock(%s::int, k) FROM "
            "(SELECT hashtext(d) AS k FROM unnest(%s::text[]) AS d ORDER BY 1) AS locks",
            (DEVICE_LOCK, keys),
        ).fetchall()


def connect_error(url: str, exc: Exception) -> StorageError:
    """A one-line message that says what to check, for a database that cannot be reached."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    target = psycopg.conninfo.conninfo_to_dict(url) if url else {}
    where_ = f"{target.get('host', 'localhost')}:{target.get('port', 5432)}/{target.get('dbname', '')}"
    if "password authentication failed" in text or "no password supplied" in text:
        hint = "check the user name and password in storage_url"
    elif "does not exist" in text and "database" in text:
        hint = "create the database first (CREATE DATABASE), or fix its name in storage_url"
    elif "role" in text and "does not exist" in text:
        hint = "check the user name in storage_url"
    else:
        hint = "check that PostgreSQL runs there and accepts connections from this host"
    return StorageError(f"cannot open PostgreSQL storage at {where_}: {text} ({hint})")


class PostgresConnection:
    """The pool and the transaction and row helpers."""

    def __init__(self, url: str, *, migrate: bool = True, max_size: int = 16, connect_timeout: float = 10.0) -> None:
        self.url = url
        try:
            # One plain connection first: a wrong URL, password or host fails here with its own
            # message instead of a pool timeout.
            with psycopg.connect(url, connect_timeout=max(1, int(connect_timeout))) as conn:
                if migrate:
                    apply_migrations(conn)
                else:
                    from fleet_server.storage.postgres.migrations import check_version

                    check_version(conn)
        except psycopg.OperationalError as exc:
            raise connect_error(url, exc) from exc
        except psycopg.ProgrammingError as exc:  # e.g. an invalid connection string
            raise StorageError(f"invalid PostgreSQL storage_url: {exc} (expected postgresql://user@host:port/db)") \
                from exc
        # check: a connection is tested as it leaves the pool, so that after a database restart
        # (or a dropped connection) a call gets a fresh one instead of failing once.
        self.pool = ConnectionPool(url, min_size=1, max_size=max_size, open=False, name="edgefleet",
                                   kwargs={"row_factory": dict_row}, check=ConnectionPool.check_connection)
        self.pool.open(wait=True, timeout=connect_timeout)

    @contextmanager
    def _transaction(self) -> Iterator[psycopg.Connection]:
        """One transaction on a pooled connection: committed on success, rolled back on error. A
        database that cannot be reached raises StorageUnavailable (nothing was committed)."""
        try:
            with self.pool.connection() as conn:
                yield conn
        except (psycopg.OperationalError, PoolTimeout) as exc:
            raise self._unavailable(exc) from exc

    def _unavailable(self, exc: Exception) -> StorageUnavailable:
        info = psycopg.conninfo.conninfo_to_dict(self.url)
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return StorageUnavailable(
            f"PostgreSQL database {info.get('dbname', '')} at {info.get('host', 'localhost')}:"
            f"{info.get('port', 5432)} is unavailable: {text}"
        )

    def _rows(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> list[dict[str, Any]]:
        values = {k: _param(v) for k, v in params.items()} if isinstance(params, dict) else [_param(p) for p in params]
        with self._transaction() as conn:
            return conn.execute(sql, values).fetchall()

    def _one(self, sql: str, params: Sequence[Any] = ()) -> dict[str, Any] | None:
        rows = self._rows(sql, params)
        return rows[0] if rows else None

    def _scalar(self, sql: str, params: Sequence[Any] = ()) -> Any:
        row = self._one(sql, params)
        return next(iter(row.values())) if row else None

    def close(self) -> None:
        self.pool.close()
