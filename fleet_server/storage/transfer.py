"""Move a SQLite deployment into an empty PostgreSQL database (`edgefleet server migrate-storage`).

Every table of the SQLite file is copied (COPY, parents before the tables that reference them),
and every bundle file the models name goes into `bundle_blobs`, so that any node can serve it.
The copy is one PostgreSQL transaction: the counts and an order-independent checksum of every
table are computed on both sides before it commits, and any difference (or error) rolls it all
back, leaving the target as empty as it was. A target that holds data is refused before anything
is written. The source is only read (after its own pending migrations, as a server start would).
"""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fleet_server.storage.base import StorageError
from fleet_server.storage.open import backend, redact

# Tables each backend keeps for its own schema bookkeeping: never copied.
SQLITE_OWN = ("_sqlite_migrations", "sqlite_sequence", "sqlite_stat1")
POSTGRES_OWN = ("schema_migrations",)
# Written by the PostgreSQL migrations themselves (replaced by the source's rows).
SEEDED = ("meta",)
# Referenced by foreign keys: copied first.
PARENTS = ("devices", "operators", "rollouts")
# Columns each backend keeps for itself, never copied: a device's change number is a counter on
# SQLite and a transaction id on PostgreSQL (`Storage.device_changes`).
OWN_COLUMNS = {"devices": ("change_seq",)}


@dataclass
class TableReport:
    name: str
    rows: int
    checksum: str


@dataclass
class TransferReport:
    source: str
    target: str
    tables: list[TableReport] = field(default_factory=list)
    bundles: int = 0
    bundle_bytes: int = 0

    def lines(self) -> list[str]:
        out = [f"copied {self.source} to {self.target}:"]
        out += [f"  {t.name:24} {t.rows:>10} rows  checksum {t.checksum[:16]} (verified)" for t in self.tables]
        out.append(f"  {'bundle_blobs':24} {self.bundles:>10} bundles ({self.bundle_bytes} bytes, sha256 verified)")
        out.append(f"{sum(t.rows for t in self.tables)} rows in {len(self.tables)} tables; counts and checksums "
                   "match the source")
        return out


def _canonical(value: Any) -> bytes:
    """One value as both backends return it (SQLite REAL holding 3 is 3.0; PostgreSQL bigint 3)."""
    if value is None:
        return b"\x00"
    if isinstance(value, bool):
        value = int(value)
    if isinstance(value, (int, float)):
        f = float(value)
        return (str(int(f)) if f.is_integer() and abs(f) < 2**62 else repr(f)).encode()
    if isinstance(value, memoryview):
        value = bytes(value)
    if isinstance(value, bytes):
        return b"\x01" + value
    return str(value).encode()


class TableSum:
    """Row count and an order-independent checksum (the sum of each row's SHA-256, mod 2**256)."""

    def __init__(self) -> None:
        self.rows = 0
        self._sum = 0

    def add(self, row: Sequence[Any]) -> None:
        h = hashlib.sha256(b"\x1f".join(_canonical(v) for v in row)).digest()
        self._sum = (self._sum + int.from_bytes(h, "big")) % (1 << 256)
        self.rows += 1

    @property
    def hexdigest(self) -> str:
        return f"{self._sum:064x}"


def _sqlite_tables(conn: sqlite3.Connection) -> dict[str, list[str]]:
    names = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
    return {n: [c[1] for c in conn.execute(f'PRAGMA table_info("{n}")') if c[1] not in OWN_COLUMNS.get(n, ())]
            for n in names if n not in SQLITE_OWN and not n.startswith("sqlite_")}


def _postgres_tables(conn: Any) -> dict[str, list[str]]:
    rows = conn.execute(
        "SELECT table_name, column_name FROM information_schema.columns WHERE table_schema = current_schema() "
        "ORDER BY table_name, ordinal_position"
    ).fetchall()
    out: dict[str, list[str]] = {}
    for table, column in rows:
        if table not in POSTGRES_OWN and column not in OWN_COLUMNS.get(table, ()):
            out.setdefault(table, []).append(column)
    return out


def _refuse_non_empty(conn: Any, url: str) -> None:
    tables = _postgres_tables(conn)
    if not tables:
        return
    filled = []
    for table in tables:
        if table in SEEDED:
            continue
        n = conn.execute(f'SELECT count(*) FROM "{table}"').fetchone()[0]
        if n:
            filled.append(f"{table} ({n} rows)")
    if filled:
        raise StorageError(
            f"the target database {redact(url)} is not empty: {', '.join(filled[:6])}"
            f"{' …' if len(filled) > 6 else ''}; migrate-storage only fills an empty database "
            "(create a new one with CREATE DATABASE)"
        )


def _order(tables: Iterable[str]) -> list[str]:
    return sorted(tables, key=lambda t: (PARENTS.index(t) if t in PARENTS else len(PARENTS), t))


def migrate_storage(data_dir: Path, source_db: Path, target_url: str) -> TransferReport:
    """Copy the SQLite deployment at `source_db` (bundle files under `data_dir`) into the empty
    PostgreSQL database `target_url`; returns what was copied. Raises StorageError, with nothing
    written to the target, when it cannot."""
    import psycopg

    from fleet_server.storage.postgres.connection import connect_error
    from fleet_server.storage.postgres.migrations import apply as apply_pg
    from fleet_server.storage.sqlite import SqliteStorage

    if backend(target_url) != "postgresql":
        raise StorageError(f"--to {redact(target_url)!r} must be a postgresql:// URL")
    if not source_db.is_file():
        raise StorageError(f"no SQLite database at {source_db}: is {data_dir} a server data dir?")
    SqliteStorage(source_db).close()  # its own pending migrations, as a server start would apply them
    try:
        target = psycopg.connect(target_url, connect_timeout=10)
    except psycopg.Error as exc:
        raise connect_error(target_url, exc) from exc
    report = TransferReport(source=str(source_db), target=redact(target_url))
    src = sqlite3.connect(f"file:{source_db}?mode=ro", uri=True)
    try:
        _refuse_non_empty(target, target_url)
        target.rollback()
        apply_pg(target)  # the schema (its own transactions, under the migration lock)
        src.execute("BEGIN")  # one snapshot of the source for copy and checksums
        with target.transaction():
            _copy(src, target, report)
            _copy_bundles(src, target, data_dir, report)
    except (psycopg.Error, sqlite3.Error) as exc:
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise StorageError(f"copying into {redact(target_url)} failed: {text}; nothing was committed") from exc
    finally:
        src.close()
        target.close()
    return report


def _copy(src: sqlite3.Connection, target: Any, report: TransferReport) -> None:
    source_tables = _sqlite_tables(src)
    target_tables = _postgres_tables(target)
    missing = sorted(set(source_tables) - set(target_tables))
    if missing:
        raise StorageError(f"table(s) {', '.join(missing)} of the SQLite database have no PostgreSQL "
                           "counterpart: upgrade edgefleet on this machine first")
    for table in SEEDED:
        if table in target_tables:
            target.execute(f'DELETE FROM "{table}"')
    for table in _order(source_tables):
        columns = source_tables[table]
        unknown = sorted(set(columns) - set(target_tables[table]))
        if unknown:
            raise StorageError(f"column(s) {', '.join(unknown)} of table {table} have no PostgreSQL counterpart: "
                               "upgrade edgefleet on this machine first")
        cols = ", ".join(f'"{c}"' for c in columns)
        source_sum = TableSum()
        with target.cursor().copy(f'COPY "{table}" ({cols}) FROM STDIN') as copy:
            for row in src.execute(f'SELECT {cols} FROM "{table}"'):
                source_sum.add(row)
                copy.write_row([int(v) if isinstance(v, bool) else v for v in row])
        target_sum = TableSum()
        for row in target.cursor().execute(f'SELECT {cols} FROM "{table}"'):
            target_sum.add(row)
        if (target_sum.rows, target_sum.hexdigest) != (source_sum.rows, source_sum.hexdigest):
            raise StorageError(
                f"table {table}: {source_sum.rows} rows (checksum {source_sum.hexdigest[:16]}) in SQLite but "
                f"{target_sum.rows} (checksum {target_sum.hexdigest[:16]}) in PostgreSQL after the copy; "
                "nothing was committed"
            )
        sequence = target.execute("SELECT pg_get_serial_sequence(%s, 'id')", (f'"{table}"',)).fetchone()[0] \
            if "id" in columns else None
        if sequence:  # identity columns go on after the highest copied id
            target.execute(f'SELECT setval(%s, (SELECT COALESCE(max(id), 0) + 1 FROM "{table}"), false)', (sequence,))
        report.tables.append(TableReport(table, source_sum.rows, source_sum.hexdigest))


def _copy_bundles(src: sqlite3.Connection, target: Any, data_dir: Path, report: TransferReport) -> None:
    """Every bundle file the models name, into bundle_blobs (content-addressed, checked)."""
    seen: set[str] = set()
    for sha256, file in src.execute("SELECT sha256, file FROM models ORDER BY uploaded_at"):
        if sha256 in seen:
            continue
        path = data_dir / file
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise StorageError(f"bundle {path} of a registered model cannot be read ({exc}); nothing was "
                               "committed") from exc
        if hashlib.sha256(data).hexdigest() != sha256:
            raise StorageError(f"bundle {path} does not match its sha256 in the registry; nothing was committed")
        target.execute("INSERT INTO bundle_blobs(sha256, size, data) VALUES (%s, %s, %s)",
                       (sha256, len(data), data))
        seen.add(sha256)
        report.bundles += 1
        report.bundle_bytes += len(data)
