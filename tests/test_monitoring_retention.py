"""Monitoring sums under the retention pass, on every backend: a closed bucket's partial rows
are merged into one, rows older than `history_rollup_days` become one row per device, model version and UTC day whose sums equal
those of the rows they replace, and rows older than `history_retention_days` are deleted."""

from __future__ import annotations

import math

import numpy as np

from edge_agent.protocol import PerformanceEstimate, QualityCounts, ReconstructionSums, RefusedRows
from fleet_server.monitoring_sums import sum_monitoring_rows
from fleet_server.retention import DAY_S, Retention
from fleet_server.storage import IngestBatch
from tests.postgres_fixtures import db_rows, every_backend, server_storage_url  # noqa: F401 - every_backend: SQLite and PostgreSQL
from tests.server_fixtures import make_config, shifted_window

EDGES = [[-1.0, 0.0, 1.0]] * 3
DEVICES = ["dev-a", "dev-b"]
WINDOW_S = 1800.0  # two windows a bucket of 3600 s, stored in separate batches
DAYS = 3
SETTINGS = {"bucket_s": 3600.0, "bucket_grace_s": 60.0, "history_rollup_days": 1.0,
            "history_retention_days": 2.0, "telemetry_retention_days": 0.0}
QUALITY = ("nan", "below_min", "above_max", "wrong_type", "unseen")
START = 1_800_000_000.0 - 1_800_000_000.0 % DAY_S  # midnight UTC


class Clock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> float:
        return self.now


def monitored_window(device: str, seq: int, start: float, rng: np.random.Generator):
    """A window with all three monitoring blocks. Float sums are multiples of 1/64: every order of
    addition gives the same bits, so totals before and after a roll-up compare exactly."""
    w = shifted_window(device, seq, EDGES, n=20, start=start, length=WINDOW_S)
    w.sent_at = start + WINDOW_S

    def q(*shape: int) -> list:
        return (rng.integers(0, 640, size=shape) / 64).tolist()

    w.estimate = PerformanceEstimate(rows=20, predicted=rng.integers(0, 20, 2).tolist(), confusion=q(2, 2),
                                     confidence_sq_sum=float(q(1)[0]), score_counts=rng.integers(0, 9, 4).tolist(),
                                     score_positive=q(4))
    w.multivariate = ReconstructionSums(rows=20, sum=float(q(1)[0]), sum_sq=float(q(1)[0]),
                                        bins=rng.integers(0, 9, 5).tolist(), filled=int(rng.integers(0, 3)))
    w.refused = RefusedRows(rows=int(rng.integers(1, 9)), malformed=int(rng.integers(0, 2)),
                            features=[QualityCounts(**dict(zip(QUALITY, rng.integers(0, 5, 5).tolist(), strict=True)))
                                      for _ in range(3)])
    return w


def monitoring_count(storage, start: float, end: float) -> int:
    return db_rows(storage, "SELECT count(*) FROM monitoring WHERE bucket_start >= ? AND bucket_start < ?",
                   start, end)[0][0]


def test_monitoring_rows_roll_up_exactly_and_are_purged(tmp_path, request, backend):
    from fleet_server.service import bootstrap

    clock = Clock()
    cfg = make_config(tmp_path / "server", storage_url=server_storage_url(request, backend), **SETTINGS)
    storage = bootstrap(cfg, clock=clock).storage
    rng = np.random.default_rng(18)
    try:
        seq = dict.fromkeys(DEVICES, 0)
        for step in range(int(DAYS * DAY_S / WINDOW_S)):
            start = START + step * WINDOW_S
            clock.now = start + WINDOW_S
            for device in DEVICES:  # a batch per device and window: partial rows per bucket
                seq[device] += 1
                batch = IngestBatch()
                batch.windows.append((monitored_window(device, seq[device], start, rng), clock.now, 900))
                storage.store_batch(batch, cfg.bucket_s, clock.now, samples_per_device=0)

        def day(d: int, device: str | None = None) -> list[dict]:
            return storage.monitoring_rows("pump", "1.0.0", START + d * DAY_S, START + (d + 1) * DAY_S,
                                           [device] if device else None)

        before = {(d, dev): sum_monitoring_rows(day(d, dev)).to_row() for d in range(DAYS) for dev in DEVICES}
        rows_before = [monitoring_count(storage, START + d * DAY_S, START + (d + 1) * DAY_S) for d in range(DAYS)]
        assert rows_before == [len(DEVICES) * DAY_S / WINDOW_S] * DAYS
        assert all(s["est_rows"] and s["mv_rows"] and s["refused_rows"] for s in before.values())

        clock.now = START + DAYS * DAY_S  # day 0 is past retention, day 1 past roll-up, day 2 recent
        done = Retention(storage, cfg, monotonic=lambda: math.inf).run_all(clock.now)

        assert done["rolled_up_monitoring"] >= len(DEVICES) and done["purged_monitoring_rows"] > 0
        assert day(0) == []
        # Day 1: one row per device at midnight UTC, holding exactly the day's sums.
        for dev in DEVICES:
            rolled = day(1, dev)
            assert [r["bucket_start"] for r in rolled] == [START + DAY_S]
            assert sum_monitoring_rows(rolled).to_row() == before[(1, dev)]
        # Day 2: each closed bucket's two partial rows merged into one once both are an hour old
        # (compaction ran over every day first); the newest two buckets keep their two.
        buckets = int(DAY_S / cfg.bucket_s)
        assert done["compacted_monitoring"] == len(DEVICES) * (DAYS * buckets - 2)
        assert monitoring_count(storage, START + 2 * DAY_S, START + 3 * DAY_S) == len(DEVICES) * (buckets + 2)
        for dev in DEVICES:
            assert sum_monitoring_rows(day(2, dev)).to_row() == before[(2, dev)]
        # A second pass finds nothing left to do.
        again = Retention(storage, cfg, monotonic=lambda: math.inf).run_all(clock.now)
        assert not (again["compacted_monitoring"] or again["rolled_up_monitoring"] or again["purged_monitoring_rows"])
    finally:
        storage.close()
