"""The PostgreSQL backend: one mixin per concern, composed into `PostgresStorage`.

Mirrors `fleet_server.storage.sqlite` file for file: connection (the psycopg pool, transactions,
query helpers, advisory locks), devices, ingest (the write path and retention), telemetry
(reads), buckets (drift buckets and feedback), models (models, keys, tokens), alerts (alerts,
webhooks), console (operators, sessions, audit, search), rollouts, credentials (password rotations,
download authorization), migrations and backup.
"""

from __future__ import annotations

from fleet_server.storage.postgres.alerts import AlertsMixin
from fleet_server.storage.postgres.backup import BackupMixin
from fleet_server.storage.postgres.buckets import BucketsMixin
from fleet_server.storage.postgres.console import ConsoleMixin
from fleet_server.storage.postgres.credentials import CredentialsMixin
from fleet_server.storage.postgres.groups import GroupsMixin
from fleet_server.storage.postgres.ingest import IngestMixin
from fleet_server.storage.postgres.models import ModelsMixin
from fleet_server.storage.postgres.monitoring import MonitoringMixin
from fleet_server.storage.postgres.nodes import NodesMixin
from fleet_server.storage.postgres.rollouts import RolloutsMixin
from fleet_server.storage.postgres.telemetry import TelemetryMixin


class PostgresStorage(
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
    """Storage on one PostgreSQL database through a connection pool; share one instance between
    threads. Several processes and nodes may use the same database at once."""


__all__ = ["PostgresStorage"]
