"""The storage interface every service talks to (DESIGN section 7).

Services and views never write SQL: they call these methods. `SqliteStorage`
(`fleet_server.sqlite_storage`) is the embedded implementation; a PostgreSQL one implements the
same Protocol. Rows cross the interface as plain dicts and dataclasses, already JSON-decoded.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from edge_agent.protocol import ReportedState, Status, TelemetryWindow, UpdateEvent


class StorageError(Exception):
    """Base of storage errors services translate into user-facing messages."""


class Conflict(StorageError):
    """A row with that key already exists."""


@dataclass
class Reject:
    reason: str
    device: str  # '' when unknown
    detail: str = ""


@dataclass
class IngestBatch:
    """Decoded, validated messages of one write; `received_at` per message is the broker hand-off."""

    windows: list[tuple[TelemetryWindow, float]] = field(default_factory=list)
    events: list[tuple[UpdateEvent, float]] = field(default_factory=list)
    # (status, received_at, retained): a retained copy (sent on subscribe) only applies when
    # newer; a live one always does, because the last will carries its connect-time `ts`.
    statuses: list[tuple[Status, float, bool]] = field(default_factory=list)
    reported: list[tuple[ReportedState, float]] = field(default_factory=list)
    rejects: list[Reject] = field(default_factory=list)

    def __len__(self) -> int:
        return (
            len(self.windows) + len(self.events) + len(self.statuses) + len(self.reported) + len(self.rejects)
        )


@dataclass
class BatchResult:
    stored_windows: int = 0
    stored_events: int = 0
    duplicates: int = 0
    snapshots: int = 0
    rejects: list[Reject] = field(default_factory=list)  # found while storing (e.g. shape mismatch)
    lags: list[float] = field(default_factory=list)  # stored_at - sent_at of stored windows


class Storage(Protocol):
    """Everything the fleet server persists. Implementations must be safe to share across threads
    and across processes on one database (several ingest processes write concurrently)."""

    def close(self) -> None: ...

    # ---- devices
    def insert_device(
        self, device_id: str, fleet: str, tags: dict[str, str], password_hash: str, broker_hash: str, now: float
    ) -> None: ...
    def get_device(self, device_id: str) -> dict[str, Any] | None: ...
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
    ) -> list[dict[str, Any]]: ...
    def revoke_device(self, device_id: str, now: float) -> bool: ...
    def device_password_hash(self, device_id: str) -> str | None: ...
    def broker_accounts(self) -> list[tuple[str, str]]: ...
    def active_device_ids(self) -> set[str]: ...
    def devices_generation(self) -> int: ...

    # ---- ingest
    def store_batch(self, batch: IngestBatch, bucket_s: float, now: float) -> BatchResult: ...
    def put_worker_stats(self, worker_id: str, pid: int, stats: dict[str, Any], now: float) -> None: ...
    def worker_stats(self) -> list[dict[str, Any]]: ...
    def reject_counts(self) -> list[dict[str, Any]]: ...
    def seq_stats(self, device_id: str | None = None) -> list[dict[str, Any]]: ...
    def events(self, device_id: str, limit: int = 100) -> list[dict[str, Any]]: ...
    def window_lags(self, since: float) -> list[float]: ...

    # ---- drift buckets
    def bucket_rows(
        self,
        model: str,
        version: str,
        start: float | None = None,
        end: float | None = None,
        devices: Sequence[str] | None = None,
    ) -> list[dict[str, Any]]: ...
    def device_bucket_rows(self, device_id: str, start: float | None = None) -> list[dict[str, Any]]: ...
    def bucketed_versions(self, since: float | None = None) -> list[dict[str, Any]]: ...
    def compact_buckets(self, before: float, now: float, limit: int = 5000) -> int: ...

    # ---- models and keys
    def insert_model(self, row: dict[str, Any]) -> None: ...
    def get_model(self, name: str, version: str) -> dict[str, Any] | None: ...
    def list_models(self, name: str | None = None) -> list[dict[str, Any]]: ...
    def set_model_policy(self, name: str, version: str, policy: dict[str, Any] | None) -> bool: ...
    def add_trusted_key(self, key_id: str, pem: str, comment: str, now: float) -> None: ...
    def trusted_keys(self) -> list[dict[str, Any]]: ...
    def remove_trusted_key(self, key_id: str) -> bool: ...

    # ---- API tokens
    def insert_token(self, name: str, role: str, token_hash: str, now: float) -> int: ...
    def find_token(self, token_hash: str) -> dict[str, Any] | None: ...

    # ---- alerts and webhooks
    def open_alerts(self, model: str, version: str, scope: str) -> list[dict[str, Any]]: ...
    def insert_alert(self, row: dict[str, Any]) -> int: ...
    def update_alert(self, alert_id: int, **fields: Any) -> None: ...
    def get_alert(self, alert_id: int) -> dict[str, Any] | None: ...
    def list_alerts(
        self,
        *,
        state: str | None = None,
        model: str | None = None,
        scope: str | None = None,
        limit: int = 500,
    ) -> list[dict[str, Any]]: ...
    def series_states(self, model: str, version: str, scope: str) -> dict[str, dict[str, Any]]: ...
    def put_series_states(
        self, model: str, version: str, scope: str, states: dict[str, dict[str, Any]]
    ) -> None: ...
    def add_webhook(self, url: str, secret: str, now: float) -> int: ...
    def list_webhooks(self) -> list[dict[str, Any]]: ...
    def delete_webhook(self, webhook_id: int) -> bool: ...
    def record_delivery(self, row: dict[str, Any]) -> None: ...
    def deliveries(self, limit: int = 100) -> list[dict[str, Any]]: ...
