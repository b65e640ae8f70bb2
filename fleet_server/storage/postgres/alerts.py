"""Alerts (drift and performance), the evaluator's per-series state, webhooks and deliveries."""

from __future__ import annotations

from typing import Any

from fleet_server.storage.postgres.connection import (
    PostgresConnection,
    decode,
    dumps,
    insert_row,
    loads,
    update_row,
    where,
)


class AlertsMixin(PostgresConnection):
    def open_alerts(self, model: str, version: str, scope: str, kind: str | None = None) -> list[dict[str, Any]]:
        clause, params = where(
            ("state = 'open' AND model = %s AND model_version = %s AND scope = %s", [model, version, scope]),
            ("kind = %s", kind),
        )
        return decode(self._rows(f"SELECT * FROM alerts{clause}", params), "details")

    def insert_alert(self, row: dict[str, Any]) -> int:
        with self._transaction() as conn:
            return insert_row(conn, "alerts", {**row, "details": dumps(row.get("details", {}))}, returning="id")

    def update_alert(self, alert_id: int, **fields: Any) -> None:
        if "details" in fields:
            fields["details"] = dumps(fields["details"])
        with self._transaction() as conn:
            update_row(conn, "alerts", fields, {"id": alert_id})

    def get_alert(self, alert_id: int) -> dict[str, Any] | None:
        rows = decode(self._rows("SELECT * FROM alerts WHERE id = %s", [alert_id]), "details")
        return rows[0] if rows else None

    def list_alerts(
        self,
        *,
        state: str | None = None,
        model: str | None = None,
        scope: str | None = None,
        kind: str | None = None,
        limit: int = 500,
    ) -> list[dict[str, Any]]:
        clause, params = where(("state = %s", state), ("model = %s", model), ("scope = %s", scope), ("kind = %s", kind))
        return decode(self._rows(f"SELECT * FROM alerts{clause} ORDER BY id DESC LIMIT %s", [*params, limit]), "details")

    def series_states(self, model: str, version: str, scope: str) -> dict[str, dict[str, Any]]:
        rows = self._rows(
            "SELECT series, state FROM alert_series WHERE model = %s AND model_version = %s AND scope = %s",
            [model, version, scope],
        )
        return {r["series"]: loads(r["state"]) for r in rows}

    def put_series_states(self, model: str, version: str, scope: str, states: dict[str, dict[str, Any]]) -> None:
        with self._transaction() as conn:
            conn.cursor().executemany(
                "INSERT INTO alert_series(model, model_version, scope, series, last_bucket, state) "
                "VALUES (%s,%s,%s,%s,%s,%s) ON CONFLICT (model, model_version, scope, series) "
                "DO UPDATE SET last_bucket = excluded.last_bucket, state = excluded.state",
                [
                    (model, version, scope, series, state.get("last_seen"), dumps(state))
                    for series, state in states.items()
                ],
            )

    def add_webhook(self, url: str, secret: str, now: float) -> int:
        with self._transaction() as conn:
            return insert_row(conn, "webhooks", {"url": url, "secret": secret, "created_at": now}, returning="id")

    def list_webhooks(self) -> list[dict[str, Any]]:
        return self._rows("SELECT * FROM webhooks WHERE enabled = 1 ORDER BY id")

    def delete_webhook(self, webhook_id: int) -> bool:
        with self._transaction() as conn:
            return conn.execute("DELETE FROM webhooks WHERE id = %s", (webhook_id,)).rowcount > 0

    def record_delivery(self, row: dict[str, Any]) -> None:
        with self._transaction() as conn:
            insert_row(conn, "webhook_deliveries", row)

    def deliveries(self, limit: int = 100) -> list[dict[str, Any]]:
        return self._rows("SELECT * FROM webhook_deliveries ORDER BY id DESC LIMIT %s", [limit])
