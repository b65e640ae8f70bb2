"""Telemetry reads: message accounting, events, lags, samples, bandwidth, ingest worker stats."""

from __future__ import annotations

from typing import Any

import msgspec

from fleet_server.storage.postgres.connection import PostgresConnection, decode, where

_unpack = msgspec.msgpack.Decoder().decode


class TelemetryMixin(PostgresConnection):
    def worker_stats(self) -> list[dict[str, Any]]:
        return decode(self._rows("SELECT * FROM ingest_workers ORDER BY worker_id"), "stats")

    def reject_counts(self) -> list[dict[str, Any]]:
        return self._rows("SELECT * FROM rejects ORDER BY reason, device")

    def seq_stats(self, device_id: str | None = None) -> list[dict[str, Any]]:
        clause, params = where(("device = %s", device_id))
        return self._rows(f"SELECT * FROM seq_stats{clause} ORDER BY device", params)

    def events(self, device_id: str, limit: int = 100) -> list[dict[str, Any]]:
        return self._rows("SELECT * FROM events WHERE device = %s ORDER BY seq DESC LIMIT %s", [device_id, limit])

    def window_lags(self, since: float) -> list[float]:
        rows = self._rows("SELECT stored_at - sent_at AS lag FROM windows WHERE stored_at >= %s AND sent_at > 0",
                          [since])
        return [r["lag"] for r in rows]

    def recent_samples(self, device_id: str, limit: int = 200) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        if limit <= 0:
            return out
        # Windows newest first, decoded only until `limit` rows are collected; each window holds
        # at least one row, so `limit` windows are always enough.
        windows = self._rows(
            "SELECT seq, model, model_version, window_end, rows FROM samples WHERE device = %s "
            "ORDER BY seq DESC LIMIT %s",
            [device_id, limit],
        )
        for w in windows:
            for x, y in _unpack(w["rows"]):
                out.append({"seq": w["seq"], "model": w["model"], "model_version": w["model_version"],
                            "window_end": w["window_end"], "x": x, "y": y})
                if len(out) >= limit:
                    return out
        return out

    def device_bandwidth(self, device_id: str, start: float | None, step_s: float) -> list[dict[str, Any]]:
        # trunc, not a cast: SQLite's CAST truncates toward zero, PostgreSQL's rounds.
        rows = self._rows(
            "SELECT trunc(window_end / %s)::bigint AS k, count(*) AS n, coalesce(sum(bytes), 0)::bigint AS size, "
            "min(window_start) AS first FROM windows WHERE device = %s AND window_end >= %s GROUP BY k ORDER BY k",
            [step_s, device_id, start if start is not None else float("-inf")],
        )
        return [
            {"start": r["k"] * step_s, "messages": r["n"], "bytes": int(r["size"]), "first_window_start": r["first"]}
            for r in rows
        ]

    def windows_since(self, since: float, model: str) -> list[dict[str, Any]]:
        rows = self._rows(
            "SELECT device, model_version, predictions, errors, latency, prediction, shadow FROM windows "
            "WHERE stored_at >= %s AND model = %s",
            [since, model],
        )
        return decode(rows, "latency", "prediction", "shadow")
