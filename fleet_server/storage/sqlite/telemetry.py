"""Telemetry reads: message accounting, events, lags, samples, bandwidth, ingest worker stats."""

from __future__ import annotations

from typing import Any

import msgspec

from fleet_server.storage.sqlite.connection import SqliteConnection, decode, where

_unpack = msgspec.msgpack.Decoder().decode


class TelemetryMixin(SqliteConnection):
    def worker_stats(self) -> list[dict[str, Any]]:
        return decode(self._rows("SELECT * FROM ingest_workers ORDER BY worker_id"), "stats")

    def reject_counts(self) -> list[dict[str, Any]]:
        return self._rows("SELECT * FROM rejects ORDER BY reason, device")

    def seq_stats(self, device_id: str | None = None) -> list[dict[str, Any]]:
        clause, params = where(("device = ?", device_id))
        return self._rows(f"SELECT * FROM seq_stats{clause} ORDER BY device", params)

    def events(self, device_id: str, limit: int = 100) -> list[dict[str, Any]]:
        return self._rows("SELECT * FROM events WHERE device = ? ORDER BY seq DESC LIMIT ?", [device_id, limit])

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

    def windows_since(self, since: float, model: str) -> list[dict[str, Any]]:
        rows = self._rows(
            "SELECT device, model_version, predictions, errors, latency, prediction, shadow FROM windows "
            "WHERE stored_at >= ? AND model = ?",
            [since, model],
        )
        return decode(rows, "latency", "prediction", "shadow")
