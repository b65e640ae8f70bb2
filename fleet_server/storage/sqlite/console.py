"""The console's rows: operator accounts, sessions, the audit log, device search and fleet counts."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fleet_server.storage.base import Conflict
from fleet_server.storage.sqlite.connection import (
    IntegrityError,
    decode,
    dumps,
    insert_row,
    update_row,
    where,
)
from fleet_server.storage.sqlite.devices import DevicesMixin, device_terms

# A device is updating while its agent reports an update state other than idle or failed.
_BUSY = "(update_state IS NOT NULL AND lower(update_state) NOT IN ('idle', 'failed'))"
_SORTS = {
    "id": "id",
    "last_seen": "last_seen DESC NULLS LAST, id",
    "version": "active_version, id",
    "status": "status, id",
}


class ConsoleMixin(DevicesMixin):
    def insert_operator(self, name: str, role: str, password_hash: str, now: float) -> None:
        with self._immediate() as conn:
            try:
                conn.execute(
                    "INSERT INTO operators(name, role, password_hash, created_at) VALUES (?,?,?,?)",
                    (name, role, password_hash, now),
                )
            except IntegrityError as exc:
                raise Conflict(f"operator {name!r} already exists") from exc

    def set_operator(self, name: str, *, role: str | None = None, password_hash: str | None = None,
                     disabled_at: float | None = None) -> bool:
        fields = {k: v for k, v in (("role", role), ("password_hash", password_hash),
                                    ("disabled_at", disabled_at)) if v is not None}
        if not fields:
            return self.get_operator(name) is not None
        with self._immediate() as conn:
            changed = update_row(conn, "operators", fields, {"name": name})
            # A changed account starts over: its open sessions end.
            conn.execute("DELETE FROM console_sessions WHERE operator = ?", (name,))
            return changed > 0

    def get_operator(self, name: str) -> dict[str, Any] | None:
        return self._one("SELECT * FROM operators WHERE name = ?", [name])

    def list_operators(self) -> list[dict[str, Any]]:
        return self._rows("SELECT name, role, created_at, disabled_at FROM operators ORDER BY name")

    def insert_session(self, id_hash: str, operator: str, csrf_token: str, now: float, expires_at: float) -> None:
        with self._immediate() as conn:
            insert_row(conn, "console_sessions", {"id_hash": id_hash, "operator": operator, "csrf_token": csrf_token,
                                                  "created_at": now, "expires_at": expires_at})

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

    # ---- failed console logins (rate limiting shared by every server process)
    def add_login_failure(self, keys: Sequence[str], at: float, forget_before: float) -> None:
        with self._immediate() as conn:
            conn.executemany("INSERT INTO login_failures(key, at) VALUES (?, ?)", [(k, at) for k in keys])
            conn.execute("DELETE FROM login_failures WHERE at <= ?", (forget_before,))  # keeps the table small

    def login_failures(self, keys: Sequence[str], since: float) -> dict[str, list[float]]:
        out: dict[str, list[float]] = {k: [] for k in keys}
        marks = ",".join("?" * len(keys))
        for key, at in self.db.conn.execute(
            f"SELECT key, at FROM login_failures WHERE key IN ({marks}) AND at > ? ORDER BY at", [*keys, since]
        ).fetchall():
            out[key].append(at)
        return out

    def clear_login_failures(self, key: str) -> None:
        with self._immediate() as conn:
            conn.execute("DELETE FROM login_failures WHERE key = ?", (key,))

    def recent_login_failures(self, since: float) -> list[dict[str, Any]]:
        grouped: dict[str, list[float]] = {}
        for key, at in self.db.conn.execute(
            "SELECT key, at FROM login_failures WHERE at > ? ORDER BY key, at LIMIT 100000", (since,)
        ).fetchall():
            grouped.setdefault(key, []).append(at)
        return [{"key": k, "times": v} for k, v in grouped.items()]

    def purge_audit(self, before: float, limit: int = 5000) -> int:
        with self._immediate() as conn:
            return conn.execute(
                "DELETE FROM audit_log WHERE id IN (SELECT id FROM audit_log WHERE at < ? ORDER BY id LIMIT ?)",
                (before, limit),
            ).rowcount

    def insert_audit(self, row: dict[str, Any]) -> int:
        with self._immediate() as conn:
            return insert_row(conn, "audit_log", {**row, "detail": dumps(row.get("detail") or {})})

    def list_audit(self, *, target_prefix: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        clause, params = where(
            ("substr(target, 1, ?) = ?", None if target_prefix is None else [len(target_prefix), target_prefix])
        )
        return decode(self._rows(f"SELECT * FROM audit_log{clause} ORDER BY id DESC LIMIT ?", [*params, limit]),
                      "detail")

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
        clause, params = where(
            ("revoked_at IS NULL", True),
            ("id LIKE ? ESCAPE '\\'", f"%{escaped}%" if query else None),
            *device_terms(tags, model_version, status, seen_after, seen_before),
            (_BUSY if updating else f"NOT {_BUSY}", updating is not None),
        )
        total = self._scalar(f"SELECT count(*) FROM devices{clause}", params)
        order = _SORTS.get(sort, "id")
        rows = self._rows(f"SELECT * FROM devices{clause} ORDER BY {order} LIMIT ? OFFSET ?", [*params, limit, offset])
        return self._device_dicts(rows), int(total)

    def fleet_counts(self) -> dict[str, Any]:
        conn = self.db.conn
        live = "FROM devices WHERE revoked_at IS NULL"
        by_status = dict(conn.execute(f"SELECT status, count(*) {live} GROUP BY status").fetchall())
        updating = self._scalar(f"SELECT count(*) {live} AND {_BUSY}")
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
