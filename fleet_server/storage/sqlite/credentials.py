"""Device credentials: password rotations (fleet_server.rotation) and the versions a device was
told to take (fleet_server.download_access)."""

from __future__ import annotations

from typing import Any

from fleet_server.storage.sqlite.connection import SqliteConnection, insert_row


class CredentialsMixin(SqliteConnection):
    # ---- password rotations: one row per device, its latest rotation
    def put_rotation(self, device_id: str, rotation_id: str, requested_by: str, now: float, expires_at: float) -> None:
        with self._immediate() as conn:
            insert_row(conn, "device_rotations", {
                "device": device_id, "rotation_id": rotation_id, "requested_by": requested_by,
                "requested_at": now, "expires_at": expires_at,
            }, or_replace=True)

    def get_rotation(self, device_id: str) -> dict[str, Any] | None:
        return self._one("SELECT * FROM device_rotations WHERE device = ?", [device_id])

    def rotations_to_announce(self, now: float) -> list[dict[str, Any]]:
        return self._rows(
            "SELECT * FROM device_rotations WHERE notified_at IS NULL AND confirmed_at IS NULL AND expires_at > ?",
            [now],
        )

    def mark_rotation_notified(self, device_id: str, rotation_id: str, now: float) -> None:
        with self._immediate() as conn:
            conn.execute("UPDATE device_rotations SET notified_at = ? WHERE device = ? AND rotation_id = ?",
                         (now, device_id, rotation_id))

    def issue_rotation(
        self, device_id: str, rotation_id: str, password_hash: str, broker_hash: str, now: float
    ) -> bool:
        with self._immediate() as conn:
            cur = conn.execute(
                "UPDATE device_rotations SET password_hash = ?, broker_hash = ?, issued_at = ? "
                "WHERE device = ? AND rotation_id = ? AND confirmed_at IS NULL",
                (password_hash, broker_hash, now, device_id, rotation_id),
            )
            return cur.rowcount > 0

    def confirm_rotation(self, device_id: str, rotation_id: str, now: float) -> bool:
        """The issued password becomes the device's (registry and broker hash) in one transaction."""
        with self._immediate() as conn:
            row = conn.execute(
                "SELECT password_hash, broker_hash FROM device_rotations WHERE device = ? AND rotation_id = ? "
                "AND confirmed_at IS NULL AND password_hash IS NOT NULL", (device_id, rotation_id),
            ).fetchone()
            if row is None:
                return False
            conn.execute("UPDATE devices SET password_hash = ?, broker_hash = ? WHERE id = ? AND revoked_at IS NULL",
                         (row[0], row[1], device_id))
            # The pending hashes have done their job: keep only when it happened.
            conn.execute("UPDATE device_rotations SET confirmed_at = ?, password_hash = NULL, broker_hash = NULL "
                         "WHERE device = ? AND rotation_id = ?", (now, device_id, rotation_id))
            conn.execute("UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'devices_generation'")
            return True

    # ---- download authorization
    def device_told_versions(self, device_id: str) -> set[tuple[str, str]]:
        """(model, version) pairs the server told this device to take: its desired state, and the
        version and previous version of every rollout it took part in."""
        rows = self._rows(
            "SELECT model, version FROM device_desired WHERE device = :d "
            "UNION SELECT r.model, r.version FROM rollout_devices m JOIN rollouts r ON r.id = m.rollout_id "
            "WHERE m.device = :d "
            "UNION SELECT r.model, m.previous_version FROM rollout_devices m JOIN rollouts r ON r.id = m.rollout_id "
            "WHERE m.device = :d AND m.previous_version IS NOT NULL",
            {"d": device_id},
        )
        return {(r["model"], r["version"]) for r in rows}
