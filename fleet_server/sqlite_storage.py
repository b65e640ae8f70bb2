"""SQLite implementation of the Storage interface (WAL, one connection per thread, sqlite-utils).

Writers take `BEGIN IMMEDIATE` so that read-modify-write of bucket sums is serialised across
threads and across ingest processes sharing the file (SQLite allows one writer at a time).
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import msgspec
from sqlite_utils import Database

from fleet_server import migrations, sqlite_ingest
from fleet_server.storage import BatchResult, Conflict, IngestBatch
from fleet_server.telemetry import ShapeMismatch, sum_rows

_json = msgspec.json.Encoder()
_unpack = msgspec.msgpack.Decoder().decode


def dumps(value: Any) -> str:
    return _json.encode(value).decode()


def loads(text: str | None) -> Any:
    return None if text is None else msgspec.json.decode(text)


_BUCKET_JSON = ("errors", "latency", "features", "prediction")
_BUCKET_COLUMNS = (
    "model", "model_version", "device", "bucket_start", "windows", "predictions", "requests", "errors",
    "latency", "latency_sum_ms", "features", "prediction",
)
_INSERT_BUCKET = sqlite_ingest.INSERT_BUCKET


def _where(*terms: tuple[str, Any]) -> tuple[str, list[Any]]:
    """The WHERE clause of a query's optional filters and its parameters: (" WHERE a AND b", [...]),
    ("", []) when none applies. A term is (condition, value): None or False leaves it out, True
    keeps a condition without `?`, a list or tuple fills one `?` per item, any other value one `?`."""
    conditions: list[str] = []
    params: list[Any] = []
    for condition, value in terms:
        if value is None or value is False:
            continue
        conditions.append(condition)
        if isinstance(value, (list, tuple)):
            params += value
        elif value is not True:
            params.append(value)
    return (" WHERE " + " AND ".join(conditions) if conditions else ""), params


def _in(column: str, values: Sequence[Any] | None) -> tuple[str, Any]:
    """The `_where` term `column IN (?,?,...)`, left out when values is None."""
    if values is None:
        return "", None
    return f"{column} IN ({','.join('?' * len(values))})", list(values)


def _device_terms(
    tags: dict[str, str] | None,
    model_version: str | None,
    status: str | None,
    seen_after: float | None,
    seen_before: float | None,
) -> list[tuple[str, Any]]:
    """The `_where` terms of the device filters that listing and searching devices share."""
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


class SqliteStorage:
    """Storage on one SQLite file; share one instance between threads (connections are per thread)."""

    def __init__(self, path: str | Path, *, migrate: bool = True) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._all: list[Database] = []
        self._lock = threading.Lock()
        if migrate:
            db = self.db
            with self._immediate():
                migrations.apply(db)

    # ------------------------------------------------------------------ connections

    @property
    def db(self) -> Database:
        db = getattr(self._local, "db", None)
        if db is None:
            conn = sqlite3.connect(str(self.path), timeout=30.0, check_same_thread=False)
            db = Database(conn)
            db.enable_wal()
            # NORMAL in WAL mode survives a process kill (kill -9); only an OS crash can lose
            # the last commits. busy_timeout lets concurrent ingest processes queue for the lock.
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA busy_timeout=30000")
            conn.execute("PRAGMA foreign_keys=ON")
            self._local.db = db
            with self._lock:
                self._all.append(db)
        return db

    @contextmanager
    def _immediate(self):
        conn = self.db.conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        else:
            conn.execute("COMMIT")

    def _rows(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> list[dict[str, Any]]:
        return list(self.db.query(sql, params))

    def _one(self, sql: str, params: Sequence[Any] = ()) -> dict[str, Any] | None:
        rows = self._rows(sql, params)
        return rows[0] if rows else None

    def close(self) -> None:
        with self._lock:
            for db in self._all:
                with contextlib.suppress(sqlite3.ProgrammingError):  # closed from another thread
                    db.close()
            self._all.clear()
        self._local = threading.local()

    def _bump_devices_generation(self, conn: sqlite3.Connection) -> None:
        conn.execute(
            "UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'devices_generation'"
        )

    # ------------------------------------------------------------------ devices

    def insert_device(
        self, device_id: str, fleet: str, tags: dict[str, str], password_hash: str, broker_hash: str, now: float
    ) -> None:
        with self._immediate() as conn:
            try:
                conn.execute(
                    "INSERT INTO devices(id, fleet, created_at, password_hash, broker_hash) VALUES (?,?,?,?,?)",
                    (device_id, fleet, now, password_hash, broker_hash),
                )
            except sqlite3.IntegrityError as exc:
                raise Conflict(f"device {device_id!r} already exists") from exc
            conn.executemany(
                "INSERT INTO device_tags(device, key, value) VALUES (?,?,?)",
                [(device_id, k, v) for k, v in tags.items()],
            )
            self._bump_devices_generation(conn)

    def _device_dict(self, row: dict[str, Any], tags: dict[str, str]) -> dict[str, Any]:
        out = {k: v for k, v in row.items() if k not in ("password_hash", "broker_hash")}
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

    def get_device(self, device_id: str) -> dict[str, Any] | None:
        row = self._one("SELECT * FROM devices WHERE id = ?", [device_id])
        if row is None:
            return None
        return self._device_dict(row, self._tags_for([device_id])[device_id])

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
        where, params = _where(
            ("revoked_at IS NULL", not include_revoked),
            *_device_terms(tags, model_version, status, seen_after, seen_before),
        )
        rows = self._rows(
            f"SELECT * FROM devices{where} ORDER BY id LIMIT ? OFFSET ?", [*params, limit, offset]
        )
        tags_by = self._tags_for([r["id"] for r in rows])
        return [self._device_dict(r, tags_by[r["id"]]) for r in rows]

    def revoke_device(self, device_id: str, now: float) -> bool:
        with self._immediate() as conn:
            cur = conn.execute(
                "UPDATE devices SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL", (now, device_id)
            )
            if cur.rowcount:
                self._bump_devices_generation(conn)
            return cur.rowcount > 0

    def device_password_hash(self, device_id: str) -> str | None:
        row = self._one("SELECT password_hash FROM devices WHERE id = ? AND revoked_at IS NULL", [device_id])
        return row["password_hash"] if row else None

    def broker_accounts(self) -> list[tuple[str, str]]:
        rows = self._rows("SELECT id, broker_hash FROM devices WHERE revoked_at IS NULL ORDER BY id")
        return [(r["id"], r["broker_hash"]) for r in rows]

    def active_device_ids(self) -> set[str]:
        return {r["id"] for r in self._rows("SELECT id FROM devices WHERE revoked_at IS NULL")}

    def devices_generation(self) -> int:
        row = self._one("SELECT value FROM meta WHERE key = 'devices_generation'")
        return int(row["value"]) if row else 0

    # ------------------------------------------------------------------ ingest

    def store_batch(
        self, batch: IngestBatch, bucket_s: float, now: float, *, samples_per_device: int = 200
    ) -> BatchResult:
        with self._immediate() as conn:
            return sqlite_ingest.store_batch(conn, batch, bucket_s, now, samples_per_device)

    _bucket_params = staticmethod(sqlite_ingest.bucket_params)

    def compact_buckets(self, before: float, now: float, limit: int = 5000) -> int:
        """Merge the partial rows of buckets that started before `before`; returns rows removed."""
        with self._immediate() as conn:
            keys = conn.execute(
                "SELECT DISTINCT model, model_version, bucket_start, device FROM buckets "
                "WHERE compacted = 0 AND bucket_start < ? LIMIT ?",
                (before, limit),
            ).fetchall()
            removed = 0
            for key in keys:
                rows = self._bucket_dicts(
                    [
                        dict(zip(_BUCKET_COLUMNS, r, strict=True))
                        for r in conn.execute(
                            f"SELECT {', '.join(_BUCKET_COLUMNS)} FROM buckets WHERE model = ? AND "
                            "model_version = ? AND bucket_start = ? AND device = ?",
                            key,
                        ).fetchall()
                    ]
                )
                try:
                    total = sum_rows(rows)
                except ShapeMismatch:
                    # Counts of an unregistered model that do not line up: keep them apart.
                    conn.execute(
                        "UPDATE buckets SET compacted = 1 WHERE model = ? AND model_version = ? "
                        "AND bucket_start = ? AND device = ?",
                        key,
                    )
                    continue
                conn.execute(
                    "DELETE FROM buckets WHERE model = ? AND model_version = ? AND bucket_start = ? AND device = ?",
                    key,
                )
                model, version, start, device = key
                conn.execute(_INSERT_BUCKET, self._bucket_params(model, version, device, start, total, now, 1))
                removed += len(rows) - 1
            return removed

    def purge_telemetry(self, before: float, limit: int = 2000) -> int:
        """Delete up to `limit` windows stored before `before`, oldest first, with the telemetry
        `seqs` rows of their devices up to the new floor; returns the windows deleted.

        One short transaction per call (callers loop while it returns `limit`). Each device's
        `seq_stats.purged_upto` rises to the highest seq purged, so that a replay of a purged
        window is still a duplicate (sqlite_ingest.claim_seqs). Events and their seqs stay."""
        with self._immediate() as conn:
            purged = conn.execute(
                "DELETE FROM windows WHERE (device, seq) IN (SELECT device, seq FROM windows "
                "WHERE stored_at < ? ORDER BY stored_at LIMIT ?) RETURNING device, seq",
                (before, limit),
            ).fetchall()
            floors: dict[str, int] = {}
            for device, seq in purged:
                if seq > floors.get(device, -1):
                    floors[device] = seq
            conn.executemany(
                "UPDATE seq_stats SET purged_upto = max(coalesce(purged_upto, ?1), ?1) WHERE device = ?2",
                [(floor, device) for device, floor in floors.items()],
            )
            # At or below the floor every telemetry seq is a duplicate anyway (and none is claimed
            # again), so one range per device: it also takes the seqs of windows refused while
            # storing (shape_mismatch), which have no windows row.
            conn.executemany(
                "DELETE FROM seqs WHERE device = ? AND seq <= ? AND kind = 'telemetry'", list(floors.items())
            )
            return len(purged)

    def put_worker_stats(self, worker_id: str, pid: int, stats: dict[str, Any], now: float) -> None:
        with self._immediate() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO ingest_workers(worker_id, pid, updated_at, stats) VALUES (?,?,?,?)",
                (worker_id, pid, now, dumps(stats)),
            )

    def worker_stats(self) -> list[dict[str, Any]]:
        rows = self._rows("SELECT * FROM ingest_workers ORDER BY worker_id")
        for r in rows:
            r["stats"] = loads(r["stats"])
        return rows

    def reject_counts(self) -> list[dict[str, Any]]:
        return self._rows("SELECT * FROM rejects ORDER BY reason, device")

    def seq_stats(self, device_id: str | None = None) -> list[dict[str, Any]]:
        where, params = _where(("device = ?", device_id))
        return self._rows(f"SELECT * FROM seq_stats{where} ORDER BY device", params)

    def events(self, device_id: str, limit: int = 100) -> list[dict[str, Any]]:
        return self._rows(
            "SELECT * FROM events WHERE device = ? ORDER BY seq DESC LIMIT ?", [device_id, limit]
        )

    def window_lags(self, since: float) -> list[float]:
        rows = self.db.conn.execute(
            "SELECT stored_at - sent_at FROM windows WHERE stored_at >= ? AND sent_at > 0", (since,)
        ).fetchall()
        return [r[0] for r in rows]

    def recent_samples(self, device_id: str, limit: int = 200) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        if limit <= 0:
            return out
        # Windows newest first, decoded only until `limit` rows are collected.
        cursor = self.db.conn.execute(
            "SELECT seq, model, model_version, window_end, rows FROM samples WHERE device = ? ORDER BY seq DESC",
            (device_id,),
        )
        for seq, model, version, window_end, rows in cursor:
            for x, y in _unpack(rows):
                out.append(
                    {"seq": seq, "model": model, "model_version": version, "window_end": window_end, "x": x, "y": y}
                )
                if len(out) >= limit:
                    cursor.close()
                    return out
        return out

    def device_bandwidth(self, device_id: str, start: float | None, step_s: float) -> list[dict[str, Any]]:
        rows = self.db.conn.execute(
            "SELECT CAST(window_end / ?1 AS INTEGER) AS k, count(*), total(bytes), min(window_start) FROM windows "
            "WHERE device = ?2 AND window_end >= ?3 GROUP BY k ORDER BY k",
            (step_s, device_id, start if start is not None else float("-inf")),
        ).fetchall()
        return [
            {"start": k * step_s, "messages": n, "bytes": int(size), "first_window_start": first}
            for k, n, size, first in rows
        ]

    # ------------------------------------------------------------------ drift buckets

    def _bucket_dicts(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for r in rows:
            for k in _BUCKET_JSON:
                r[k] = loads(r[k])
        return rows

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
        where, params = _where(
            ("model = ? AND model_version = ?", [model, version]),
            ("bucket_start >= ?", start),
            ("bucket_start < ?", end),
            _in("device", devices),
        )
        sql = f"SELECT * FROM buckets{where} ORDER BY bucket_start, device, id"
        return self._bucket_dicts(self._rows(sql, params))

    def device_bucket_rows(self, device_id: str, start: float | None = None) -> list[dict[str, Any]]:
        where, params = _where(("device = ?", [device_id]), ("bucket_start >= ?", start))
        return self._bucket_dicts(self._rows(f"SELECT * FROM buckets{where} ORDER BY bucket_start, id", params))

    def bucketed_versions(self, since: float | None = None) -> list[dict[str, Any]]:
        where, params = _where(("bucket_start >= ?", since))
        return self._rows(
            "SELECT model, model_version, min(bucket_start) AS first_bucket, max(bucket_start) AS last_bucket, "
            f"count(DISTINCT device) AS devices FROM buckets{where} "
            "GROUP BY model, model_version ORDER BY model, model_version",
            params,
        )

    # ------------------------------------------------------------------ ground-truth feedback

    def _feedback_dicts(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for r in rows:
            r["confusion"] = loads(r["confusion"])
            r["error_bins"] = loads(r["error_bins"])
            cal = loads(r.pop("calibration"))
            r["calibration_counts"], r["calibration_hits"], r["calibration_prob_sum"] = cal or (None, None, None)
        return rows

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
        where, params = _where(
            ("model = ?", [model]),
            ("model_version = ?", version),
            ("bucket_start >= ?", start),
            ("bucket_start < ?", end),
            _in("device", devices),
        )
        sql = f"SELECT * FROM feedback{where} ORDER BY bucket_start, device, id"
        return self._feedback_dicts(self._rows(sql, params))

    def feedback_since(self, model: str, since: float) -> list[dict[str, Any]]:
        return self._feedback_dicts(
            self._rows("SELECT * FROM feedback WHERE model = ? AND stored_at >= ?", [model, since])
        )

    def feedback_versions(self) -> list[dict[str, Any]]:
        return self._rows(
            "SELECT model, model_version, min(bucket_start) AS first_bucket, max(bucket_start) AS last_bucket, "
            "count(DISTINCT device) AS devices, sum(joined) AS labels FROM feedback "
            "GROUP BY model, model_version ORDER BY model, model_version"
        )

    # ------------------------------------------------------------------ models and keys

    def insert_model(self, row: dict[str, Any]) -> None:
        row = {**row, "manifest": row["manifest"] if isinstance(row["manifest"], str) else dumps(row["manifest"])}
        with self._immediate() as conn:
            try:
                conn.execute(
                    f"INSERT INTO models({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
                    list(row.values()),
                )
            except sqlite3.IntegrityError as exc:
                raise Conflict(f"model {row['name']} {row['version']} already exists") from exc

    def _model_dict(self, row: dict[str, Any]) -> dict[str, Any]:
        row["manifest"] = loads(row["manifest"])
        row["policy"] = loads(row["policy"])
        return row

    def get_model(self, name: str, version: str) -> dict[str, Any] | None:
        row = self._one("SELECT * FROM models WHERE name = ? AND version = ?", [name, version])
        return self._model_dict(row) if row else None

    def list_models(self, name: str | None = None) -> list[dict[str, Any]]:
        if name is None:
            rows = self._rows("SELECT * FROM models ORDER BY name, uploaded_at")
        else:
            rows = self._rows("SELECT * FROM models WHERE name = ? ORDER BY uploaded_at", [name])
        return [self._model_dict(r) for r in rows]

    def set_model_policy(self, name: str, version: str, policy: dict[str, Any] | None) -> bool:
        with self._immediate() as conn:
            cur = conn.execute(
                "UPDATE models SET policy = ? WHERE name = ? AND version = ?",
                (dumps(policy) if policy is not None else None, name, version),
            )
            return cur.rowcount > 0

    def add_trusted_key(self, key_id: str, pem: str, comment: str, now: float) -> None:
        with self._immediate() as conn:
            conn.execute(
                "INSERT OR IGNORE INTO trusted_keys(key_id, pem, comment, added_at) VALUES (?,?,?,?)",
                (key_id, pem, comment, now),
            )

    def trusted_keys(self) -> list[dict[str, Any]]:
        return self._rows("SELECT * FROM trusted_keys ORDER BY added_at")

    def remove_trusted_key(self, key_id: str) -> bool:
        with self._immediate() as conn:
            return conn.execute("DELETE FROM trusted_keys WHERE key_id = ?", (key_id,)).rowcount > 0

    def revoked_keys(self) -> list[dict[str, Any]]:
        return self._rows("SELECT * FROM revoked_keys ORDER BY revoked_at")

    def revoke_key(self, key_id: str, now: float, reason: str) -> bool:
        with self._immediate() as conn:
            return conn.execute(
                "INSERT OR IGNORE INTO revoked_keys(key_id, revoked_at, reason) VALUES (?,?,?)", (key_id, now, reason)
            ).rowcount > 0

    # ------------------------------------------------------------------ tokens

    def insert_token(self, name: str, role: str, token_hash: str, now: float,
                     expires_at: float | None = None) -> int:
        with self._immediate() as conn:
            cur = conn.execute(
                "INSERT INTO tokens(name, role, token_hash, created_at, expires_at) VALUES (?,?,?,?,?)",
                (name, role, token_hash, now, expires_at),
            )
            return int(cur.lastrowid)

    def find_token(self, token_hash: str) -> dict[str, Any] | None:
        return self._one(
            "SELECT id, name, role, created_at, expires_at FROM tokens WHERE token_hash = ? AND revoked_at IS NULL",
            [token_hash],
        )

    # ------------------------------------------------------------------ alerts and webhooks

    def _alert_dict(self, row: dict[str, Any]) -> dict[str, Any]:
        row["details"] = loads(row["details"])
        return row

    def open_alerts(self, model: str, version: str, scope: str, kind: str | None = None) -> list[dict[str, Any]]:
        where, params = _where(
            ("state = 'open' AND model = ? AND model_version = ? AND scope = ?", [model, version, scope]),
            ("kind = ?", kind),
        )
        return [self._alert_dict(r) for r in self._rows(f"SELECT * FROM alerts{where}", params)]

    def insert_alert(self, row: dict[str, Any]) -> int:
        row = {**row, "details": dumps(row.get("details", {}))}
        with self._immediate() as conn:
            cur = conn.execute(
                f"INSERT INTO alerts({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
                list(row.values()),
            )
            return int(cur.lastrowid)

    def update_alert(self, alert_id: int, **fields: Any) -> None:
        if "details" in fields:
            fields["details"] = dumps(fields["details"])
        sets = ", ".join(f"{k} = ?" for k in fields)
        with self._immediate() as conn:
            conn.execute(f"UPDATE alerts SET {sets} WHERE id = ?", [*fields.values(), alert_id])

    def get_alert(self, alert_id: int) -> dict[str, Any] | None:
        row = self._one("SELECT * FROM alerts WHERE id = ?", [alert_id])
        return self._alert_dict(row) if row else None

    def list_alerts(
        self,
        *,
        state: str | None = None,
        model: str | None = None,
        scope: str | None = None,
        kind: str | None = None,
        limit: int = 500,
    ) -> list[dict[str, Any]]:
        where, params = _where(
            ("state = ?", state), ("model = ?", model), ("scope = ?", scope), ("kind = ?", kind)
        )
        rows = self._rows(f"SELECT * FROM alerts{where} ORDER BY id DESC LIMIT ?", [*params, limit])
        return [self._alert_dict(r) for r in rows]

    def series_states(self, model: str, version: str, scope: str) -> dict[str, dict[str, Any]]:
        rows = self._rows(
            "SELECT series, state FROM alert_series WHERE model = ? AND model_version = ? AND scope = ?",
            [model, version, scope],
        )
        return {r["series"]: loads(r["state"]) for r in rows}

    def put_series_states(self, model: str, version: str, scope: str, states: dict[str, dict[str, Any]]) -> None:
        with self._immediate() as conn:
            conn.executemany(
                "INSERT OR REPLACE INTO alert_series(model, model_version, scope, series, last_bucket, state) "
                "VALUES (?,?,?,?,?,?)",
                [
                    (model, version, scope, series, state.get("last_seen"), dumps(state))
                    for series, state in states.items()
                ],
            )

    def add_webhook(self, url: str, secret: str, now: float) -> int:
        with self._immediate() as conn:
            cur = conn.execute(
                "INSERT INTO webhooks(url, secret, created_at) VALUES (?,?,?)", (url, secret, now)
            )
            return int(cur.lastrowid)

    def list_webhooks(self) -> list[dict[str, Any]]:
        return self._rows("SELECT * FROM webhooks WHERE enabled = 1 ORDER BY id")

    def delete_webhook(self, webhook_id: int) -> bool:
        with self._immediate() as conn:
            return conn.execute("DELETE FROM webhooks WHERE id = ?", (webhook_id,)).rowcount > 0

    def record_delivery(self, row: dict[str, Any]) -> None:
        with self._immediate() as conn:
            conn.execute(
                f"INSERT INTO webhook_deliveries({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
                list(row.values()),
            )

    def deliveries(self, limit: int = 100) -> list[dict[str, Any]]:
        return self._rows("SELECT * FROM webhook_deliveries ORDER BY id DESC LIMIT ?", [limit])

    # ------------------------------------------------------------------ console

    def insert_operator(self, name: str, role: str, password_hash: str, now: float) -> None:
        with self._immediate() as conn:
            try:
                conn.execute(
                    "INSERT INTO operators(name, role, password_hash, created_at) VALUES (?,?,?,?)",
                    (name, role, password_hash, now),
                )
            except sqlite3.IntegrityError as exc:
                raise Conflict(f"operator {name!r} already exists") from exc

    def set_operator(self, name: str, *, role: str | None = None, password_hash: str | None = None,
                     disabled_at: float | None = None) -> bool:
        fields = {k: v for k, v in (("role", role), ("password_hash", password_hash),
                                    ("disabled_at", disabled_at)) if v is not None}
        if not fields:
            return self.get_operator(name) is not None
        with self._immediate() as conn:
            cur = conn.execute(
                f"UPDATE operators SET {', '.join(f'{k} = ?' for k in fields)} WHERE name = ?",
                [*fields.values(), name],
            )
            if fields.get("disabled_at") is not None or "role" in fields or "password_hash" in fields:
                # A changed account starts over: its open sessions end.
                conn.execute("DELETE FROM console_sessions WHERE operator = ?", (name,))
            return cur.rowcount > 0

    def get_operator(self, name: str) -> dict[str, Any] | None:
        return self._one("SELECT * FROM operators WHERE name = ?", [name])

    def list_operators(self) -> list[dict[str, Any]]:
        return self._rows("SELECT name, role, created_at, disabled_at FROM operators ORDER BY name")

    def insert_session(self, id_hash: str, operator: str, csrf_token: str, now: float, expires_at: float) -> None:
        with self._immediate() as conn:
            conn.execute(
                "INSERT INTO console_sessions(id_hash, operator, csrf_token, created_at, expires_at) "
                "VALUES (?,?,?,?,?)",
                (id_hash, operator, csrf_token, now, expires_at),
            )

    def find_session(self, id_hash: str, now: float) -> dict[str, Any] | None:
        return self._one(
            "SELECT s.operator AS name, o.role, s.csrf_token, s.created_at, s.expires_at "
            "FROM console_sessions s JOIN operators o ON o.name = s.operator "
            "WHERE s.id_hash = ? AND s.expires_at > ? AND o.disabled_at IS NULL",
            [id_hash, now],
        )

    def delete_session(self, id_hash: str) -> None:
        with self._immediate() as conn:
            conn.execute("DELETE FROM console_sessions WHERE id_hash = ?", (id_hash,))

    def delete_expired_sessions(self, now: float) -> int:
        with self._immediate() as conn:
            return conn.execute("DELETE FROM console_sessions WHERE expires_at <= ?", (now,)).rowcount

    def insert_audit(self, row: dict[str, Any]) -> int:
        row = {**row, "detail": dumps(row.get("detail") or {})}
        with self._immediate() as conn:
            cur = conn.execute(
                f"INSERT INTO audit_log({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
                list(row.values()),
            )
            return int(cur.lastrowid)

    def list_audit(self, *, target_prefix: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        where, params = _where(
            ("substr(target, 1, ?) = ?", None if target_prefix is None else [len(target_prefix), target_prefix])
        )
        rows = self._rows(f"SELECT * FROM audit_log{where} ORDER BY id DESC LIMIT ?", [*params, limit])
        for r in rows:
            r["detail"] = loads(r["detail"])
        return rows

    def search_devices(
        self,
        *,
        query: str = "",
        tags: dict[str, str] | None = None,
        model_version: str | None = None,
        status: str | None = None,
        updating: bool | None = None,
        seen_after: float | None = None,
        seen_before: float | None = None,
        sort: str = "id",
        limit: int = 50,
        offset: int = 0,
    ) -> tuple[list[dict[str, Any]], int]:
        escaped = query.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        busy = "(update_state IS NOT NULL AND lower(update_state) NOT IN ('idle', 'failed'))"
        clause, params = _where(
            ("revoked_at IS NULL", True),
            ("id LIKE ? ESCAPE '\\'", f"%{escaped}%" if query else None),
            *_device_terms(tags, model_version, status, seen_after, seen_before),
            (busy if updating else f"NOT {busy}", updating is not None),
        )
        order = {
            "id": "id",
            "last_seen": "last_seen DESC NULLS LAST, id",
            "version": "active_version, id",
            "status": "status, id",
        }.get(sort, "id")
        total = self.db.conn.execute(f"SELECT count(*) FROM devices{clause}", params).fetchone()[0]
        rows = self._rows(f"SELECT * FROM devices{clause} ORDER BY {order} LIMIT ? OFFSET ?", [*params, limit, offset])
        tags_by = self._tags_for([r["id"] for r in rows])
        return [self._device_dict(r, tags_by[r["id"]]) for r in rows], int(total)

    def fleet_counts(self) -> dict[str, Any]:
        conn = self.db.conn
        live = "FROM devices WHERE revoked_at IS NULL"
        by_status = dict(conn.execute(f"SELECT status, count(*) {live} GROUP BY status").fetchall())
        updating = conn.execute(
            f"SELECT count(*) {live} AND update_state IS NOT NULL AND lower(update_state) NOT IN ('idle', 'failed')"
        ).fetchone()[0]
        versions = [
            {"model": m, "version": v, "devices": n}
            for m, v, n in conn.execute(
                f"SELECT model, active_version, count(*) {live} GROUP BY model, active_version "
                "ORDER BY count(*) DESC, model, active_version"
            ).fetchall()
        ]
        states = dict(conn.execute(f"SELECT coalesce(update_state, ''), count(*) {live} GROUP BY 1").fetchall())
        tag_keys = [r[0] for r in conn.execute(
            "SELECT DISTINCT key FROM device_tags JOIN devices ON devices.id = device_tags.device "
            "WHERE devices.revoked_at IS NULL ORDER BY key LIMIT 100"
        ).fetchall()]
        return {
            "total": sum(by_status.values()),
            "by_status": by_status,
            "updating": int(updating),
            "versions": versions,
            "update_states": states,
            "tag_keys": tag_keys,
        }

    # ------------------------------------------------------------------ rollouts

    _ROLLOUT_JSON = ("spec", "gates", "stages", "previous_target")

    def _rollout_dict(self, row: dict[str, Any]) -> dict[str, Any]:
        for k in self._ROLLOUT_JSON:
            row[k] = loads(row[k])
        return row

    def _audit(self, conn: sqlite3.Connection, rollout_id: str, entries: Sequence[tuple[str, str, dict[str, Any]]],
               now: float) -> None:
        conn.executemany(
            "INSERT INTO rollout_audit(ts, rollout_id, actor, action, detail) VALUES (?,?,?,?,?)",
            [(now, rollout_id, actor, action, dumps(detail)) for actor, action, detail in entries],
        )

    def insert_rollout(self, row: dict[str, Any], audit: tuple[str, str, dict[str, Any]]) -> None:
        row = {k: dumps(v) if k in self._ROLLOUT_JSON and v is not None else v for k, v in row.items()}
        with self._immediate() as conn:
            try:
                conn.execute(
                    f"INSERT INTO rollouts({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
                    list(row.values()),
                )
            except sqlite3.IntegrityError as exc:
                raise Conflict(f"rollout {row['id']!r} already exists") from exc
            self._audit(conn, row["id"], [audit], row["created_at"])

    def get_rollout(self, rollout_id: str) -> dict[str, Any] | None:
        row = self._one("SELECT * FROM rollouts WHERE id = ?", [rollout_id])
        return self._rollout_dict(row) if row else None

    def list_rollouts(self, *, states: Sequence[str] | None = None, limit: int = 100) -> list[dict[str, Any]]:
        if states is not None and not states:
            return []
        where, params = _where(_in("state", states))
        rows = self._rows(
            f"SELECT * FROM rollouts{where} ORDER BY created_at DESC, id LIMIT ?", [*params, limit]
        )
        return [self._rollout_dict(r) for r in rows]

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
        values = {k: dumps(v) if k in self._ROLLOUT_JSON and v is not None else v for k, v in fields.items()}
        values["updated_at"] = now
        where = " AND ".join(f"{k} = ?" for k in (expect or {}))
        with self._immediate() as conn:
            cur = conn.execute(
                f"UPDATE rollouts SET {', '.join(f'{k} = ?' for k in values)} WHERE id = ?"
                + (f" AND {where}" if where else ""),
                [*values.values(), rollout_id, *(expect or {}).values()],
            )
            if cur.rowcount == 0:
                return False
            self._audit(conn, rollout_id, audit, now)
            return True

    def rollout_devices(self, rollout_id: str | None = None, *, active: bool = False) -> list[dict[str, Any]]:
        where, params = _where(
            ("rd.rollout_id = ?", rollout_id), ("r.state IN ('running', 'paused', 'aborting')", active)
        )
        return self._rows(
            f"SELECT rd.* FROM rollout_devices rd JOIN rollouts r ON r.id = rd.rollout_id{where} "
            "ORDER BY rd.rollout_id, rd.stage, rd.device",
            params,
        )

    def put_rollout_devices(self, rows: Sequence[dict[str, Any]]) -> None:
        if not rows:
            return
        cols = ("rollout_id", "device", "stage", "mode", "previous_version", "assigned_at", "desired_at",
                "status", "status_at", "live_at")
        with self._immediate() as conn:
            conn.executemany(
                f"INSERT OR REPLACE INTO rollout_devices({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
                [tuple(r.get(c) for c in cols) for r in rows],
            )

    def add_rollout_audit(self, rollout_id: str, actor: str, action: str, detail: dict[str, Any], now: float) -> None:
        with self._immediate() as conn:
            self._audit(conn, rollout_id, [(actor, action, detail)], now)

    def rollout_audit(self, rollout_id: str, limit: int = 1000) -> list[dict[str, Any]]:
        rows = self._rows(
            "SELECT ts, rollout_id, actor, action, detail FROM rollout_audit WHERE rollout_id = ? "
            "ORDER BY id LIMIT ?",
            [rollout_id, limit],
        )
        for r in rows:
            r["detail"] = loads(r["detail"])
        return rows

    def device_desired(self) -> dict[str, dict[str, Any]]:
        return {r["device"]: r for r in self._rows("SELECT * FROM device_desired")}

    def put_device_desired(self, device_id: str, row: dict[str, Any]) -> None:
        with self._immediate() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO device_desired(device, model, version, mode, rollout_id, allow_downgrade, "
                "published_at) VALUES (?,?,?,?,?,?,?)",
                (device_id, row["model"], row["version"], row["mode"], row.get("rollout_id"),
                 int(bool(row.get("allow_downgrade"))), row["published_at"]),
            )

    def fleet_targets(self) -> list[dict[str, Any]]:
        rows = self._rows("SELECT * FROM fleet_targets ORDER BY updated_at")
        for r in rows:
            r["target"] = loads(r["target"])
        return rows

    def set_fleet_target(
        self, model: str, target: dict[str, Any], version: str | None, rollout_id: str | None, now: float
    ) -> None:
        key = dumps(target)
        with self._immediate() as conn:
            if version is None:
                conn.execute("DELETE FROM fleet_targets WHERE model = ? AND target = ?", (model, key))
            else:
                conn.execute(
                    "INSERT OR REPLACE INTO fleet_targets(model, target, version, rollout_id, updated_at) "
                    "VALUES (?,?,?,?,?)",
                    (model, key, version, rollout_id, now),
                )

    def windows_since(self, since: float, model: str) -> list[dict[str, Any]]:
        rows = self._rows(
            "SELECT device, model_version, predictions, errors, latency, prediction, shadow FROM windows "
            "WHERE stored_at >= ? AND model = ?",
            [since, model],
        )
        for r in rows:
            for k in ("latency", "prediction", "shadow"):
                r[k] = loads(r[k])
        return rows

    def rollout_events(self, rollout_id: str, since: float = 0.0) -> list[dict[str, Any]]:
        return self._rows(
            "SELECT * FROM events WHERE rollout_id = ? AND stored_at >= ? ORDER BY device, seq",
            [rollout_id, since],
        )
