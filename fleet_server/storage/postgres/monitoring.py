"""Monitoring sums (label-free estimate, reconstruction errors, refused rows): one partial row per
(model version, device, bucket) and ingest batch, like feedback; readers sum them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import psycopg

from fleet_server.monitoring_sums import MonitoringMismatch, MonitoringSums, merge_monitoring_rows
from fleet_server.storage.base import Reject
from fleet_server.storage.postgres.connection import (
    COMPACTION_LOCK,
    PostgresConnection,
    dumps,
    loads,
    tuples,
    where,
    within_ids,
)
from fleet_server.telemetry import bucket_start

INSERT_MONITORING = (
    "INSERT INTO monitoring(model, model_version, device, bucket_start, stored_at, sums) VALUES (%s,%s,%s,%s,%s,%s)"
)
_PERIOD_KEY = "model = %s AND model_version = %s AND device = %s AND bucket_start >= %s AND bucket_start < %s"
_BUCKET_KEY = "model = %s AND model_version = %s AND device = %s AND bucket_start = %s"


def store_monitoring(conn: psycopg.Connection, windows: list, bucket_s: float, now: float) -> list[Reject]:
    """Sum the monitoring blocks of freshly stored windows per (model, version, bucket, device);
    windows without any cost one attribute test. Returns blocks that did not line up."""
    groups: dict[tuple[str, str, float, str], MonitoringSums] = {}
    rejects: list[Reject] = []
    for w in windows:
        if w.estimate is None and w.multivariate is None and w.refused is None:
            continue
        key = (w.model or "", w.model_version or "", bucket_start(w, bucket_s), w.device)
        try:
            sums = MonitoringSums.of_window(w)
            if sums is not None:
                groups.setdefault(key, MonitoringSums()).add(sums)
        except MonitoringMismatch as exc:
            rejects.append(Reject("monitoring_mismatch", w.device, str(exc)))
    if groups:
        conn.cursor().executemany(INSERT_MONITORING, [
            (model, version, device, start, now, dumps(s.to_row()))
            for (model, version, start, device), s in groups.items()
        ])
    return rejects


def _merge(conn: psycopg.Connection, key_sql: str, params: tuple, into: tuple[str, str, str, float]) -> int:
    """Replace the rows matching `key_sql` by their exact sum, one row at `into` (model, version,
    device, bucket start) stored at the newest of their times; 1 if merged, 0 when the rows do not
    line up (kept as they are)."""
    rows = tuples(conn, f"SELECT id, stored_at, sums FROM monitoring WHERE {key_sql} ORDER BY bucket_start, id", params)
    total = merge_monitoring_rows([loads(sums) or {} for _, _, sums in rows])
    if total is None or not rows:
        return 0
    # Exactly the rows summed: one committed by another process since the SELECT stays for next time.
    conn.execute("DELETE FROM monitoring WHERE id = ANY(%s)", ([i for i, _, _ in rows],))
    conn.execute(INSERT_MONITORING, (*into, max(at for _, at, _ in rows), dumps(total.to_row())))
    return 1


def _dicts(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    for r in rows:
        r.update(loads(r.pop("sums")) or {})
    return rows


class MonitoringMixin(PostgresConnection):
    def monitoring_rows(
        self,
        model: str,
        version: str | None = None,
        start: float | None = None,
        end: float | None = None,
        devices: Sequence[str] | None = None,
    ) -> list[dict[str, Any]]:
        if devices is not None and not devices:
            return []
        clause, params = where(
            ("model = %s", [model]),
            ("model_version = %s", version),
            ("bucket_start >= %s", start),
            ("bucket_start < %s", end),
            within_ids("device", devices),
        )
        return _dicts(self._rows(f"SELECT * FROM monitoring{clause} ORDER BY bucket_start, device, id", params))

    def monitoring_since(self, model: str, since: float) -> list[dict[str, Any]]:
        return _dicts(self._rows("SELECT * FROM monitoring WHERE model = %s AND stored_at >= %s", [model, since]))

    def monitoring_versions(self) -> list[dict[str, Any]]:
        return self._rows(
            "SELECT model, model_version, min(bucket_start) AS first_bucket, max(bucket_start) AS last_bucket, "
            "count(DISTINCT device) AS devices FROM monitoring GROUP BY model, model_version "
            "ORDER BY model, model_version"
        )

    # ---- bounded growth (fleet_server.retention), as feedback: old rows one per device and day
    def compact_monitoring(self, before: float, settled_before: float, limit: int = 2000) -> int:
        """Merge the partial rows of each (model, version, bucket, device) whose bucket started
        before `before` and whose rows were all stored before `settled_before` (rollout gates read
        recent rows by stored_at); returns the buckets merged."""
        with self._transaction() as conn:
            conn.execute("SELECT pg_advisory_xact_lock(%s::int, 1)", (COMPACTION_LOCK,))
            keys = tuples(
                conn,
                "SELECT model, model_version, device, bucket_start FROM monitoring WHERE bucket_start < %s "
                "GROUP BY model, model_version, bucket_start, device HAVING count(*) > 1 AND max(stored_at) < %s "
                "LIMIT %s", (before, settled_before, limit),
            )
            return sum(_merge(conn, _BUCKET_KEY, tuple(key), tuple(key)) for key in keys)

    def rollup_monitoring(self, before: float, period_s: float, limit: int = 2000) -> int:
        """Roll monitoring rows of buckets started before `before` up into one row per (model,
        version, device, `period_s` period) at the period's start; returns the period rows written
        (0 when nothing is left to roll up; rows that do not line up stay as they are)."""
        with self._transaction() as conn:
            # the same lock as rollup_history: one node rolls up at a time
            conn.execute("SELECT pg_advisory_xact_lock(%s::int, 2)", (COMPACTION_LOCK,))
            groups = tuples(
                conn,
                "SELECT model, model_version, device, floor(bucket_start / %s) * %s AS period FROM monitoring "
                "WHERE bucket_start < %s GROUP BY 1, 2, 3, 4 "
                "HAVING count(*) > 1 OR min(bucket_start) <> floor(min(bucket_start) / %s) * %s LIMIT %s",
                (period_s, period_s, before, period_s, period_s, limit),
            )
            return sum(_merge(conn, _PERIOD_KEY, (model, version, device, float(period), float(period) + period_s),
                              (model, version, device, float(period)))
                       for model, version, device, period in groups)

    def purge_monitoring(self, before: float, limit: int = 5000) -> int:
        """Delete monitoring rows of buckets that started before `before`; returns rows deleted."""
        with self._transaction() as conn:
            return conn.execute(
                "DELETE FROM monitoring WHERE id IN (SELECT id FROM monitoring WHERE bucket_start < %s LIMIT %s)",
                (before, limit),
            ).rowcount
