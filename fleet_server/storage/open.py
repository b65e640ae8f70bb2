"""Open the storage a `storage_url` names: `sqlite:///path/to/fleet.db` or `postgresql://user@host:port/db`."""

from __future__ import annotations

import re
from pathlib import Path

from fleet_server.storage.base import Storage, StorageError

SCHEMES = ("sqlite", "postgresql", "postgres")


def redact(url: str) -> str:
    """The URL without its password, for messages and logs."""
    return re.sub(r"(://[^:/@]+):[^@/]*@", r"\1:***@", url)


def sqlite_url(path: str | Path) -> str:
    return f"sqlite:///{Path(path).resolve().as_posix().lstrip('/')}"


def backend(url: str) -> str:
    """'sqlite' or 'postgresql' (a StorageError for anything else)."""
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme == "sqlite":
        return "sqlite"
    if scheme in ("postgresql", "postgres"):
        return "postgresql"
    raise StorageError(
        f"storage_url {redact(url)!r} is not one edgefleet knows: use sqlite:///path/to/fleet.db or "
        "postgresql://user:password@host:port/database"
    )


def open_storage(url: str, *, migrate: bool = True) -> Storage:
    """The backend `url` names, opened (and its schema migrated, unless `migrate=False`).

    Raises StorageError with a one-line message that says what to check when it cannot be opened;
    nothing is written then."""
    if backend(url) == "sqlite":
        from fleet_server.storage.sqlite import SqliteStorage

        path = url.split("://", 1)[1]
        if not path or path == "/":
            raise StorageError("storage_url sqlite:/// needs a file path, e.g. sqlite:///var/lib/edgefleet/fleet.db")
        try:
            return SqliteStorage(Path(path), migrate=migrate)
        except StorageError:
            raise
        except Exception as exc:  # sqlite3.Error, OSError: the file or its directory
            raise StorageError(f"cannot open SQLite storage {path}: {exc} (check the path and its permissions)") \
                from exc
    from fleet_server.storage.postgres import PostgresStorage

    return PostgresStorage(url, migrate=migrate)


def check_storage(url: str) -> None:
    """Fail fast, before a server creates anything, when a database server's storage cannot be
    opened or holds a newer schema (reads only). An SQLite file is created on first start."""
    if backend(url) != "sqlite":
        open_storage(url, migrate=False).close()
