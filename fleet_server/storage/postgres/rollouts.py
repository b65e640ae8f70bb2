"""Rollout controller state: rollouts (compare-and-set updates), their devices and audit trail,
what each device was last told (`device_desired`) and the fleet's target versions."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import psycopg

from fleet_server.storage.base import Conflict
from fleet_server.storage.postgres.connection import (
    IntegrityError,
    PostgresConnection,
    decode,
    dumps,
    insert_row,
    update_row,
    where,
    within,
)

_ROLLOUT_JSON = ("spec", "gates", "stages", "previous_target")
_ROLLOUT_DEVICE_COLUMNS = ("rollout_id", "device", "stage", "mode", "previous_version", "assigned_at", "desired_at",
                           "status", "status_at", "live_at")


def _encode(fields: dict[str, Any]) -> dict[str, Any]:
    return {k: dumps(v) if k in _ROLLOUT_JSON and v is not None else v for k, v in fields.items()}


def _audit(conn: psycopg.Connection, rollout_id: str, entries: Sequence[tuple[str, str, dict[str, Any]]],
           now: float) -> None:
    conn.cursor().executemany(
        "INSERT INTO rollout_audit(ts, rollout_id, actor, action, detail) VALUES (%s,%s,%s,%s,%s)",
        [(now, rollout_id, actor, action, dumps(detail)) for actor, action, detail in entries],
    )


class RolloutsMixin(PostgresConnection):
    def insert_rollout(self, row: dict[str, Any], audit: tuple[str, str, dict[str, Any]]) -> None:
        with self._transaction() as conn:
            try:
                insert_row(conn, "rollouts", _encode(row))
            except IntegrityError as exc:
                raise Conflict(f"rollout {row['id']!r} already exists") from exc
            _audit(conn, row["id"], [audit], row["created_at"])

    def get_rollout(self, rollout_id: str) -> dict[str, Any] | None:
        rows = decode(self._rows("SELECT * FROM rollouts WHERE id = %s", [rollout_id]), *_ROLLOUT_JSON)
        return rows[0] if rows else None

    def list_rollouts(self, *, states: Sequence[str] | None = None, limit: int = 100) -> list[dict[str, Any]]:
        if states is not None and not states:
            return []
        clause, params = where(within("state", states))
        rows = self._rows(f"SELECT * FROM rollouts{clause} ORDER BY created_at DESC, id LIMIT %s", [*params, limit])
        return decode(rows, *_ROLLOUT_JSON)

    def update_rollout(
        self,
        rollout_id: str,
        fields: dict[str, Any],
        now: float,
        *,
        expect: dict[str, Any] | None = None,
        audit: Sequence[tuple[str, str, dict[str, Any]]] = (),
    ) -> bool:
        """Set fields (and updated_at) only if the row still has the `expect`ed values; with the
        audit entries in the same transaction. False when someone else changed it first."""
        with self._transaction() as conn:
            if not update_row(conn, "rollouts", {**_encode(fields), "updated_at": now},
                              {"id": rollout_id, **(expect or {})}):
                return False
            _audit(conn, rollout_id, audit, now)
            return True

    def rollout_devices(self, rollout_id: str | None = None, *, active: bool = False) -> list[dict[str, Any]]:
        clause, params = where(
            ("rd.rollout_id = %s", rollout_id), ("r.state IN ('running', 'paused', 'aborting')", active)
        )
        return self._rows(
            f"SELECT rd.* FROM rollout_devices rd JOIN rollouts r ON r.id = rd.rollout_id{clause} "
            "ORDER BY rd.rollout_id, rd.stage, rd.device",
            params,
        )

    def put_rollout_devices(self, rows: Sequence[dict[str, Any]]) -> None:
        if not rows:
            return
        cols = _ROLLOUT_DEVICE_COLUMNS
        with self._transaction() as conn:
            conn.cursor().executemany(
                f"INSERT INTO rollout_devices({', '.join(cols)}) VALUES ({', '.join(['%s'] * len(cols))}) "
                "ON CONFLICT (rollout_id, device) DO UPDATE SET "
                + ", ".join(f"{c} = excluded.{c}" for c in cols[2:]),
                # SQLite's INSERT OR REPLACE puts a NOT NULL column's default in place of a NULL.
                [tuple(r.get(c) if r.get(c) is not None or c != "status" else "pending" for c in cols)
                 for r in rows],
            )

    def add_rollout_audit(self, rollout_id: str, actor: str, action: str, detail: dict[str, Any], now: float) -> None:
        with self._transaction() as conn:
            _audit(conn, rollout_id, [(actor, action, detail)], now)

    def rollout_audit(self, rollout_id: str, limit: int = 1000) -> list[dict[str, Any]]:
        rows = self._rows(
            "SELECT ts, rollout_id, actor, action, detail FROM rollout_audit WHERE rollout_id = %s ORDER BY id LIMIT %s",
            [rollout_id, limit],
        )
        return decode(rows, "detail")

    def device_desired(self) -> dict[str, dict[str, Any]]:
        return {r["device"]: r for r in self._rows("SELECT * FROM device_desired")}

    def put_device_desired(self, device_id: str, row: dict[str, Any]) -> None:
        with self._transaction() as conn:
            insert_row(conn, "device_desired", {
                "device": device_id, "model": row["model"], "version": row["version"], "mode": row["mode"],
                "rollout_id": row.get("rollout_id"), "allow_downgrade": int(bool(row.get("allow_downgrade"))),
                "published_at": row["published_at"],
            }, key=("device",))

    def fleet_targets(self) -> list[dict[str, Any]]:
        return decode(self._rows("SELECT * FROM fleet_targets ORDER BY updated_at"), "target")

    def set_fleet_target(
        self, model: str, target: dict[str, Any], version: str | None, rollout_id: str | None, now: float
    ) -> None:
        key = dumps(target)
        with self._transaction() as conn:
            if version is None:
                conn.execute("DELETE FROM fleet_targets WHERE model = %s AND target = %s", (model, key))
            else:
                insert_row(conn, "fleet_targets", {"model": model, "target": key, "version": version,
                                                   "rollout_id": rollout_id, "updated_at": now}, key=("model", "target"))

    def rollout_events(self, rollout_id: str, since: float = 0.0) -> list[dict[str, Any]]:
        return self._rows(
            "SELECT * FROM events WHERE rollout_id = %s AND stored_at >= %s ORDER BY device, seq",
            [rollout_id, since],
        )
