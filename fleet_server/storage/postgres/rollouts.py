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
    loads,
    tuples,
    update_row,
    where,
    within,
    within_ids,
)
from fleet_server.storage.postgres.devices import device_terms

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


# Each assigned device's status derived in SQL exactly as `fleet_server.rollouts.device_status`
# derives it in Python (the storage contract tests hold the two to the same answers): rows only
# for devices whose status changes, or which serve the version live uncommitted (probation).
# Every condition is made NOT NULL first, so that NOT means what Python's `not` means.
_STATUS_SQL = """
WITH m AS MATERIALIZED (
    SELECT rd.device, rd.mode, rd.status,
           COALESCE(NULLIF(rd.desired_at, 0), rd.assigned_at) AS since,
           d.status AS online, d.active_version AS a, d.update_state AS s,
           -- The reported state is parsed once, and not at all for a device that runs the
           -- version outside probation (updated, whatever else it reports).
           CASE WHEN d.active_version = %(version)s AND NOT d.update_state = ANY(%(probation)s) THEN NULL
                ELSE d.reported::jsonb END AS r
    FROM rollout_devices rd
    LEFT JOIN devices d ON d.id = rd.device AND d.revoked_at IS NULL AND d.reported IS NOT NULL
    WHERE rd.rollout_id = %(rid)s{only_members}
),
f AS (
    SELECT device, kind, outcome, row_number() OVER (PARTITION BY device ORDER BY seq DESC) AS n
    FROM events WHERE rollout_id = %(rid)s AND version = %(version)s AND kind IN ('outcome', 'refused'){only_events}
),
x AS (
    SELECT m.device, m.mode, m.status, m.since,
           (m.a IS NOT NULL AND m.a = %(version)s) AS on_active,
           COALESCE(m.r ->> 'candidate_version' = %(version)s, FALSE) AS on_version,
           COALESCE(m.s = ANY(%(probation)s), FALSE) AS trial,
           (m.online IS NULL OR m.online <> 'offline') AS up,
           COALESCE(m.s = 'Shadow', FALSE) AS shadowing,
           (COALESCE(m.r ->> 'candidate_version' = %(version)s AND m.s <> 'Idle', FALSE)
            OR COALESCE(m.s = 'Idle' AND m.r -> 'update_retry' = 'true'::jsonb
                        AND m.r ->> 'rollout_id' = %(rid)s, FALSE)) AS trying_again,
           COALESCE(m.r ->> 'rollout_id' = %(rid)s AND m.s = 'Idle'
                    AND m.r ->> 'update_outcome' = ANY(%(failed)s), FALSE) AS failed_now,
           COALESCE(f.kind = 'refused' OR f.outcome = ANY(%(failed)s), FALSE) AS failure
    FROM m LEFT JOIN f ON f.device = m.device AND f.n = 1
),
y AS (
    SELECT device, mode, status, on_version AND trial AS probation,
           CASE
               WHEN on_active AND (NOT (on_version AND trial) OR up) THEN 'updated'
               WHEN NOT on_active AND mode = 'shadow' AND on_version AND shadowing THEN 'updated'
               WHEN NOT trying_again AND (failure OR failed_now) THEN 'failed'
               WHEN %(now)s - since > %(timeout)s THEN 'timed_out'
               ELSE 'pending'
           END AS derived
    FROM x
)
SELECT device, derived, derived = 'updated' AND mode = 'live' AND probation FROM y
WHERE derived <> status OR (derived = 'updated' AND mode = 'live' AND probation)
ORDER BY device
"""


# A pass that looks at some of a rollout's devices names them in one array parameter.
_ONLY_MEMBERS = " AND rd.device = ANY(%(only)s::text[])"


def _told(row: dict[str, Any]) -> dict[str, Any]:
    """A member row with what its device was last told split off into `told` (None: nothing)."""
    told = {k: row.pop(f"told_{k}") for k in ("model", "version", "mode", "rollout_id")}
    told["published_at"] = row.pop("told_at")
    return {**row, "told": told if told["model"] is not None else None}


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

    def rollout_devices(self, rollout_id: str | None = None, *, active: bool = False,
                        devices: Sequence[str] | None = None) -> list[dict[str, Any]]:
        if devices is not None:
            return self._rows("SELECT * FROM rollout_devices WHERE rollout_id = %s AND device = ANY(%s) "
                              "ORDER BY stage, device", [rollout_id, list(devices)])
        clause, params = where(
            ("rd.rollout_id = %s", rollout_id), ("r.state IN ('running', 'paused', 'aborting')", active)
        )
        return self._rows(
            f"SELECT rd.* FROM rollout_devices rd JOIN rollouts r ON r.id = rd.rollout_id{clause} "
            "ORDER BY rd.rollout_id, rd.stage, rd.device",
            params,
        )

    def rollout_assignments(self, rollout_id: str) -> list[tuple[str, int, str, str, float]]:
        with self._transaction() as conn:
            return tuples(conn, "SELECT device, stage, mode, status, COALESCE(NULLIF(desired_at, 0), assigned_at) "
                                "FROM rollout_devices WHERE rollout_id = %s", [rollout_id])

    def device_changes(self, since: int | None) -> tuple[int, list[str]]:
        # One statement, one snapshot: the rows it sees and the oldest transaction it saw running.
        with self._transaction() as conn:
            if since is None:
                # A change number above any transaction id this cluster has given out came with a
                # dump of another cluster: it would name its device at every pass until then.
                conn.execute("UPDATE devices SET change_seq = NULL "
                             "WHERE change_seq >= pg_snapshot_xmax(pg_current_snapshot())")
                row = tuples(conn, "SELECT pg_snapshot_xmin(pg_current_snapshot())::text, ARRAY[]::text[]", [])[0]
            else:
                row = tuples(conn, "SELECT pg_snapshot_xmin(pg_current_snapshot())::text, "
                                   "ARRAY(SELECT id FROM devices WHERE change_seq >= %s::text::xid8)", [str(since)])[0]
        return int(row[0]), list(row[1])

    def set_rollout_device_statuses(self, rollout_id: str, statuses: Sequence[tuple[str, str]], now: float) -> None:
        if not statuses:
            return
        with self._transaction() as conn:
            conn.execute(
                "UPDATE rollout_devices rd SET status = s.status, status_at = %s "
                "FROM unnest(%s::text[], %s::text[]) AS s(device, status) "
                "WHERE rd.rollout_id = %s AND rd.device = s.device",
                [now, [d for d, _ in statuses], [st for _, st in statuses], rollout_id],
            )

    def rollout_devices_to_tell(self, rollout_id: str, model: str, version: str, *,
                                every_reported: bool = False,
                                devices: Sequence[str] | None = None) -> list[dict[str, Any]]:
        rows = self._rows(
            "SELECT rd.*, d.active_version AS active_version, dd.model AS told_model, dd.version AS told_version, "
            "dd.mode AS told_mode, dd.rollout_id AS told_rollout_id, dd.published_at AS told_at "
            "FROM rollout_devices rd "
            "JOIN devices d ON d.id = rd.device AND d.revoked_at IS NULL AND d.reported IS NOT NULL "
            "LEFT JOIN device_desired dd ON dd.device = rd.device "
            f"WHERE rd.rollout_id = %(rid)s{_ONLY_MEMBERS if devices is not None else ''} "
            "AND (%(every)s = 1 OR dd.device IS NULL "
            "OR dd.model IS DISTINCT FROM %(model)s OR dd.version IS DISTINCT FROM %(version)s "
            "OR dd.mode IS DISTINCT FROM rd.mode OR dd.rollout_id IS DISTINCT FROM %(rid)s "
            "OR (rd.previous_version IS NULL AND d.active_version IS NOT NULL AND d.active_version <> %(version)s)) "
            "ORDER BY rd.stage, rd.device",
            {"rid": rollout_id, "model": model, "version": version, "every": int(every_reported),
             "only": list(devices or ())},
        )
        return [_told(r) for r in rows]

    def rollout_status_changes(self, rollout_id: str, version: str, now: float, timeout_s: float, *,
                               failed_outcomes: Sequence[str], probation_states: Sequence[str],
                               devices: Sequence[str] | None = None) -> list[tuple[str, str, bool]]:
        only = devices is not None
        sql = _STATUS_SQL.format(only_members=_ONLY_MEMBERS if only else "",
                                 only_events=" AND device = ANY(%(only)s::text[])" if only else "")
        with self._transaction() as conn:
            return tuples(conn, sql, {  # type: ignore[arg-type]
                "rid": rollout_id, "version": version, "now": float(now), "timeout": float(timeout_s),
                "failed": list(failed_outcomes), "probation": list(probation_states), "only": list(devices or ())})

    def device_ids(self, *, tags: dict[str, str] | None = None) -> list[str]:
        clause, params = where(("revoked_at IS NULL", True), *device_terms(tags, None, None, None, None))
        with self._transaction() as conn:
            return [r[0] for r in tuples(conn, f"SELECT id FROM devices{clause}", params)]

    def device_tag_map(self, devices: Sequence[str] | None = None) -> dict[str, dict[str, str]]:
        clause, params = where(("d.revoked_at IS NULL", True), within_ids("d.id", devices))
        with self._transaction() as conn:
            ids = [r[0] for r in tuples(conn, f"SELECT d.id FROM devices d{clause}", params)]
            rows = tuples(conn, f"SELECT t.device, t.key, t.value FROM device_tags t JOIN devices d ON d.id = t.device"
                                f"{clause}", params)
        out: dict[str, dict[str, str]] = {i: {} for i in ids}
        for device, key, value in rows:
            out[device][key] = value
        return out

    def device_reports(self, devices: Sequence[str]) -> dict[str, dict[str, Any]]:
        with self._transaction() as conn:
            rows = tuples(conn, "SELECT id, status, active_version, reported FROM devices "
                                "WHERE revoked_at IS NULL AND id = ANY(%s)", [list(devices)])
        return {device: {"status": status, "active_version": active, "reported": loads(reported)}
                for device, status, active, reported in rows}

    def devices_without_desired(self) -> list[str]:
        with self._transaction() as conn:
            return [r[0] for r in tuples(
                conn, "SELECT id FROM devices WHERE revoked_at IS NULL AND NOT EXISTS "
                "(SELECT 1 FROM device_desired dd WHERE dd.device = devices.id) ORDER BY id")]

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
