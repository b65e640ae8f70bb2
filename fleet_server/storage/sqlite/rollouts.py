"""Rollout controller state: rollouts (compare-and-set updates), their devices and audit trail,
what each device was last told (`device_desired`) and the fleet's target versions."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import Any

from fleet_server.storage.base import Conflict
from fleet_server.storage.sqlite.connection import (
    IntegrityError,
    SqliteConnection,
    decode,
    dumps,
    insert_row,
    loads,
    update_row,
    where,
    within,
)
from fleet_server.storage.sqlite.devices import device_terms

_ROLLOUT_JSON = ("spec", "gates", "stages", "previous_target")
_CHUNK = 500  # ids per IN (...) list: far below SQLite's limit on bound parameters
_ROLLOUT_DEVICE_COLUMNS = ("rollout_id", "device", "stage", "mode", "previous_version", "assigned_at", "desired_at",
                           "status", "status_at", "live_at")


def _encode(fields: dict[str, Any]) -> dict[str, Any]:
    return {k: dumps(v) if k in _ROLLOUT_JSON and v is not None else v for k, v in fields.items()}


def _audit(conn: sqlite3.Connection, rollout_id: str, entries: Sequence[tuple[str, str, dict[str, Any]]],
           now: float) -> None:
    conn.executemany(
        "INSERT INTO rollout_audit(ts, rollout_id, actor, action, detail) VALUES (?,?,?,?,?)",
        [(now, rollout_id, actor, action, dumps(detail)) for actor, action, detail in entries],
    )


# Each assigned device's status derived in SQL exactly as `fleet_server.rollouts.device_status`
# derives it in Python (the storage contract tests hold the two to the same answers): rows only
# for devices whose status changes, or which serve the version live uncommitted (probation).
# Every condition is NULL-safe (IS, IFNULL), so that NOT means what Python's `not` means, and
# sits in a CASE ... WHEN, which SQLite evaluates lazily: the reported JSON is read only where a
# stored column (active version, update state) leaves the answer open, and its rollout id only
# where the rollout's id appears in the text at all (a substring search costs far less).
_STATUS_SQL = """
WITH f AS (
    SELECT device, kind, outcome, row_number() OVER (PARTITION BY device ORDER BY seq DESC) AS n
    FROM events WHERE rollout_id = :rid AND version = :version AND kind IN ('outcome', 'refused'){only_events}
),
y AS MATERIALIZED (
    SELECT rd.device, rd.status,
        CASE
            WHEN d.active_version IS :version
                 AND (IFNULL(d.update_state, '') NOT IN ({probation}) OR d.status IS NOT 'offline'
                      OR json_extract(d.reported, '$.candidate_version') IS NOT :version)
                THEN 'updated'
            WHEN d.active_version IS NOT :version AND rd.mode IS 'shadow' AND d.update_state IS 'Shadow'
                 AND json_extract(d.reported, '$.candidate_version') IS :version
                THEN 'updated'
            WHEN (f.kind IS 'refused' OR IFNULL(f.outcome, '') IN ({failed})
                  OR (d.update_state IS 'Idle' AND IFNULL(instr(d.reported, :rid), 0) > 0
                      AND json_extract(d.reported, '$.rollout_id') IS :rid
                      AND IFNULL(json_extract(d.reported, '$.update_outcome'), '') IN ({failed})))
                 AND NOT ((d.update_state IS NOT NULL AND d.update_state IS NOT 'Idle'
                           AND json_extract(d.reported, '$.candidate_version') IS :version)
                          OR (d.update_state IS 'Idle' AND IFNULL(instr(d.reported, :rid), 0) > 0
                              AND json_extract(d.reported, '$.rollout_id') IS :rid
                              AND json_type(d.reported, '$.update_retry') IS 'true'))
                THEN 'failed'
            WHEN :now - COALESCE(NULLIF(rd.desired_at, 0), rd.assigned_at) > :timeout THEN 'timed_out'
            ELSE 'pending'
        END AS derived,
        CASE
            WHEN rd.mode IS 'live' AND IFNULL(d.update_state, '') IN ({probation})
                 AND json_extract(d.reported, '$.candidate_version') IS :version THEN 1
            ELSE 0
        END AS probation
    FROM rollout_devices rd
    LEFT JOIN devices d ON d.id = rd.device AND d.revoked_at IS NULL AND d.reported IS NOT NULL
    LEFT JOIN f ON f.device = rd.device AND f.n = 1
    WHERE rd.rollout_id = :rid{only_members}
)
SELECT device, derived, derived = 'updated' AND probation FROM y
WHERE derived <> status OR (derived = 'updated' AND probation)
ORDER BY device
"""


# A pass that looks at some of a rollout's devices names them in one JSON parameter.
_ONLY_MEMBERS = " AND rd.device IN (SELECT value FROM json_each(:only))"


def _told(row: dict[str, Any]) -> dict[str, Any]:
    """A member row with what its device was last told split off into `told` (None: nothing)."""
    told = {k: row.pop(f"told_{k}") for k in ("model", "version", "mode", "rollout_id")}
    told["published_at"] = row.pop("told_at")
    return {**row, "told": told if told["model"] is not None else None}


class RolloutsMixin(SqliteConnection):
    def insert_rollout(self, row: dict[str, Any], audit: tuple[str, str, dict[str, Any]]) -> None:
        with self._immediate() as conn:
            try:
                insert_row(conn, "rollouts", _encode(row))
            except IntegrityError as exc:
                raise Conflict(f"rollout {row['id']!r} already exists") from exc
            _audit(conn, row["id"], [audit], row["created_at"])

    def get_rollout(self, rollout_id: str) -> dict[str, Any] | None:
        rows = decode(self._rows("SELECT * FROM rollouts WHERE id = ?", [rollout_id]), *_ROLLOUT_JSON)
        return rows[0] if rows else None

    def list_rollouts(self, *, states: Sequence[str] | None = None, limit: int = 100) -> list[dict[str, Any]]:
        if states is not None and not states:
            return []
        clause, params = where(within("state", states))
        rows = self._rows(f"SELECT * FROM rollouts{clause} ORDER BY created_at DESC, id LIMIT ?", [*params, limit])
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
        with self._immediate() as conn:
            if not update_row(conn, "rollouts", {**_encode(fields), "updated_at": now},
                              {"id": rollout_id, **(expect or {})}):
                return False
            _audit(conn, rollout_id, audit, now)
            return True

    def rollout_devices(self, rollout_id: str | None = None, *, active: bool = False,
                        devices: Sequence[str] | None = None) -> list[dict[str, Any]]:
        if devices is not None:
            return [r for start in range(0, len(devices), _CHUNK) for r in self._rows(
                f"SELECT * FROM rollout_devices WHERE rollout_id = ? AND device IN "
                f"({','.join('?' * len(devices[start:start + _CHUNK]))}) ORDER BY stage, device",
                [rollout_id, *devices[start:start + _CHUNK]])]
        clause, params = where(
            ("rd.rollout_id = ?", rollout_id), ("r.state IN ('running', 'paused', 'aborting')", active)
        )
        return self._rows(
            f"SELECT rd.* FROM rollout_devices rd JOIN rollouts r ON r.id = rd.rollout_id{clause} "
            "ORDER BY rd.rollout_id, rd.stage, rd.device",
            params,
        )

    def rollout_assignments(self, rollout_id: str) -> list[tuple[str, int, str, str, float]]:
        return self.db.conn.execute(
            "SELECT device, stage, mode, status, COALESCE(NULLIF(desired_at, 0), assigned_at) "
            "FROM rollout_devices WHERE rollout_id = ?", (rollout_id,)
        ).fetchall()

    def device_changes(self, since: int | None) -> tuple[int, list[str]]:
        if since is None:
            return int(self._scalar("SELECT IFNULL(MAX(change_seq), 0) FROM devices")), []
        rows = self.db.conn.execute("SELECT id, change_seq FROM devices WHERE change_seq > ?", (since,)).fetchall()
        return max([since, *(seq for _, seq in rows)]), [device for device, _ in rows]

    def set_rollout_device_statuses(self, rollout_id: str, statuses: Sequence[tuple[str, str]], now: float) -> None:
        if not statuses:
            return
        with self._immediate() as conn:
            conn.executemany(
                "UPDATE rollout_devices SET status = ?, status_at = ? WHERE rollout_id = ? AND device = ?",
                [(status, now, rollout_id, device) for device, status in statuses],
            )

    def rollout_devices_to_tell(self, rollout_id: str, model: str, version: str, *,
                                every_reported: bool = False,
                                devices: Sequence[str] | None = None) -> list[dict[str, Any]]:
        rows = self._rows(
            "SELECT rd.*, d.active_version AS active_version, dd.model AS told_model, dd.version AS told_version, "
            "dd.mode AS told_mode, dd.rollout_id AS told_rollout_id, dd.published_at AS told_at "
            # CROSS JOIN keeps this loop order: a device told the version already, with its
            # previous version known, is passed over without reading its devices row.
            "FROM rollout_devices rd LEFT JOIN device_desired dd ON dd.device = rd.device CROSS JOIN devices d "
            f"WHERE rd.rollout_id = :rid{_ONLY_MEMBERS if devices is not None else ''} "
            "AND (:every OR dd.device IS NULL OR dd.model IS NOT :model "
            "OR dd.version IS NOT :version OR dd.mode IS NOT rd.mode OR dd.rollout_id IS NOT :rid "
            "OR rd.previous_version IS NULL) "
            "AND d.id = rd.device AND d.revoked_at IS NULL AND d.reported IS NOT NULL "
            "AND (:every OR dd.device IS NULL OR dd.model IS NOT :model "
            "OR dd.version IS NOT :version OR dd.mode IS NOT rd.mode OR dd.rollout_id IS NOT :rid "
            "OR (rd.previous_version IS NULL AND d.active_version IS NOT NULL AND d.active_version <> :version)) "
            "ORDER BY rd.stage, rd.device",
            {"rid": rollout_id, "model": model, "version": version, "every": int(every_reported),
             "only": dumps(list(devices or ()))},
        )
        return [_told(r) for r in rows]

    def rollout_status_changes(self, rollout_id: str, version: str, now: float, timeout_s: float, *,
                               failed_outcomes: Sequence[str], probation_states: Sequence[str],
                               devices: Sequence[str] | None = None) -> list[tuple[str, str, bool]]:
        failed = {f"f{i}": v for i, v in enumerate(failed_outcomes)}
        probation = {f"p{i}": v for i, v in enumerate(probation_states)}
        only = devices is not None
        sql = _STATUS_SQL.format(failed=",".join(f":{k}" for k in failed) or "NULL",
                                 probation=",".join(f":{k}" for k in probation) or "NULL",
                                 only_events=" AND device IN (SELECT value FROM json_each(:only))" if only else "",
                                 only_members=_ONLY_MEMBERS if only else "")
        rows = self.db.conn.execute(sql, {"rid": rollout_id, "version": version, "now": now, "timeout": timeout_s,
                                          "only": dumps(list(devices or ())), **failed, **probation}).fetchall()
        return [(device, status, bool(probation_flag)) for device, status, probation_flag in rows]

    def device_ids(self, *, tags: dict[str, str] | None = None) -> list[str]:
        clause, params = where(("revoked_at IS NULL", True), *device_terms(tags, None, None, None, None))
        return [r[0] for r in self.db.conn.execute(f"SELECT id FROM devices{clause}", params)]

    def device_tag_map(self, devices: Sequence[str] | None = None) -> dict[str, dict[str, str]]:
        if devices is None:
            ids = self.device_ids()
            rows = self.db.conn.execute(
                "SELECT t.device, t.key, t.value FROM device_tags t JOIN devices d ON d.id = t.device "
                "WHERE d.revoked_at IS NULL").fetchall()
        else:
            ids, rows = [], []
            for start in range(0, len(devices), _CHUNK):
                chunk = list(devices[start:start + _CHUNK])
                marks = ",".join("?" * len(chunk))
                ids += [r[0] for r in self.db.conn.execute(
                    f"SELECT id FROM devices WHERE revoked_at IS NULL AND id IN ({marks})", chunk)]
                rows += self.db.conn.execute(
                    f"SELECT device, key, value FROM device_tags WHERE device IN ({marks})", chunk).fetchall()
        out: dict[str, dict[str, str]] = {i: {} for i in ids}
        for device, key, value in rows:
            if device in out:
                out[device][key] = value
        return out

    def device_reports(self, devices: Sequence[str]) -> dict[str, dict[str, Any]]:
        out = {}
        for start in range(0, len(devices), _CHUNK):
            chunk = list(devices[start:start + _CHUNK])
            for device, status, active, reported in self.db.conn.execute(
                    f"SELECT id, status, active_version, reported FROM devices WHERE revoked_at IS NULL AND id IN "
                    f"({','.join('?' * len(chunk))})", chunk):
                out[device] = {"status": status, "active_version": active, "reported": loads(reported)}
        return out

    def devices_without_desired(self) -> list[str]:
        return [r[0] for r in self.db.conn.execute(
            "SELECT id FROM devices WHERE revoked_at IS NULL AND NOT EXISTS "
            "(SELECT 1 FROM device_desired dd WHERE dd.device = devices.id) ORDER BY id")]

    def put_rollout_devices(self, rows: Sequence[dict[str, Any]]) -> None:
        if not rows:
            return
        cols = _ROLLOUT_DEVICE_COLUMNS
        with self._immediate() as conn:
            conn.executemany(
                f"INSERT OR REPLACE INTO rollout_devices({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
                [tuple(r.get(c) for c in cols) for r in rows],
            )

    def add_rollout_audit(self, rollout_id: str, actor: str, action: str, detail: dict[str, Any], now: float) -> None:
        with self._immediate() as conn:
            _audit(conn, rollout_id, [(actor, action, detail)], now)

    def rollout_audit(self, rollout_id: str, limit: int = 1000) -> list[dict[str, Any]]:
        rows = self._rows(
            "SELECT ts, rollout_id, actor, action, detail FROM rollout_audit WHERE rollout_id = ? ORDER BY id LIMIT ?",
            [rollout_id, limit],
        )
        return decode(rows, "detail")

    def device_desired(self) -> dict[str, dict[str, Any]]:
        return {r["device"]: r for r in self._rows("SELECT * FROM device_desired")}

    def put_device_desired(self, device_id: str, row: dict[str, Any]) -> None:
        with self._immediate() as conn:
            insert_row(conn, "device_desired", {
                "device": device_id, "model": row["model"], "version": row["version"], "mode": row["mode"],
                "rollout_id": row.get("rollout_id"), "allow_downgrade": int(bool(row.get("allow_downgrade"))),
                "published_at": row["published_at"],
            }, or_replace=True)

    def fleet_targets(self) -> list[dict[str, Any]]:
        return decode(self._rows("SELECT * FROM fleet_targets ORDER BY updated_at"), "target")

    def set_fleet_target(
        self, model: str, target: dict[str, Any], version: str | None, rollout_id: str | None, now: float
    ) -> None:
        key = dumps(target)
        with self._immediate() as conn:
            if version is None:
                conn.execute("DELETE FROM fleet_targets WHERE model = ? AND target = ?", (model, key))
            else:
                insert_row(conn, "fleet_targets", {"model": model, "target": key, "version": version,
                                                   "rollout_id": rollout_id, "updated_at": now}, or_replace=True)

    def rollout_events(self, rollout_id: str, since: float = 0.0) -> list[dict[str, Any]]:
        return self._rows(
            "SELECT * FROM events WHERE rollout_id = ? AND stored_at >= ? ORDER BY device, seq",
            [rollout_id, since],
        )
