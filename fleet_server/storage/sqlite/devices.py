"""Devices: the registry rows, their tags, and the broker accounts derived from them."""

from __future__ import annotations

import sqlite3
from typing import Any

from fleet_server.storage.base import Conflict
from fleet_server.storage.sqlite.connection import IntegrityError, SqliteConnection, loads, where


def device_terms(
    tags: dict[str, str] | None,
    model_version: str | None,
    status: str | None,
    seen_after: float | None,
    seen_before: float | None,
) -> list[tuple[str, Any]]:
    """The `where` terms of the device filters that listing and searching devices share."""
    return [
        *(
            (f"EXISTS (SELECT 1 FROM device_tags t{i} WHERE t{i}.device = devices.id "
             f"AND t{i}.key = ? AND t{i}.value = ?)", [k, v])
            for i, (k, v) in enumerate((tags or {}).items())
        ),
        ("active_version = ?", model_version),
        ("status = ?", status),
        ("last_seen >= ?", seen_after),
        ("(last_seen IS NULL OR last_seen < ?)", seen_before),
    ]


class DevicesMixin(SqliteConnection):
    def _bump_devices_generation(self, conn: sqlite3.Connection) -> None:
        conn.execute(
            "UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'devices_generation'"
        )

    def insert_device(
        self, device_id: str, fleet: str, tags: dict[str, str], password_hash: str, broker_hash: str, now: float
    ) -> None:
        with self._immediate() as conn:
            try:
                conn.execute(
                    "INSERT INTO devices(id, fleet, created_at, password_hash, broker_hash) VALUES (?,?,?,?,?)",
                    (device_id, fleet, now, password_hash, broker_hash),
                )
            except IntegrityError as exc:
                raise Conflict(f"device {device_id!r} already exists") from exc
            conn.executemany(
                "INSERT INTO device_tags(device, key, value) VALUES (?,?,?)",
                [(device_id, k, v) for k, v in tags.items()],
            )
            self._bump_devices_generation(conn)

    def set_device_tags(self, device_id: str, tags: dict[str, str]) -> bool:
        with self._immediate() as conn:
            if conn.execute("SELECT 1 FROM devices WHERE id = ?", (device_id,)).fetchone() is None:
                return False
            conn.execute("DELETE FROM device_tags WHERE device = ?", (device_id,))
            conn.executemany(
                "INSERT INTO device_tags(device, key, value) VALUES (?,?,?)",
                [(device_id, k, v) for k, v in tags.items()],
            )
            return True

    def _device_dict(self, row: dict[str, Any], tags: dict[str, str]) -> dict[str, Any]:
        out = {k: v for k, v in row.items() if k not in ("password_hash", "broker_hash", "change_seq")}
        out["reported"] = loads(row["reported"])
        out["tags"] = tags
        return out

    def _tags_for(self, ids: list[str]) -> dict[str, dict[str, str]]:
        out: dict[str, dict[str, str]] = {i: {} for i in ids}
        for chunk_start in range(0, len(ids), 500):
            chunk = ids[chunk_start : chunk_start + 500]
            marks = ",".join("?" * len(chunk))
            for r in self._rows(f"SELECT device, key, value FROM device_tags WHERE device IN ({marks})", chunk):
                out[r["device"]][r["key"]] = r["value"]
        return out

    def _device_dicts(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        tags_by = self._tags_for([r["id"] for r in rows])
        return [self._device_dict(r, tags_by[r["id"]]) for r in rows]

    def get_device(self, device_id: str) -> dict[str, Any] | None:
        row = self._one("SELECT * FROM devices WHERE id = ?", [device_id])
        return self._device_dicts([row])[0] if row else None

    def list_devices(
        self,
        *,
        tags: dict[str, str] | None = None,
        model_version: str | None = None,
        status: str | None = None,
        seen_after: float | None = None,
        seen_before: float | None = None,
        include_revoked: bool = False,
        limit: int = 1000,
        offset: int = 0,
    ) -> list[dict[str, Any]]:
        clause, params = where(
            ("revoked_at IS NULL", not include_revoked),
            *device_terms(tags, model_version, status, seen_after, seen_before),
        )
        rows = self._rows(f"SELECT * FROM devices{clause} ORDER BY id LIMIT ? OFFSET ?", [*params, limit, offset])
        return self._device_dicts(rows)

    def revoke_device(self, device_id: str, now: float) -> bool:
        with self._immediate() as conn:
            cur = conn.execute(
                "UPDATE devices SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL", (now, device_id)
            )
            if cur.rowcount:
                self._bump_devices_generation(conn)
            return cur.rowcount > 0

    def device_password_hash(self, device_id: str) -> str | None:
        return self._scalar("SELECT password_hash FROM devices WHERE id = ? AND revoked_at IS NULL", [device_id])

    def broker_accounts(self) -> list[tuple[str, str]]:
        rows = self._rows("SELECT id, broker_hash FROM devices WHERE revoked_at IS NULL ORDER BY id")
        return [(r["id"], r["broker_hash"]) for r in rows]

    def active_device_ids(self) -> set[str]:
        return {r["id"] for r in self._rows("SELECT id FROM devices WHERE revoked_at IS NULL")}

    def devices_generation(self) -> int:
        value = self._scalar("SELECT value FROM meta WHERE key = 'devices_generation'")
        return int(value) if value is not None else 0
