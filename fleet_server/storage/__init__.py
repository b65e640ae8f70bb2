"""Storage: the interface every service talks to, and one subpackage per backend.

Everything SQL lives under this package (`sqlite/` today, a `postgres/` sibling mirrors it file
for file); the rest of the server sees only the `Storage` Protocol and the rows it returns.
"""

from __future__ import annotations

from fleet_server.storage.base import (
    BatchResult,
    Conflict,
    IngestBatch,
    Reject,
    SnapshotFacts,
    Storage,
    StorageError,
    StorageUnavailable,
)

__all__ = ["BatchResult", "Conflict", "IngestBatch", "Reject", "SnapshotFacts", "Storage", "StorageError",
           "StorageUnavailable"]
