"""Drift buckets and ground-truth feedback: partial rows per batch, summed by readers, compacted."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fleet_server.performance import FeedbackMismatch, sum_feedback_rows
from fleet_server.storage.postgres.connection import (
    COMPACTION_LOCK,
    PostgresConnection,
    decode,
    loads,
    tuples,
    where,
    within_ids,
)
from fleet_server.storage.postgres.ingest import (
    INSERT_BUCKET,
    INSERT_FEEDBACK,
    bucket_params,
    feedback_params,
)
from fleet_server.telemetry import ShapeMismatch, sum_rows

_BUCKET_JSON = ("errors", "latency", "features", "prediction")
_BUCKET_COLUMNS = (
    "model", "model_version", "device", "bucket_start", "windows", "predictions", "requests", "errors",
    "latency", "latency_sum_ms", "features", "prediction",
)
_BUCKET_KEY = "model = %s AND model_version = %s AND bucket_start = %s AND device = %s"
_PERIOD_KEY = "model = %s AND model_version = %s AND device = %s AND bucket_start >= %s AND bucket_start < %s"


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
                    conn.execute(f"SELECT id, {', '.join(_BUCKET_COLUMNS)} FROM buckets WHERE {_BUCKET_KEY}",
                                 key).fetchall(),
                    *_BUCKET_JSON,
                )
                ids = [r.pop("id") for r in rows]
                try:
                    total = sum_rows(rows)
                except ShapeMismatch:
                    # Counts of an unregistered model that do not line up: keep them apart.
                    conn.execute("UPDATE buckets SET compacted = 1 WHERE id = ANY(%s)", (ids,))
                    continue
                # Exactly the rows summed: a late window another ingest process committed since the
                # SELECT (READ COMMITTED) matches the key too, and must stay to be merged next time.
                conn.execute("DELETE FROM buckets WHERE id = ANY(%s)", (ids,))
                model, version, start, device = key
                conn.execute(INSERT_BUCKET, bucket_params(model, version, device, start, total, now, 1))
                removed += len(rows) - 1
            return removed

    # ---- bounded growth: merge feedback like buckets, roll old rows up, delete the oldest
    def compact_feedback(self, before: float, settled_before: float, limit: int = 2000) -> int:
        """Merge the partial feedback rows of each (model, version, bucket, device) whose bucket
        started before `before` and whose rows were all stored before `settled_before`; returns
        rows removed."""
        with self._transaction() as conn:
            conn.execute("SELECT pg_advisory_xact_lock(%s::int, 1)", (COMPACTION_LOCK,))
            keys = tuples(
                conn,
                "SELECT model, model_version, bucket_start, device FROM feedback WHERE bucket_start < %s "
                "GROUP BY model, model_version, bucket_start, device HAVING count(*) > 1 AND max(stored_at) < %s "
                "LIMIT %s", (before, settled_before, limit),
            )
            return sum(self._merge_feedback(conn, _BUCKET_KEY, key, key) for key in keys)

    def rollup_history(self, before: float, period_s: float, now: float, limit: int = 2000) -> int:
        """Roll drift-bucket and feedback rows that started before `before` up into one row per
        (model, version, device, `period_s` period, e.g. a UTC day); returns the period rows
        written (0 when nothing is left to roll up)."""
        written = 0
        for table in ("buckets", "feedback"):
            with self._transaction() as conn:
                conn.execute("SELECT pg_advisory_xact_lock(%s::int, 2)", (COMPACTION_LOCK,))
                groups = tuples(
                    conn,
                    f"SELECT model, model_version, device, floor(bucket_start / %s) * %s AS period FROM {table} "
                    "WHERE bucket_start < %s GROUP BY 1, 2, 3, 4 "
                    "HAVING count(*) > 1 OR min(bucket_start) <> floor(min(bucket_start) / %s) * %s LIMIT %s",
                    (period_s, period_s, before, period_s, period_s, limit),
                )
                for model, version, device, period in groups:
                    params = (model, version, device, float(period), float(period) + period_s)
                    if table == "feedback":
                        self._merge_feedback(conn, _PERIOD_KEY, params, (model, version, float(period), device))
                    else:
                        self._merge_buckets(conn, params, (model, version, device, float(period)), now)
                written += len(groups)
        return written

    def purge_history(self, before: float, limit: int = 5000) -> int:
        """Delete drift-bucket and feedback rows of buckets that started before `before`."""
        removed = 0
        with self._transaction() as conn:
            for table in ("buckets", "feedback"):
                removed += conn.execute(
                    f"DELETE FROM {table} WHERE id IN (SELECT id FROM {table} WHERE bucket_start < %s LIMIT %s)",
                    (before, limit),
                ).rowcount
        return removed

    def _merge_feedback(self, conn: Any, key_sql: str, params: Sequence[Any], into: tuple[str, str, float, str]) -> int:
        """Replace the feedback rows matching `key_sql` by their sum, one row at `into` (model,
        version, bucket start, device) stored at the newest of their times."""
        rows = _feedback_dicts(conn.execute(f"SELECT * FROM feedback WHERE {key_sql}", params).fetchall())
        if not rows:
            return 0
        try:
            total = sum_feedback_rows(rows)
        except FeedbackMismatch:  # counts that do not line up stay as they are
            return 0
        conn.execute("DELETE FROM feedback WHERE id = ANY(%s)", ([r["id"] for r in rows],))  # only those summed
        model, version, start, device = into
        conn.execute(INSERT_FEEDBACK, feedback_params(model, version, start, device, total,
                                                      max(r["stored_at"] for r in rows)))
        return len(rows) - 1

    def _merge_buckets(self, conn: Any, params: Sequence[Any], key: tuple, now: float) -> int:
        rows = decode(conn.execute(f"SELECT id, {', '.join(_BUCKET_COLUMNS)} FROM buckets WHERE {_PERIOD_KEY}",
                                   params).fetchall(), *_BUCKET_JSON)
        if not rows:
            return 0
        ids = [r.pop("id") for r in rows]
        try:
            total = sum_rows(rows)
        except ShapeMismatch:
            return 0
        conn.execute("DELETE FROM buckets WHERE id = ANY(%s)", (ids,))  # only those summed
        model, version, device, start = key
        conn.execute(INSERT_BUCKET, bucket_params(model, version, device, start, total, now, 1))
        return len(rows) - 1

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
            within_ids("device", devices),
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
            within_ids("device", devices),
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
