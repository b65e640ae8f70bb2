"""Backup and restore of a server data dir: a consistent copy taken while the server runs.

The storage backend writes the database snapshot (`Storage.backup_to`: one moment, writers never
blocked). Bundles, secrets, TLS files and server.toml are copied after it (a bundle is written before its
row, so every model in the snapshot has its file), and the managed broker's persistence file
(retained `desired` states, queued messages), freshly saved. The broker's other files are
regenerated from the database at start.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import shutil
import signal
import stat
import tarfile
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from fleet_server.config import CONFIG_FILE, ConfigError, load_config
from fleet_server.storage import StorageError
from fleet_server.storage.open import backend
from fleet_server.storage.sqlite import SqliteStorage

FORMAT = 1
MANIFEST = "backup.json"
DATABASE = "fleet.db"
DIRECTORIES = ("bundles", "secrets", "tls")  # copied whole
BROKER_STATE = "broker/mosquitto.db"  # the rest of broker/ is regenerated at start
PRIVATE = {"secrets", "tls"}  # directories that hold keys: 0700 after a restore


class BackupError(ValueError):
    """A backup or restore that cannot be done; the message says why and what to do."""


@dataclass
class BackupInfo:
    """What a backup holds (the archive's backup.json)."""

    path: Path
    created_at: float
    migrations: list[str]
    counts: dict[str, int]
    files: dict[str, str] = field(default_factory=dict)  # archive name -> sha256
    bytes: int = 0

    def summary(self) -> str:
        counts = ", ".join(f"{n} {k}" for k, n in self.counts.items())
        return f"{self.path}: {len(self.files)} files, {self.bytes} bytes ({counts})"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _save_broker_state(data_dir: Path, timeout: float = 5.0) -> Path | None:
    """Have a running managed broker write its persistence file now, then return the file.

    Mosquitto saves every 30 s (to a temp file it renames), so the file is always whole; SIGUSR1
    makes it save at once, so that desired states published a moment ago are in the backup too.
    """
    path = data_dir / BROKER_STATE
    broker = data_dir / "broker"
    try:
        pid = int((broker / "mosquitto.pid").read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        pid, cmdline = 0, b""
    if pid and str((broker / "mosquitto.conf").resolve()).encode() in cmdline:  # not a reused pid
        before = path.stat().st_mtime_ns if path.exists() else 0
        try:
            os.kill(pid, signal.SIGUSR1)
        except OSError:
            pass  # another user's broker: its last autosave will do
        else:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and (path.stat().st_mtime_ns if path.exists() else 0) == before:
                time.sleep(0.05)
    return path if path.is_file() else None


def _walk(root: Path, name: str) -> Iterator[tuple[str, Path]]:
    """(archive name, path) of the regular files under root/name; temp files are skipped."""
    base = root / name
    if not base.is_dir():
        return
    for path in sorted(base.rglob("*")):
        if path.is_symlink() or not path.is_file() or ".tmp" in path.name:
            continue
        yield path.relative_to(root).as_posix(), path


def _storage_url(data_dir: Path) -> str:
    """The data dir's configured storage (its server.toml, or EDGEFLEET_STORAGE_URL)."""
    try:
        return load_config(data_dir).storage_location
    except (ConfigError, OSError):
        return "sqlite://"  # a data dir without a readable config: its fleet.db, if any, decides


def create_backup(data_dir: str | Path, output: str | Path, *, overwrite: bool = False) -> BackupInfo:
    """Write a tar.gz of the data dir's database, bundles, secrets, TLS files and server.toml.

    Safe while the server (and extra ingest processes) run. The archive holds secrets (the
    server's MQTT password, the TLS CA key): it is written with mode 0600.
    """
    data_dir, output = Path(data_dir), Path(output)
    if backend(_storage_url(data_dir)) != "sqlite":
        raise BackupError(
            f"{data_dir}'s storage_url names a PostgreSQL database: back it up with pg_dump or your PostgreSQL "
            "backup tooling (server backup copies an SQLite data dir)"
        )
    db_path = data_dir / DATABASE
    if not db_path.is_file():
        raise BackupError(f"{data_dir} has no {DATABASE}: it is not a fleet server data dir")
    if output.exists() and not overwrite:
        raise BackupError(f"{output} already exists: pick another file name or pass --force")
    if output.resolve().is_relative_to(data_dir.resolve()):
        raise BackupError(f"{output} is inside the data dir: write the backup somewhere else")

    with tempfile.TemporaryDirectory(prefix="edgefleet-backup-", dir=output.parent) as tmp:
        snapshot = Path(tmp) / DATABASE
        storage = SqliteStorage(db_path, migrate=False)
        try:
            facts = storage.backup_to(snapshot)
        except StorageError as exc:
            raise BackupError(str(exc)) from exc
        finally:
            storage.close()
        migrations, counts, referenced = facts.migrations, facts.counts, facts.bundle_files
        members: list[tuple[str, Path]] = [(DATABASE, snapshot)]
        for name in DIRECTORIES:
            members += list(_walk(data_dir, name))
        if (data_dir / CONFIG_FILE).is_file():
            members.append((CONFIG_FILE, data_dir / CONFIG_FILE))
        broker_state = _save_broker_state(data_dir)
        if broker_state is not None:
            saved = Path(tmp) / "mosquitto.db"
            shutil.copyfile(broker_state, saved)  # a copy: the broker replaces the file as it saves
            members.append((BROKER_STATE, saved))
        names = {n for n, _ in members}
        missing = [f for f in referenced if PurePosixPath(f).as_posix() not in names]
        if missing:
            raise BackupError(f"bundle file(s) {missing[:3]} of registered models are missing from {data_dir}; "
                              "the data dir is damaged: upload those bundles again before backing up")

        info = BackupInfo(path=output, created_at=time.time(), migrations=migrations, counts=counts)
        partial = output.with_name(f".{output.name}.partial")
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with os.fdopen(fd, "wb") as raw, tarfile.open(fileobj=raw, mode="w:gz") as tar:
                for name, path in members:
                    info.files[name] = _sha256(path)
                    info.bytes += path.stat().st_size
                    tar.add(path, arcname=name, recursive=False)
                doc = json.dumps(_manifest(info), indent=2, sort_keys=True).encode()
                entry = tarfile.TarInfo(MANIFEST)
                entry.size, entry.mtime, entry.mode = len(doc), int(info.created_at), 0o600
                tar.addfile(entry, io.BytesIO(doc))
                raw.flush()
                os.fsync(raw.fileno())
            os.replace(partial, output)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
    return info


def _manifest(info: BackupInfo) -> dict:
    return {"format": FORMAT, "created_at": info.created_at, "migrations": info.migrations,
            "counts": info.counts, "files": info.files}


def _safe_name(name: str) -> bool:
    parts = PurePosixPath(name).parts
    if not parts or name.startswith("/") or any(p in ("..", "") for p in parts):
        return False
    if len(parts) == 1:
        return name in (DATABASE, CONFIG_FILE, MANIFEST)
    return parts[0] in DIRECTORIES or name == BROKER_STATE


def read_backup_info(archive: str | Path) -> BackupInfo:
    """The manifest of a backup archive (checks that it is one)."""
    archive = Path(archive)
    try:
        with tarfile.open(archive, "r:gz") as tar:
            member = tar.getmember(MANIFEST)
            fh = tar.extractfile(member)
            doc = json.loads(fh.read() if fh else b"")
    except (OSError, tarfile.TarError, KeyError, json.JSONDecodeError) as exc:
        raise BackupError(f"{archive} is not an edgefleet server backup ({exc})") from exc
    if doc.get("format") != FORMAT:
        raise BackupError(f"{archive} has backup format {doc.get('format')!r}; this edgefleet reads format {FORMAT}")
    return BackupInfo(path=archive, created_at=doc["created_at"], migrations=doc["migrations"],
                      counts=doc["counts"], files=doc["files"])


def restore_backup(archive: str | Path, data_dir: str | Path) -> BackupInfo:
    """Unpack a backup into a new (or empty) data dir, checking every file against the manifest.

    Refuses a data dir that holds anything: a restore never mixes with or overwrites live data.
    The files are unpacked beside the data dir and moved into place only when all are verified.
    """
    archive, data_dir = Path(archive), Path(data_dir)
    if data_dir.exists() and (not data_dir.is_dir() or any(data_dir.iterdir())):
        raise BackupError(f"{data_dir} is not empty: restore into a new or empty directory "
                          "(stop the server and move the old data dir aside first)")
    info = read_backup_info(archive)
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{data_dir.name}.restore-", dir=data_dir.parent))
    try:
        seen: dict[str, str] = {}
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar:
                if member.name == MANIFEST:
                    continue
                if not member.isfile() or not _safe_name(member.name):
                    raise BackupError(f"{archive} holds {member.name!r}, which a backup never has: refusing it")
                if member.name not in info.files:
                    raise BackupError(f"{archive} holds {member.name!r}, which its manifest does not list")
                dest = staging / member.name
                dest.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                src = tar.extractfile(member)
                assert src is not None
                h = hashlib.sha256()
                fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "wb") as out:
                    for chunk in iter(functools.partial(src.read, 1 << 20), b""):
                        h.update(chunk)
                        out.write(chunk)
                    out.flush()
                    os.fsync(out.fileno())
                seen[member.name] = h.hexdigest()
        bad = sorted(n for n, digest in info.files.items() if seen.get(n) != digest)
        if bad:
            raise BackupError(f"{archive} is damaged: {bad[:3]} missing or not as backed up; use another backup")
        # Everything private to the server's user, bundles too (devices download them through
        # the server, never from the file system): dirs 0700, files 0600 (written so above).
        for path in [staging, *staging.rglob("*")]:
            if path.is_dir():
                path.chmod(stat.S_IRWXU)
        if data_dir.exists():
            data_dir.rmdir()  # empty, checked above
        os.replace(staging, data_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    info.path = archive
    return info
