"""Saved device groups: a name and a tag query (fleet_server.device_groups)."""

from __future__ import annotations

from typing import Any

from fleet_server.storage.sqlite.connection import SqliteConnection, insert_row


class GroupsMixin(SqliteConnection):
    def put_device_group(self, row: dict[str, Any]) -> None:
        with self._immediate() as conn:
            insert_row(conn, "device_groups", row, or_replace=True)

    def get_device_group(self, name: str) -> dict[str, Any] | None:
        return self._one("SELECT * FROM device_groups WHERE name = ?", (name,))

    def list_device_groups(self) -> list[dict[str, Any]]:
        return self._rows("SELECT * FROM device_groups ORDER BY name")

    def delete_device_group(self, name: str) -> bool:
        with self._immediate() as conn:
            return conn.execute("DELETE FROM device_groups WHERE name = ?", (name,)).rowcount > 0
