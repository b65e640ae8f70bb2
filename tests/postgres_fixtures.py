"""PostgreSQL fixtures: one real cluster per test session, a fresh database per test, and the
`backend` parametrization that runs a test against SQLite and PostgreSQL alike."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from fleet_server.storage.open import sqlite_url
from tests.postgres import PostgresCluster, PostgresMissing, find_bindir

BACKENDS = ("sqlite", "postgres")

__all__ = ["BACKENDS", "backend", "backend_url", "every_backend", "pg_cluster", "pg_url", "server_storage_url", "db_rows", "db_execute_many"]


@pytest.fixture(scope="session")
def pg_cluster():
    """A PostgreSQL 15 cluster of our own (initdb + pg_ctl on a free loopback port), stopped at the end."""
    try:
        bindir = find_bindir()
    except PostgresMissing as exc:
        pytest.fail(str(exc), pytrace=False)
    cluster = PostgresCluster(bindir).start()
    yield cluster
    cluster.destroy()


@pytest.fixture
def pg_url(pg_cluster):
    """The URL of a new, empty database, dropped after the test."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    url = pg_cluster.create_database(name)
    yield url
    pg_cluster.drop_database(name)


def backend_url(request: pytest.FixtureRequest, backend: str, data_dir: Path) -> str:
    """The storage_url of a fresh store of `backend`: a file in data_dir, or a new database (the
    cluster is started only when a test asks for PostgreSQL)."""
    if backend == "sqlite":
        return sqlite_url(data_dir / "fleet.db")
    return request.getfixturevalue("pg_url")


@pytest.fixture
def backend(request) -> str:
    """The storage backend of the server fixtures: SQLite unless a module asks for every backend
    (`from tests.postgres_fixtures import every_backend`)."""
    return getattr(request, "param", "sqlite")


@pytest.fixture(name="backend", params=BACKENDS)
def every_backend(request) -> str:
    """Import into a test module to run its server tests on every backend."""
    return request.param


def server_storage_url(request: pytest.FixtureRequest, backend: str) -> str:
    """A server config's storage_url for `backend`: "" (the data dir's SQLite file) or a new database."""
    return "" if backend == "sqlite" else request.getfixturevalue("pg_url")


def db_rows(storage, sql: str, *params) -> list[tuple]:
    """The rows of a test's check query, read straight from either backend's database (`?` marks)."""
    if hasattr(storage, "db"):
        return [tuple(r) for r in storage.db.conn.execute(sql, params).fetchall()]
    with storage.pool.connection() as conn:
        return [tuple(r.values()) for r in conn.execute(sql.replace("?", "%s"), params).fetchall()]


def db_execute_many(storage, sql: str, rows: list[tuple]) -> None:
    """Write a test's fixture rows straight into either backend's database (`?` marks), committed."""
    if hasattr(storage, "db"):
        with storage.db.conn:
            storage.db.conn.executemany(sql, rows)
        return
    with storage.pool.connection() as conn:
        conn.cursor().executemany(sql.replace("?", "%s"), rows)
