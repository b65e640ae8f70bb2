"""Monitoring sums (label-free estimate, reconstruction errors, refused rows): one partial row per
(model version, device, bucket) and ingest batch, like feedback; readers sum them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import psycopg

from fleet_server.monitoring_sums import MonitoringMismatch, MonitoringSums
from fleet_server.storage.base import Reject
from fleet_server.storage.postgres.connection import PostgresConnection, dumps, loads, where, within
from fleet_server.telemetry import bucket_start

INSERT_MONITORING = (
    "INSERT INTO monitoring(model, model_version, device, bucket_start, stored_at, sums) VALUES (%s,%s,%s,%s,%s,%s)"
)


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
            within("device", devices),
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
