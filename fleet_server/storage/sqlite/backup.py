"""A consistent copy of the live SQLite file, for backups.

The online backup API in one step: in WAL mode that is one read transaction, so the copy is a
snapshot of a single moment and writers (ingest) are never blocked.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from fleet_server.storage.base import SnapshotFacts, StorageError
from fleet_server.storage.sqlite.connection import SqliteConnection
from fleet_server.storage.sqlite.migrations import MIGRATIONS_TABLE

_COUNTED = ("devices", "models", "windows", "rollouts", "alerts")


def snapshot_facts(path: Path) -> SnapshotFacts:
    """Applied migrations, row counts and referenced bundle files of a database file (read-only)."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        applied = (
            [r[0] for r in conn.execute(f"SELECT name FROM {MIGRATIONS_TABLE} ORDER BY applied_at, name")]
            if MIGRATIONS_TABLE in tables else []
        )
        counts = {t: conn.execute(f"SELECT count(*) FROM [{t}]").fetchone()[0] for t in _COUNTED if t in tables}
        files = [r[0] for r in conn.execute("SELECT file FROM models")] if "models" in tables else []
    finally:
        conn.close()
    return SnapshotFacts(migrations=applied, counts=counts, bundle_files=files)


class BackupMixin(SqliteConnection):
    def backup_to(self, dest: Path) -> SnapshotFacts:
        out = sqlite3.connect(str(dest))
        try:
            # pages=-1: everything in one step, i.e. one read transaction. A stepwise copy would
            # restart on every commit of a busy ingest and might never finish.
            self.db.conn.backup(out, pages=-1)
            out.execute("PRAGMA journal_mode=DELETE")  # one self-contained file
            check = out.execute("PRAGMA quick_check").fetchone()[0]
        finally:
            out.close()
        if check != "ok":
            raise StorageError(f"the copied database fails its integrity check ({check}); try again")
        return snapshot_facts(dest)
