"""Bounded growth: eight simulated days of a small fleet on a controlled clock, through the real
ingest write path and the real maintenance passes, with short retention settings. Every table
that grows with time stays within the bound docs/fleet-server.md states, the database's used
pages stop growing once the retention horizon is reached, and compaction and roll-up keep every
count (the fleet's feedback and drift sums are the same before and after)."""

from __future__ import annotations

import math
from collections import Counter

from edge_agent.protocol import Feedback
from fleet_server.performance import sum_feedback_rows
from fleet_server.retention import DAY_S, Retention
from fleet_server.storage import IngestBatch
from tests.postgres_fixtures import db_rows, every_backend, server_storage_url  # noqa: F401 - every_backend: SQLite and PostgreSQL
from tests.server_fixtures import make_config, shifted_window

EDGES = [[-1.0, 0.0, 1.0]] * 3
DEVICES = [f"dev-{i}" for i in range(4)]
WINDOW_S = 150.0  # two windows a 300 s bucket, stored in separate batches: partial rows to merge
DAYS = 8
SETTINGS = {"bucket_s": 300.0, "bucket_grace_s": 60.0, "telemetry_retention_days": 2.0,
            "history_rollup_days": 1.0, "history_retention_days": 4.0, "audit_retention_days": 4.0,
            "samples_per_device": 10}
START = 1_800_000_000.0 - 1_800_000_000.0 % DAY_S  # midnight UTC


class Clock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> float:
        return self.now


def bounds(cfg) -> dict[str, float]:
    """The documented bounds, per device and model version (docs/fleet-server.md), plus one
    maintenance interval (an hour here) of rows not yet merged, rolled up or deleted."""
    hour = 3600.0
    per_bucket = (cfg.history_rollup_days * DAY_S + hour) / cfg.bucket_s
    return {
        "windows": (cfg.telemetry_retention_days * DAY_S + hour) / WINDOW_S,
        # bucket resolution for history_rollup_days (the newest hour still partial: 2 rows a
        # bucket), then a row a day up to history_retention_days
        "buckets": per_bucket + hour / cfg.bucket_s + cfg.history_retention_days + 1,
        "feedback": per_bucket + 2 * hour / cfg.bucket_s + cfg.history_retention_days + 1,
    }


def used_bytes(storage) -> int:
    conn = storage.db.conn
    pages = conn.execute("PRAGMA page_count").fetchone()[0] - conn.execute("PRAGMA freelist_count").fetchone()[0]
    return pages * conn.execute("PRAGMA page_size").fetchone()[0]


def counts(storage) -> dict[str, int]:
    return {t: db_rows(storage, f"SELECT count(*) FROM {t}")[0][0]  # noqa: S608 - fixed names
            for t in ("windows", "buckets", "feedback", "audit_log", "console_sessions", "seqs")}


def totals(storage) -> tuple[int, int, int]:
    """Predictions in drift buckets, labels and correct answers in feedback, over all history."""
    predictions = db_rows(storage, "SELECT coalesce(sum(predictions), 0) FROM buckets")[0][0]
    rows = storage.feedback_rows("pump")
    sums = sum_feedback_rows(rows)
    return predictions, sums.joined, sums.correct


def test_eight_days_stay_within_the_documented_bounds(tmp_path):
    from fleet_server.console.accounts import create_operator, record_audit
    from fleet_server.ingest import IngestWorker
    from fleet_server.service import bootstrap

    clock = Clock()
    cfg = make_config(tmp_path / "server", **SETTINGS)
    svc = bootstrap(cfg, clock=clock)
    create_operator(svc, "olga", "operator", "a-long-enough-password")
    storage = svc.storage
    # The ingest worker's own maintenance pass (not started: no MQTT), every pass doing all that is due.
    worker = IngestWorker(cfg, storage, clock=clock)
    worker.retention = Retention(storage, cfg, monotonic=lambda: math.inf)
    limit = bounds(cfg)
    seq = Counter()
    daily: list[int] = []
    try:
        steps_per_day = int(DAY_S / WINDOW_S)
        for step in range(DAYS * steps_per_day):
            clock.now = START + (step + 1) * WINDOW_S
            batch = IngestBatch()  # a bucket's two windows come in two batches: partial rows to merge
            for device in DEVICES:
                seq[device] += 1
                w = shifted_window(device, seq[device], EDGES, n=40, start=clock.now - WINDOW_S, length=WINDOW_S)
                w.sent_at = clock.now
                w.feedback = Feedback(version="1.0.0", joined=4, confusion=[[2, 1], [0, 1]])
                batch.windows.append((w, clock.now, 800))
            storage.store_batch(batch, cfg.bucket_s, clock.now, samples_per_device=cfg.samples_per_device)
            if step % int(3600 / WINDOW_S) == 0:  # hourly: API calls audited, a maintenance pass
                for _ in range(5):
                    record_audit(svc, action="devices.list", outcome="ok", actor="grafana", role="viewer")
                if step % steps_per_day == 0:
                    storage.insert_session(f"s{step}", "olga", "csrf", clock.now, clock.now + 12 * 3600)
                worker._compact()
                worker._purge()
                worker._retention()
                rows = counts(storage)
                n = len(DEVICES)
                for table in ("windows", "buckets", "feedback"):
                    assert rows[table] <= n * limit[table], (table, rows[table], n * limit[table], step)
                assert rows["audit_log"] <= (cfg.audit_retention_days * 24 + 1) * 5
                assert rows["console_sessions"] <= 2
            if (step + 1) % steps_per_day == 0:
                daily.append(used_bytes(storage))
        # Something was merged, rolled up and deleted at every level.
        done = worker.stats.counters
        assert done["purged_windows"]
        assert done["compacted_feedback"] and done["rolled_up_periods"] and done["purged_history_rows"]
        assert done["purged_audit_rows"] and done["expired_sessions"]
        # Past the horizon (retention 4 days, plus the day being rolled up) the used pages stop growing.
        steady = daily[int(cfg.history_retention_days) + 1:]
        assert max(steady) <= 1.05 * steady[0], daily
        assert daily[-1] < 2 * daily[1], daily  # not the ten-fold a database without retention reaches
    finally:
        storage.close()


def test_compaction_and_roll_up_keep_every_count(tmp_path, request, backend):
    from fleet_server.service import bootstrap

    clock = Clock()
    cfg = make_config(tmp_path / "server", storage_url=server_storage_url(request, backend),
                      **{**SETTINGS, "history_retention_days": 0.0})
    svc = bootstrap(cfg, clock=clock)
    storage = svc.storage
    try:
        for step in range(int(2 * DAY_S / WINDOW_S)):
            clock.now = START + (step + 1) * WINDOW_S
            batch = IngestBatch()
            w = shifted_window("dev-a", step + 1, EDGES, n=30, start=clock.now - WINDOW_S, length=WINDOW_S)
            w.feedback = Feedback(version="1.0.0", joined=3, confusion=[[1, 1], [0, 1]])
            batch.windows.append((w, clock.now, 500))
            storage.store_batch(batch, cfg.bucket_s, clock.now, samples_per_device=0)
        before, rows_before = totals(storage), counts(storage)
        clock.now += DAY_S  # day 1 is past history_rollup_days now
        done = Retention(storage, cfg, monotonic=lambda: math.inf).run_all(clock.now)
        after, rows_after = totals(storage), counts(storage)
        assert after == before and before[1] > 0
        assert rows_after["feedback"] < rows_before["feedback"] / 4 and rows_after["buckets"] < rows_before["buckets"] / 4
        assert done["compacted_feedback"] and done["rolled_up_periods"]
        # The rolled-up days are single rows at midnight UTC.
        old = storage.feedback_rows("pump", end=START + DAY_S)
        assert [r["bucket_start"] for r in old] == [START]
    finally:
        storage.close()
