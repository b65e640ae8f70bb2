"""The storage interface every service talks to (DESIGN section 7).

Services and views never write SQL: they call these methods. `SqliteStorage`
(`fleet_server.storage.sqlite`) is the embedded implementation; every backend implements the
same Protocol, one subpackage per backend with one module per concern. Rows cross the interface
as plain dicts and dataclasses, already JSON-decoded.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from edge_agent.protocol import ReportedState, Status, TelemetryWindow, UpdateEvent


class StorageError(Exception):
    """Base of storage errors services translate into user-facing messages."""


class Conflict(StorageError):
    """A row with that key already exists."""


class StorageUnavailable(StorageError):
    """The database cannot be reached right now (stopped, restarting, network): nothing was
    written by the call that raised it. The message names the database; callers answer 503 or
    retry, and never acknowledge what they could not store."""


@dataclass
class Reject:
    reason: str
    device: str  # '' when unknown
    detail: str = ""


@dataclass
class IngestBatch:
    """Decoded, validated messages of one write; `received_at` per message is the broker hand-off."""

    # (window, received_at, payload size in bytes as received over MQTT)
    windows: list[tuple[TelemetryWindow, float, int]] = field(default_factory=list)
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


@dataclass
class SnapshotFacts:
    """What a database snapshot holds, read from the copy: for a backup's manifest."""

    migrations: list[str]  # applied schema migrations, oldest first
    counts: dict[str, int]  # rows of the main tables
    bundle_files: list[str]  # bundle files (relative to the data dir) the models reference


class Storage(Protocol):
    """Everything the fleet server persists. Implementations must be safe to share across threads
    and across processes on one database (several ingest processes write concurrently)."""

    def close(self) -> None: ...
    def backup_to(self, dest: Path) -> SnapshotFacts:
        """Write a consistent snapshot of the whole database (one moment, writers not blocked) to
        the file `dest`, check it, and return what it holds."""
        ...

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

    # ---- device credentials (fleet_server.rotation, fleet_server.download_access)
    def put_rotation(self, device_id: str, rotation_id: str, requested_by: str, now: float, expires_at: float) -> None:
        """Open a password rotation for the device, replacing its previous one."""
        ...
    def get_rotation(self, device_id: str) -> dict[str, Any] | None: ...
    def rotations_to_announce(self, now: float) -> list[dict[str, Any]]: ...
    def mark_rotation_notified(self, device_id: str, rotation_id: str, now: float) -> None: ...
    def issue_rotation(
        self, device_id: str, rotation_id: str, password_hash: str, broker_hash: str, now: float
    ) -> bool: ...
    def confirm_rotation(self, device_id: str, rotation_id: str, now: float) -> bool:
        """The issued password becomes the device's (both hashes) in one transaction, which bumps
        `devices_generation`; False when no issued password is pending for that rotation."""
        ...
    def device_told_versions(self, device_id: str) -> set[tuple[str, str]]:
        """(model, version) pairs the server told the device to take: its desired state, and the
        version and previous version of every rollout it took part in."""
        ...

    # ---- ingest
    def store_batch(
        self, batch: IngestBatch, bucket_s: float, now: float, *, samples_per_device: int = 200
    ) -> BatchResult: ...
    def put_worker_stats(self, worker_id: str, pid: int, stats: dict[str, Any], now: float) -> None: ...
    def worker_stats(self) -> list[dict[str, Any]]: ...
    def reject_counts(self) -> list[dict[str, Any]]: ...
    def seq_stats(self, device_id: str | None = None) -> list[dict[str, Any]]:
        """Message accounting per device: device, first_seq, max_seq, received, dropped_total (of the
        current install), reinstalls, reinstalled_at, purged_upto (highest telemetry seq purged)."""
        ...
    def purge_telemetry(self, before: float, limit: int = 2000) -> int:
        """Telemetry retention: delete up to `limit` windows stored before `before` (oldest first) and
        their telemetry seqs, in one short transaction, raising each device's `purged_upto` so that
        replays of them stay duplicates; returns how many windows went. Events are never purged."""
        ...
    def events(self, device_id: str, limit: int = 100) -> list[dict[str, Any]]: ...
    def window_lags(self, since: float) -> list[float]: ...
    def recent_samples(self, device_id: str, limit: int = 200) -> list[dict[str, Any]]:
        """The device's most recent sampled rows, newest window first: seq, model, model_version,
        window_end, x (features turned off on the device are None), y."""
        ...
    def device_bandwidth(self, device_id: str, start: float | None, step_s: float) -> list[dict[str, Any]]:
        """Telemetry messages and payload bytes per `step_s` interval of window end time, from `start`:
        rows of start (of the interval), messages, bytes, oldest first."""
        ...

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

    # ---- ground-truth feedback (rows carry the fields of performance.FeedbackSums)
    def feedback_rows(
        self,
        model: str,
        version: str | None = None,
        start: float | None = None,
        end: float | None = None,
        devices: Sequence[str] | None = None,
    ) -> list[dict[str, Any]]: ...
    def feedback_since(self, model: str, since: float) -> list[dict[str, Any]]:
        """Feedback rows of every version of `model` stored at or after `since`."""
        ...
    def feedback_versions(self) -> list[dict[str, Any]]: ...
    # Bounded growth (fleet_server.retention): feedback merged like buckets, old rows rolled up, the oldest deleted.
    def compact_feedback(self, before: float, settled_before: float, limit: int = 2000) -> int:
        """Merge the partial feedback rows of buckets started before `before` whose rows were all
        stored before `settled_before`; returns the rows removed."""
        ...
    def rollup_history(self, before: float, period_s: float, now: float, limit: int = 2000) -> int:
        """Roll drift-bucket and feedback rows of buckets started before `before` up into one row
        per (model, version, device, period); returns the rows removed."""
        ...
    def purge_history(self, before: float, limit: int = 5000) -> int:
        """Delete drift-bucket and feedback rows of buckets started before `before`."""
        ...

    # ---- monitoring sums (rows carry bucket keys, stored_at and the fields of
    # monitoring_sums.MonitoringSums)
    def monitoring_rows(
        self,
        model: str,
        version: str | None = None,
        start: float | None = None,
        end: float | None = None,
        devices: Sequence[str] | None = None,
    ) -> list[dict[str, Any]]: ...
    def monitoring_since(self, model: str, since: float) -> list[dict[str, Any]]:
        """Monitoring rows of every version of `model` stored at or after `since`."""
        ...
    def monitoring_versions(self) -> list[dict[str, Any]]: ...
    # Bounded growth (fleet_server.retention), with drift buckets and feedback.
    def compact_monitoring(self, before: float, settled_before: float, limit: int = 2000) -> int:
        """Merge the partial monitoring rows of buckets started before `before` whose rows were
        all stored before `settled_before`; returns the buckets merged."""
        ...
    def rollup_monitoring(self, before: float, period_s: float, limit: int = 2000) -> int:
        """Roll monitoring rows of buckets started before `before` up into one exact sum per
        (model, version, device, period); returns the period rows written."""
        ...
    def purge_monitoring(self, before: float, limit: int = 5000) -> int:
        """Delete monitoring rows of buckets started before `before`; returns the rows deleted."""
        ...

    # ---- models and keys
    def insert_model(self, row: dict[str, Any]) -> None: ...
    def put_bundle(self, sha256: str, data: bytes) -> None:
        """Keep a bundle's bytes (content-addressed) where every node of the deployment reads them;
        idempotent. A backend for one machine keeps none (SQLite: the data dir's bundles/ has them)."""
        ...
    def bundle_bytes(self, sha256: str) -> bytes | None:
        """The bytes `put_bundle` kept, or None (not kept, or a backend that keeps none)."""
        ...
    def get_model(self, name: str, version: str) -> dict[str, Any] | None: ...
    def list_models(self, name: str | None = None) -> list[dict[str, Any]]: ...
    def set_model_policy(self, name: str, version: str, policy: dict[str, Any] | None) -> bool: ...
    def add_trusted_key(self, key_id: str, pem: str, comment: str, now: float) -> None: ...
    def trusted_keys(self) -> list[dict[str, Any]]: ...
    def remove_trusted_key(self, key_id: str) -> bool: ...
    def revoked_keys(self) -> list[dict[str, Any]]: ...
    def revoke_key(self, key_id: str, now: float, reason: str) -> bool:
        """Record a revoked signing key; False when it already was."""
        ...

    # ---- API tokens
    def insert_token(self, name: str, role: str, token_hash: str, now: float,
                     expires_at: float | None = None) -> int: ...
    def find_token(self, token_hash: str) -> dict[str, Any] | None:
        """id, name, role, created_at and expires_at of an unrevoked token."""
        ...

    # ---- alerts and webhooks
    def open_alerts(self, model: str, version: str, scope: str, kind: str | None = None) -> list[dict[str, Any]]: ...
    def insert_alert(self, row: dict[str, Any]) -> int: ...
    def update_alert(self, alert_id: int, **fields: Any) -> None: ...
    def get_alert(self, alert_id: int) -> dict[str, Any] | None: ...
    def list_alerts(
        self,
        *,
        state: str | None = None,
        model: str | None = None,
        scope: str | None = None,
        kind: str | None = None,
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

    # ---- console: operator accounts, sessions, audit log, device search and fleet counts
    def insert_operator(self, name: str, role: str, password_hash: str, now: float) -> None: ...
    def set_operator(self, name: str, *, role: str | None = None, password_hash: str | None = None,
                     disabled_at: float | None = None) -> bool: ...
    def get_operator(self, name: str) -> dict[str, Any] | None: ...
    def list_operators(self) -> list[dict[str, Any]]: ...
    def insert_session(self, id_hash: str, operator: str, csrf_token: str, now: float, expires_at: float) -> None: ...
    def find_session(self, id_hash: str, now: float) -> dict[str, Any] | None: ...
    def delete_session(self, id_hash: str) -> None: ...
    def delete_expired_sessions(self, now: float) -> int: ...
    def insert_audit(self, row: dict[str, Any]) -> int: ...
    def purge_audit(self, before: float, limit: int = 5000) -> int:
        """Delete up to `limit` audit rows written before `before`, oldest first; returns how many."""
        ...
    # Failed console logins by key (`n:NAME`, `a:ADDRESS`), shared by every server process.
    def add_login_failure(self, keys: Sequence[str], at: float, forget_before: float) -> None:
        """Record one failure under each key; failures at or before `forget_before` are dropped."""
        ...
    def login_failures(self, keys: Sequence[str], since: float) -> dict[str, list[float]]:
        """The times of each key's failures after `since`, oldest first (every key present)."""
        ...
    def clear_login_failures(self, key: str) -> None: ...
    def recent_login_failures(self, since: float) -> list[dict[str, Any]]:
        """Every key with failures after `since`: `{"key", "times"}` (times oldest first)."""
        ...
    def list_audit(self, *, target_prefix: str | None = None, limit: int = 100) -> list[dict[str, Any]]: ...
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
    ) -> tuple[list[dict[str, Any]], int]: ...
    def fleet_counts(self) -> dict[str, Any]: ...

    # ---- server nodes (fleet_server.cluster)
    def put_node(self, row: dict[str, Any]) -> None:
        """Insert or replace a node's row: node_id, host, pid, version, url, started_at,
        heartbeat_at, heartbeat_s (its heartbeat interval), leader (it held leadership then)."""
        ...
    def list_nodes(self) -> list[dict[str, Any]]:
        """Every node that ever heartbeated, oldest start first (leader as a bool)."""
        ...

    def set_device_tags(self, device_id: str, tags: dict[str, str]) -> bool:
        """Replace a device's tags; False when there is no such device."""
        ...

    # ---- saved device groups (fleet_server.device_groups)
    def put_device_group(self, row: dict[str, Any]) -> None:
        """Insert or replace a group: name, query (fleet_server.group_query), description,
        created_at, created_by, updated_at."""
        ...
    def get_device_group(self, name: str) -> dict[str, Any] | None: ...
    def list_device_groups(self) -> list[dict[str, Any]]:
        """Every saved group, by name."""
        ...
    def delete_device_group(self, name: str) -> bool:
        """Remove a group; False when there was none."""
        ...

    # ---- rollouts (state of the rollout controller; see fleet_server.rollouts)
    def insert_rollout(self, row: dict[str, Any], audit: tuple[str, str, dict[str, Any]]) -> None: ...
    def get_rollout(self, rollout_id: str) -> dict[str, Any] | None: ...
    def list_rollouts(self, *, states: Sequence[str] | None = None, limit: int = 100) -> list[dict[str, Any]]: ...
    def update_rollout(
        self,
        rollout_id: str,
        fields: dict[str, Any],
        now: float,
        *,
        expect: dict[str, Any] | None = None,
        audit: Sequence[tuple[str, str, dict[str, Any]]] = (),
    ) -> bool: ...
    def rollout_devices(self, rollout_id: str | None = None, *, active: bool = False,
                        devices: Sequence[str] | None = None) -> list[dict[str, Any]]:
        """Member rows, by rollout, stage and device; `devices`: only those of `rollout_id`."""
        ...
    def put_rollout_devices(self, rows: Sequence[dict[str, Any]]) -> None: ...

    # What the controller's pass asks the database instead of walking the fleet in Python.
    def rollout_assignments(self, rollout_id: str) -> list[tuple[str, int, str, str, float]]:
        """(device, stage, mode, status, since) of every device the rollout took, in no order;
        `since`: when it was last told (desired_at, else assigned_at), what its timeout counts from."""
        ...
    def device_changes(self, since: int | None) -> tuple[int, list[str]]:
        """(cursor, devices): the devices whose reported state, online status, active version,
        update state or revocation changed, that sent a failure event or were told a new desired
        state after `cursor` (a value this method returned); `since=None`: no devices, the cursor
        of now. A device may come back again (never is one missed); pass the cursor next time."""
        ...
    def set_rollout_device_statuses(self, rollout_id: str, statuses: Sequence[tuple[str, str]], now: float) -> None:
        """Set (device, status) pairs of the rollout's devices, with status_at = now."""
        ...
    def rollout_devices_to_tell(self, rollout_id: str, model: str, version: str, *,
                                every_reported: bool = False,
                                devices: Sequence[str] | None = None) -> list[dict[str, Any]]:
        """Member rows of registered devices that have reported a state and either were last told
        something other than (model, version, their mode, this rollout) or have no previous
        version while they report another one active (every such device: `every_reported`).
        Each row adds `active_version` and `told` (what the device was last told, or None).
        `devices`: look at these members only."""
        ...
    def rollout_status_changes(self, rollout_id: str, version: str, now: float, timeout_s: float, *,
                               failed_outcomes: Sequence[str], probation_states: Sequence[str],
                               devices: Sequence[str] | None = None) -> list[tuple[str, str, bool]]:
        """(device, status, on probation) for the rollout's devices whose status, derived as
        `fleet_server.rollouts.device_status.device_status` derives it (a revoked device counts as
        one that never reported), differs from the stored one, and for those updated live that
        have not committed the version (on probation: True). `devices`: look at these only."""
        ...
    def device_ids(self, *, tags: dict[str, str] | None = None) -> list[str]:
        """Registered (not revoked) devices carrying every tag given, in no order."""
        ...
    def device_tag_map(self, devices: Sequence[str] | None = None) -> dict[str, dict[str, str]]:
        """Tags of the registered devices (all, or those of `devices` that are registered)."""
        ...
    def device_reports(self, devices: Sequence[str]) -> dict[str, dict[str, Any]]:
        """For each registered device of `devices`: its status, active_version and reported state."""
        ...
    def devices_without_desired(self) -> list[str]:
        """Registered devices that were never told a desired state, by id."""
        ...

    def add_rollout_audit(self, rollout_id: str, actor: str, action: str, detail: dict[str, Any], now: float) -> None: ...
    def rollout_audit(self, rollout_id: str, limit: int = 1000) -> list[dict[str, Any]]: ...
    def device_desired(self) -> dict[str, dict[str, Any]]: ...
    def put_device_desired(self, device_id: str, row: dict[str, Any]) -> None: ...
    def fleet_targets(self) -> list[dict[str, Any]]: ...
    def set_fleet_target(
        self, model: str, target: dict[str, Any], version: str | None, rollout_id: str | None, now: float
    ) -> None: ...
    def windows_since(self, since: float, model: str) -> list[dict[str, Any]]: ...
    def rollout_events(self, rollout_id: str, since: float = 0.0) -> list[dict[str, Any]]: ...
