"""Bounded growth: the maintenance pass that keeps the database's fast-growing tables within
their retention (docs/fleet-server.md#retention-and-disk-use). Singleton work: the leading
node's ingest worker runs it (`IngestWorker.maintain`), never a `server ingest` process.

- Feedback and monitoring rows: the partial rows of a closed bucket are merged into one (as drift
  buckets are) once they have settled (FEEDBACK_SETTLE_S: rollout gates read them by arrival).
- Drift buckets, feedback and monitoring sums: after `history_rollup_days`, one row per device,
  model version and UTC day; after `history_retention_days`, deleted.
- Audit log: rows older than `audit_retention_days` are deleted. Console sessions: deleted once
  expired (they last 12 hours). Failed-login rows: deleted as new failures come in (5 minutes).

Telemetry windows have their own pass in the ingest worker (`telemetry_retention_days`).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from typing import Any

from fleet_server.config import ServerConfig

log = logging.getLogger(__name__)

DAY_S = 86400.0
FEEDBACK_SETTLE_S = 3600.0  # partial feedback rows merge once their bucket closed this long ago
HISTORY_INTERVAL_S = 600.0  # roll-up and deletion scan old rows: at most every 10 minutes (real time)
BATCH = 2000  # rows a transaction, so the write lock is never held long
BATCHES = 5  # transactions a pass; a backlog goes over several passes


class Retention:
    """One process's maintenance pass; `run(now)` does what is due and returns what it did."""

    def __init__(self, storage: Any, config: ServerConfig, monotonic: Any = time.monotonic) -> None:
        self.storage = storage
        self.config = config
        self._monotonic = monotonic
        self._history_due = 0.0

    def run(self, now: float) -> Counter[str]:
        """`now` is the fleet clock (bucket and stored times are on it)."""
        done: Counter[str] = Counter()
        cfg = self.config
        closed = now - cfg.bucket_s - cfg.bucket_grace_s
        done["compacted_feedback"] += self._batches(
            lambda: self.storage.compact_feedback(closed, now - FEEDBACK_SETTLE_S, limit=BATCH))
        done["compacted_monitoring"] += self._batches(
            lambda: self.storage.compact_monitoring(closed, now - FEEDBACK_SETTLE_S, limit=BATCH))
        if self._monotonic() >= self._history_due:
            self._history_due = self._monotonic() + HISTORY_INTERVAL_S
            if cfg.history_rollup_days > 0:
                done["rolled_up_periods"] += self._batches(lambda: self.storage.rollup_history(
                    now - cfg.history_rollup_days * DAY_S, DAY_S, now, limit=BATCH))
                done["rolled_up_monitoring"] += self._batches(lambda: self.storage.rollup_monitoring(
                    now - cfg.history_rollup_days * DAY_S, DAY_S, limit=BATCH))
            if cfg.history_retention_days > 0:
                done["purged_history_rows"] += self._batches(lambda: self.storage.purge_history(
                    now - cfg.history_retention_days * DAY_S, limit=BATCH))
                done["purged_monitoring_rows"] += self._batches(lambda: self.storage.purge_monitoring(
                    now - cfg.history_retention_days * DAY_S, limit=BATCH))
            if cfg.audit_retention_days > 0:
                done["purged_audit_rows"] += self._batches(lambda: self.storage.purge_audit(
                    now - cfg.audit_retention_days * DAY_S, limit=BATCH))
            done["expired_sessions"] += self.storage.delete_expired_sessions(now)
        return done

    def run_all(self, now: float) -> Counter[str]:
        """Everything due regardless of the interval (tests, and a first pass after an upgrade)."""
        self._history_due = 0.0
        total: Counter[str] = Counter()
        while True:
            step = self.run(now)
            self._history_due = 0.0
            total.update(step)
            if not any(step.values()):
                return total

    @staticmethod
    def _batches(step: Any) -> int:
        total = 0
        for _ in range(BATCHES):
            n = step()
            total += n
            if n < BATCH:
                break
        return total
