"""The SQLite backend: one mixin per concern, composed into `SqliteStorage`.

A sibling backend mirrors these modules file for file: connection (open, transactions, query
helpers), devices, ingest (the write path and retention), telemetry (reads), buckets (drift
buckets and feedback), models (models, keys, tokens), alerts (alerts, webhooks), console
(operators, sessions, audit, search), rollouts, migrations and backup.
"""

from __future__ import annotations

from fleet_server.storage.sqlite.alerts import AlertsMixin
from fleet_server.storage.sqlite.backup import BackupMixin
from fleet_server.storage.sqlite.buckets import BucketsMixin
from fleet_server.storage.sqlite.console import ConsoleMixin
from fleet_server.storage.sqlite.credentials import CredentialsMixin
from fleet_server.storage.sqlite.groups import GroupsMixin
from fleet_server.storage.sqlite.ingest import IngestMixin
from fleet_server.storage.sqlite.models import ModelsMixin
from fleet_server.storage.sqlite.monitoring import MonitoringMixin
from fleet_server.storage.sqlite.nodes import NodesMixin
from fleet_server.storage.sqlite.rollouts import RolloutsMixin
from fleet_server.storage.sqlite.telemetry import TelemetryMixin


class SqliteStorage(
    ConsoleMixin,  # with DevicesMixin
    IngestMixin,
    TelemetryMixin,
    BucketsMixin,
    MonitoringMixin,
    ModelsMixin,
    AlertsMixin,
    RolloutsMixin,
    CredentialsMixin,
    NodesMixin,
    GroupsMixin,
    BackupMixin,
):
    """Storage on one SQLite file; share one instance between threads (connections are per thread)."""


__all__ = ["SqliteStorage"]
