"""A dedicated PostgreSQL session holding a session-level advisory lock (leadership of the
singleton work): the lock lives exactly as long as the session, so a holder that dies or is cut
off releases it without anyone's help."""

from __future__ import annotations

import contextlib

import psycopg

from fleet_server.storage.base import StorageUnavailable

# The server drops the session when this host stops answering (its TCP keepalives, ~11 s) rather
# than after the operating system's default of two hours; tcp_user_timeout bounds how long a call
# on this side waits for a server that no longer answers.
SESSION_OPTIONS = "-c tcp_keepalives_idle=5 -c tcp_keepalives_interval=2 -c tcp_keepalives_count=3"


class AdvisoryLockSession:
    """`try_lock()` takes `pg_advisory_lock(key)` if it is free (never waits); `ping()` proves the
    session (and so the lock) is still there. Both connect when needed and raise
    StorageUnavailable, after closing the session, when it is gone: the caller holds nothing then."""

    def __init__(self, url: str, key: int, *, name: str = "edgefleet-leader") -> None:
        self.url, self.key, self.name = url, key, name
        self._conn: psycopg.Connection | None = None

    def _connection(self) -> psycopg.Connection:
        if self._conn is None:
            self._conn = psycopg.connect(
                self.url, autocommit=True, connect_timeout=2, keepalives=1, keepalives_idle=5,
                keepalives_interval=2, keepalives_count=2, tcp_user_timeout=3000, options=SESSION_OPTIONS,
                application_name=self.name,
            )
        return self._conn

    def _run(self, sql: str, params: tuple = ()) -> object:
        try:
            row = self._connection().execute(sql, params).fetchone()
        except (psycopg.Error, OSError) as exc:
            self.close()
            text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise StorageUnavailable(f"the lock session to PostgreSQL is gone: {text}") from exc
        return row[0] if row else None

    def try_lock(self) -> bool:
        return bool(self._run("SELECT pg_try_advisory_lock(%s)", (self.key,)))

    def ping(self) -> None:
        self._run("SELECT 1")

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):  # a dead connection may fail to close; it is gone anyway
                conn.close()
