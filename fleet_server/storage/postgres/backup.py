"""Backups of a PostgreSQL database are PostgreSQL's own business (pg_dump, base backups, a
standby): `edgefleet server backup` snapshots an SQLite data dir only, and says so here."""

from __future__ import annotations

from pathlib import Path

from fleet_server.storage.base import SnapshotFacts, StorageError
from fleet_server.storage.postgres.connection import PostgresConnection


class BackupMixin(PostgresConnection):
    def backup_to(self, dest: Path) -> SnapshotFacts:
        raise StorageError(
            "the database is PostgreSQL: back it up with pg_dump or your PostgreSQL backup tooling; "
            "`edgefleet server backup` copies an SQLite data dir"
        )
