"""Drift buckets and ground-truth feedback: partial rows per batch, summed by readers, compacted."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fleet_server.storage.postgres.connection import (
    COMPACTION_LOCK,
    PostgresConnection,
    decode,
    loads,
    tuples,
    where,
    within,
)
from fleet_server.storage.postgres.ingest import INSERT_BUCKET, bucket_params
from fleet_server.telemetry import ShapeMismatch, sum_rows

_BUCKET_JSON = ("errors", "latency", "features", "prediction")
_BUCKET_COLUMNS = (
    "model", "model_version", "device", "bucket_start", "windows", "predictions", "requests", "errors",
    "latency", "latency_sum_ms", "features", "prediction",
)
_BUCKET_KEY = "model = %s AND model_version = %s AND bucket_start = %s AND device = %s"


def _feedback_dicts(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    for r in decode(rows, "confusion", "error_bins"):
        cal = loads(r.pop("calibration"))
        r["calibration_counts"], r["calibration_hits"], r["calibration_prob_sum"] = cal or (None, None, None)
    return rows


class BucketsMixin(PostgresConnection):
    def compact_buckets(self, before: float, now: float, limit: int = 5000) -> int:
        """Merge the partial rows of buckets that started before `before`; returns rows removed."""
        with self._transaction() as conn:
            # One compaction at a time across nodes: two would both merge the same partial rows.
            conn.execute("SELECT pg_advisory_xact_lock(%s::int, 0)", (COMPACTION_LOCK,))
            keys = tuples(
                conn,
                "SELECT DISTINCT model, model_version, bucket_start, device FROM buckets "
                "WHERE compacted = 0 AND bucket_start < %s LIMIT %s",
                (before, limit),
            )
            removed = 0
            for key in keys:
                rows = decode(
                    conn.execute(f"SELECT {', '.join(_BUCKET_COLUMNS)} FROM buckets WHERE {_BUCKET_KEY}", key).fetchall(),
                    *_BUCKET_JSON,
                )
                try:
                    total = sum_rows(rows)
                except ShapeMismatch:
                    # Counts of an unregistered model that do not line up: keep them apart.
                    conn.execute(f"UPDATE buckets SET compacted = 1 WHERE {_BUCKET_KEY}", key)
                    continue
                conn.execute(f"DELETE FROM buckets WHERE {_BUCKET_KEY}", key)
                model, version, start, device = key
                conn.execute(INSERT_BUCKET, bucket_params(model, version, device, start, total, now, 1))
                removed += len(rows) - 1
            return removed

    def bucket_rows(
        self,
        model: str,
        version: str,
        start: float | None = None,
        end: float | None = None,
        devices: Sequence[str] | None = None,
    ) -> list[dict[str, Any]]:
        if devices is not None and not devices:
            return []
        clause, params = where(
            ("model = %s AND model_version = %s", [model, version]),
            ("bucket_start >= %s", start),
            ("bucket_start < %s", end),
            within("device", devices),
        )
        return decode(self._rows(f"SELECT * FROM buckets{clause} ORDER BY bucket_start, device, id", params),
                      *_BUCKET_JSON)

    def device_bucket_rows(self, device_id: str, start: float | None = None) -> list[dict[str, Any]]:
        clause, params = where(("device = %s", [device_id]), ("bucket_start >= %s", start))
        return decode(self._rows(f"SELECT * FROM buckets{clause} ORDER BY bucket_start, id", params), *_BUCKET_JSON)

    def bucketed_versions(self, since: float | None = None) -> list[dict[str, Any]]:
        clause, params = where(("bucket_start >= %s", since))
        return self._rows(
            "SELECT model, model_version, min(bucket_start) AS first_bucket, max(bucket_start) AS last_bucket, "
            f"count(DISTINCT device) AS devices FROM buckets{clause} "
            "GROUP BY model, model_version ORDER BY model, model_version",
            params,
        )

    def feedback_rows(
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
        return _feedback_dicts(self._rows(f"SELECT * FROM feedback{clause} ORDER BY bucket_start, device, id", params))

    def feedback_since(self, model: str, since: float) -> list[dict[str, Any]]:
        return _feedback_dicts(self._rows("SELECT * FROM feedback WHERE model = %s AND stored_at >= %s", [model, since]))

    def feedback_versions(self) -> list[dict[str, Any]]:
        return self._rows(
            "SELECT model, model_version, min(bucket_start) AS first_bucket, max(bucket_start) AS last_bucket, "
            "count(DISTINCT device) AS devices, sum(joined)::bigint AS labels FROM feedback "
            "GROUP BY model, model_version ORDER BY model, model_version"
        )
