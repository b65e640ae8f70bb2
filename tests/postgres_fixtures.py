"""PostgreSQL fixtures: one real cluster per test session, a fresh database per test, and the
`backend` parametrization that runs a test against SQLite and PostgreSQL alike."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from fleet_server.storage.open import sqlite_url
from tests.postgres import PostgresCluster, PostgresMissing, find_bindir

BACKENDS = ("sqlite", "postgres")

__all__ = ["BACKENDS", "backend_url", "pg_cluster", "pg_url"]


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
