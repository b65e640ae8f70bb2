"""The data dir: layout, atomic JSON writes, installed versions, and version ordering.

Every file the agent writes lives under `data_dir`; every state file is replaced atomically
(temp file, fsync, rename, fsync dir), so a power cut leaves the old or the new file, never half.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

# Version strings become directory names: keep them to a safe alphabet.
SAFE_VERSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$")


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Replace `path` with `data`, or leave it as it was: on a full disk the temp file is removed
    (it would hold the last free blocks) and the OSError raised (`is_disk_full` tells it apart)."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


def is_disk_full(exc: BaseException) -> bool:
    """Whether an error means the disk (or the user's quota) is full, from the OS or SQLite."""
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    name = getattr(exc, "sqlite_errorname", "") or ""
    return name.startswith("SQLITE_FULL") or "disk is full" in str(exc).lower()


def free_bytes(path: Path) -> int:
    """Bytes free for this process in the file system holding `path` (0 if it cannot be read)."""
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return 0


class DiskFullError(OSError):
    """A write did not fit: `free` bytes were free and `needed` were needed (approximately, for
    writes whose size is only known afterwards)."""

    def __init__(self, what: str, free: int, needed: int) -> None:
        super().__init__(errno.ENOSPC, f"disk full: {what} needs {needed} bytes, {free} are free")
        self.what = what
        self.free = free
        self.needed = needed


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return None  # a torn or edited file: treated as absent, the agent falls back safely


def version_key(version: str) -> tuple:
    """Order versions sensibly: 1.10 > 1.9, 2.0 > 2.0rc1, 2024-05-02 > 2024-05-01."""
    v = version.strip().lower().lstrip("v")
    key: list[tuple] = []
    for num, text in re.findall(r"(\d+)|([a-z]+)", v):
        key.append((1, int(num)) if num else (0, text))
    key.append((0.5, ""))  # end of version: after a pre-release tag, before any further number
    return tuple(key)


def is_downgrade(candidate: str, active: str | None) -> bool:
    return active is not None and version_key(candidate) < version_key(active)


class DataDir:
    """Paths of one agent's data dir."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.versions = self.root / "versions"
        self.downloads = self.root / "downloads"
        self.state_file = self.root / "state.json"  # committed active / previous versions
        self.update_file = self.root / "update.json"  # the update machine's saved state
        # issued_at and digest of the last signed desired accepted (replays of older ones are refused)
        self.desired_file = self.root / "desired.json"
        self.outbox_file = self.root / "outbox.sqlite3"

    def create(self) -> DataDir:
        for d in (self.root, self.versions, self.downloads):
            d.mkdir(parents=True, exist_ok=True)
        return self

    def version_dir(self, version: str) -> Path:
        if not SAFE_VERSION.match(version):
            raise ValueError(f"version {version!r} is not a safe name")
        return self.versions / version

    def installed(self) -> list[str]:
        return sorted(
            (p.name for p in self.versions.iterdir() if p.is_dir() and not p.name.startswith(".")),
            key=version_key,
        )

    def committed(self) -> tuple[str | None, str | None]:
        state = read_json(self.state_file) or {}
        return state.get("active"), state.get("previous")

    def commit(self, active: str | None, previous: str | None) -> None:
        atomic_write_bytes(
            self.state_file, json.dumps({"active": active, "previous": previous}).encode()
        )

    def remove_version(self, version: str) -> None:
        shutil.rmtree(self.version_dir(version), ignore_errors=True)

    def prune(self, keep: set[str]) -> None:
        """Remove installed versions not in `keep`, and leftover temp dirs."""
        for p in self.versions.iterdir():
            if p.name.startswith(".") or (p.is_dir() and p.name not in keep):
                shutil.rmtree(p, ignore_errors=True)
