"""The SQLite ingest write path: one batch of validated messages in one transaction, and retention.

`IngestMixin.store_batch` calls `store_batch` inside its `BEGIN IMMEDIATE`. Per batch, not per message: one statement dedupes the whole batch by
(device, seq), windows are summed per bucket once, and every table gets one `executemany`.
Each window's reservoir sample is kept in a per-device bound: one read and at most one DELETE per
device and batch, never per row.

Message accounting (`seq_stats`) is per install: one read of the batch's devices' rows, the
fresh seqs applied in seq order (`accounting.account`), one write. The same read gives each device's
retention floor (`purged_upto`): a telemetry seq at or below it was stored and purged, so it is a
duplicate without a `seqs` row to prove it.
"""

from __future__ import annotations

import sqlite3
from typing import Any

import msgspec

from fleet_server.performance import FeedbackMismatch, FeedbackSums
from fleet_server.storage.accounting import SeqAccount, account
from fleet_server.storage.base import BatchResult, IngestBatch, Reject
from fleet_server.storage.sqlite.connection import SqliteConnection, dumps
from fleet_server.storage.sqlite.monitoring import store_monitoring
from fleet_server.telemetry import BucketSums, bucket_start, sum_windows

_json = msgspec.json.Encoder()
_msgpack = msgspec.msgpack.Encoder()

INSERT_BUCKET = (
    "INSERT INTO buckets(model, model_version, device, bucket_start, windows, predictions, requests, errors, "
    "latency, latency_sum_ms, features, prediction, updated_at, compacted) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)"
)
_INSERT_WINDOW = (
    "INSERT INTO windows(device, seq, model, model_version, window_start, window_end, sent_at, stored_at, "
    "predictions, requests, errors, latency, prediction, shadow, bytes) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)"
)
_INSERT_SAMPLES = (
    "INSERT INTO samples(device, seq, model, model_version, window_end, upto, rows) VALUES (?,?,?,?,?,?,?)"
)
# The device's running count of sampled rows is the newest stored window's `upto`.
_SAMPLED_SO_FAR = (
    "SELECT device, max(upto) FROM samples WHERE device IN (SELECT value FROM json_each(?)) GROUP BY device"
)
_TRIM_SAMPLES = "DELETE FROM samples WHERE device = ? AND upto <= ?"
INSERT_FEEDBACK = (
    "INSERT INTO feedback(model, model_version, device, bucket_start, stored_at, joined, unknown_label, late, "
    "unknown, duplicate, rejected, confusion, abs_error_sum, sq_error_sum, error_bins, calibration) "
    "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)"
)
_INSERT_EVENT = (
    "INSERT INTO events(device, seq, ts, kind, from_state, to_state, event, version, rollout_id, outcome, "
    "reason, stored_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)"
)
# INSERT OR IGNORE ... RETURNING returns only the rows it inserted: the fresh (device, seq) keys
# of the whole batch in one statement, instead of one round trip per message.
_CLAIM_SEQS = (
    "INSERT OR IGNORE INTO seqs(device, seq, kind) "
    "SELECT value ->> 0, value ->> 1, value ->> 2 FROM json_each(?) RETURNING device, seq"
)
_SEQ_STATS_OF = (
    "SELECT device, first_seq, max_seq, received, dropped_total, reinstalls, reinstalled_at, purged_upto "
    "FROM seq_stats WHERE device IN (SELECT value FROM json_each(?))"
)
# Read and written in the same transaction (BEGIN IMMEDIATE), so the row is replaced whole;
# `purged_upto` belongs to the retention pass and is left as it is.
_UPSERT_SEQ_STATS = (
    "INSERT INTO seq_stats(device, first_seq, max_seq, received, dropped_total, reinstalls, reinstalled_at) "
    "VALUES (?,?,?,?,?,?,?) ON CONFLICT(device) DO UPDATE SET first_seq = excluded.first_seq, "
    "max_seq = excluded.max_seq, received = excluded.received, dropped_total = excluded.dropped_total, "
    "reinstalls = excluded.reinstalls, reinstalled_at = excluded.reinstalled_at"
)

def bucket_params(
    model: str, version: str, device: str, start: float, sums: BucketSums, now: float, compacted: int
) -> tuple:
    """Parameters of INSERT_BUCKET for one (partial or compacted) bucket row."""
    return (
        model, version, device, start, sums.windows, sums.predictions, sums.requests,
        dumps(sums.errors), dumps(sums.latency), sums.latency_sum_ms, dumps(sums.features or []),
        dumps(sums.prediction) if sums.prediction is not None else None, now, compacted,
    )


def claim_seqs(
    conn: sqlite3.Connection, keys: list[tuple[str, int, str]], floors: dict[str, int] | None = None
) -> set[tuple[str, int]]:
    """Record (device, seq, kind) keys; returns those not seen before (in this batch or earlier).

    `floors` maps a device to its retention floor: a telemetry seq at or below it was stored and
    purged since, so it is never fresh (and gets no `seqs` row again)."""
    if floors:
        keys = [
            k for k in keys
            if k[2] != "telemetry" or (floor := floors.get(k[0])) is None or k[1] > floor
        ]
    if not keys:
        return set()
    return set(conn.execute(_CLAIM_SEQS, (_json.encode(keys).decode(),)).fetchall())


def store_samples(conn: sqlite3.Connection, windows: list, keep: int) -> None:
    """Keep the reservoir samples of freshly stored windows, at most the `keep` newest rows per
    device (the oldest window still holding one of them is kept whole; readers trim it)."""
    sampled = [w for w in windows if w.sample]
    if keep <= 0 or not sampled:
        return
    devices = {w.device for w in sampled}
    upto: dict[str, int] = dict.fromkeys(devices, 0)
    upto.update(conn.execute(_SAMPLED_SO_FAR, (_json.encode(list(devices)).decode(),)).fetchall())
    for w in sampled:
        upto[w.device] += len(w.sample)
    # Newest first, so that windows a backlog burst would trim at once are never written.
    params = []
    newer = dict.fromkeys(devices, 0)
    for w in reversed(sampled):
        if newer[w.device] >= keep:
            continue
        params.append(
            (w.device, w.seq, w.model or "", w.model_version or "", w.window_end,
             upto[w.device] - newer[w.device], _msgpack.encode(w.sample))
        )
        newer[w.device] += len(w.sample)
    conn.executemany(_INSERT_SAMPLES, params)
    conn.executemany(_TRIM_SAMPLES, [(d, n - keep) for d, n in upto.items() if n > keep])


def store_feedback(conn: sqlite3.Connection, windows: list, bucket_s: float, now: float) -> list[Reject]:
    """Sum the feedback blocks of freshly stored windows per (model, version, bucket, device) into
    one row each; windows without feedback cost one attribute test. Returns malformed blocks."""
    groups: dict[tuple[str, str, float, str], FeedbackSums] = {}
    rejects: list[Reject] = []
    for w in windows:
        if w.feedback is None and not w.feedback_other:
            continue
        start = bucket_start(w, bucket_s)
        blocks = ([w.feedback] if w.feedback is not None else []) + list(w.feedback_other)
        for fb in blocks:
            key = (w.model or "", fb.version or w.model_version or "", start, w.device)
            try:
                groups.setdefault(key, FeedbackSums()).add_block(fb)
            except FeedbackMismatch as exc:
                rejects.append(Reject("feedback_mismatch", w.device, str(exc)))
    if groups:
        conn.executemany(INSERT_FEEDBACK, [feedback_params(*key, s, now) for key, s in groups.items()])
    return rejects


def feedback_params(model: str, version: str, start: float, device: str, s: FeedbackSums, now: float) -> tuple:
    """Parameters of INSERT_FEEDBACK for one summed row."""
    calibration = (
        dumps([s.calibration_counts, s.calibration_hits, s.calibration_prob_sum])
        if s.calibration_counts is not None else None
    )
    return (
        model, version, device, start, now, s.joined, s.unknown_label, s.late, s.unknown, s.duplicate,
        s.rejected, dumps(s.confusion) if s.confusion is not None else None, s.abs_error_sum, s.sq_error_sum,
        dumps(s.error_bins) if s.error_bins is not None else None, calibration,
    )


def store_batch(
    conn: sqlite3.Connection, batch: IngestBatch, bucket_s: float, now: float, samples_per_device: int = 200
) -> BatchResult:
    """Store a batch inside the caller's transaction, idempotent by (device, seq)."""
    result = BatchResult()
    seen: dict[str, float] = {}
    for device, received in [(w.device, r) for w, r, _ in batch.windows] + [(e.device, r) for e, r in batch.events]:
        if received > seen.get(device, 0.0):
            seen[device] = received

    accounts: dict[str, SeqAccount | None] = {}
    floors: dict[str, int] = {}
    if seen:
        for device, *row, floor in conn.execute(_SEQ_STATS_OF, (_json.encode(list(seen)).decode(),)):
            accounts[device] = SeqAccount(*row)
            if floor is not None:
                floors[device] = floor
    fresh = claim_seqs(
        conn,
        [(w.device, w.seq, "telemetry") for w, _, _ in batch.windows]
        + [(e.device, e.seq, "events") for e, _ in batch.events],
        floors,
    )
    fresh_seqs: dict[str, list[tuple[int, int]]] = {}  # device -> [(seq, dropped_total)]

    def first_time(device: str, seq: int, dropped: int) -> bool:
        # A key sent twice in one batch is fresh once: remove it on first use.
        try:
            fresh.remove((device, seq))
        except KeyError:
            result.duplicates += 1
            return False
        fresh_seqs.setdefault(device, []).append((seq, dropped))
        return True

    groups: dict[tuple[str, str, float, str], list] = {}
    sizes: dict[int, int] = {}
    for w, _, size in batch.windows:
        sizes[id(w)] = size
        if first_time(w.device, w.seq, w.dropped_total):
            key = (w.model or "", w.model_version or "", bucket_start(w, bucket_s), w.device)
            groups.setdefault(key, []).append(w)
    events = [e for e, _ in batch.events if first_time(e.device, e.seq, 0)]

    # One partial bucket row per (model, version, bucket, device) and batch; readers sum them.
    stored: list = []
    parts = []
    for (model, version, start, device), members in groups.items():
        sums, kept, rejected = sum_windows(members)
        result.rejects += [Reject("shape_mismatch", w.device, str(exc)) for w, exc in rejected]
        if kept:
            parts.append(bucket_params(model, version, device, start, sums, now, 0))
            stored += kept
    conn.executemany(INSERT_BUCKET, parts)
    conn.executemany(
        _INSERT_WINDOW,
        [
            (
                w.device, w.seq, w.model or "", w.model_version or "", w.window_start, w.window_end,
                w.sent_at, now, w.predictions, w.requests, sum(w.errors.values()),
                dumps(w.latency.counts), dumps(w.prediction) if w.prediction is not None else None,
                dumps(w.shadow) if w.shadow is not None else None, sizes[id(w)],
            )
            for w in stored
        ],
    )
    store_samples(conn, stored, samples_per_device)
    result.rejects += store_feedback(conn, stored, bucket_s, now)
    result.rejects += store_monitoring(conn, stored, bucket_s, now)
    result.stored_windows = len(stored)
    result.lags = [now - w.sent_at for w in stored if w.sent_at > 0]
    conn.executemany(
        _INSERT_EVENT,
        [
            (e.device, e.seq, e.ts, e.kind, e.from_state, e.to_state, e.event, e.version, e.rollout_id,
             e.outcome, e.reason, now)
            for e in events
        ],
    )
    result.stored_events = len(events)
    updated = [(d, account(accounts.get(d), seqs, now)) for d, seqs in fresh_seqs.items()]
    conn.executemany(_UPSERT_SEQ_STATS, [(d, *acc.row()) for d, acc in updated if acc is not None])

    for st, received, retained in batch.statuses:
        seen[st.device] = max(seen.get(st.device, 0.0), received)
        cond = " AND (status_ts IS NULL OR status_ts < ?)" if retained else ""
        params = [st.state, st.ts, st.device] + ([st.ts] if retained else [])
        result.snapshots += conn.execute(f"UPDATE devices SET status = ?, status_ts = ? WHERE id = ?{cond}", params).rowcount
    for rep, received in batch.reported:
        seen[rep.device] = max(seen.get(rep.device, 0.0), received)
        result.snapshots += conn.execute(
            "UPDATE devices SET reported = ?, reported_ts = ?, model = ?, active_version = ?, "
            "agent_version = ?, update_state = ? WHERE id = ? AND (reported_ts IS NULL OR reported_ts < ?)",
            (dumps(rep), rep.ts, rep.model, rep.active_version, rep.agent_version, rep.update_state,
             rep.device, rep.ts),
        ).rowcount
    conn.executemany(
        "UPDATE devices SET last_seen = max(coalesce(last_seen, 0), ?) WHERE id = ?",
        [(t, d) for d, t in seen.items()],
    )
    count_rejects(conn, batch.rejects + result.rejects, now)
    return result


def count_rejects(conn: sqlite3.Connection, rejects: list[Reject], now: float) -> None:
    """Add rejected messages to the per (reason, device) counters."""
    counts: dict[tuple[str, str], list[Any]] = {}
    for r in rejects:
        entry = counts.setdefault((r.reason, r.device), [0, r.detail])
        entry[0] += 1
        entry[1] = r.detail or entry[1]
    conn.executemany(
        "INSERT INTO rejects(reason, device, count, last_at, last_detail) VALUES (?,?,?,?,?) "
        "ON CONFLICT(reason, device) DO UPDATE SET count = count + excluded.count, "
        "last_at = excluded.last_at, last_detail = excluded.last_detail",
        [(reason, device, n, now, detail[:300]) for (reason, device), (n, detail) in counts.items()],
    )


class IngestMixin(SqliteConnection):
    """The write side of telemetry: batches from ingest, worker heartbeats, retention."""

    def store_batch(
        self, batch: IngestBatch, bucket_s: float, now: float, *, samples_per_device: int = 200
    ) -> BatchResult:
        with self._immediate() as conn:
            return store_batch(conn, batch, bucket_s, now, samples_per_device)

    def purge_telemetry(self, before: float, limit: int = 2000) -> int:
        """Delete up to `limit` windows stored before `before`, oldest first, with the telemetry
        `seqs` rows of their devices up to the new floor; returns the windows deleted.

        One short transaction per call (callers loop while it returns `limit`). Each device's
        `seq_stats.purged_upto` rises to the highest seq purged, so that a replay of a purged
        window is still a duplicate (`claim_seqs`). Events and their seqs stay."""
        with self._immediate() as conn:
            purged = conn.execute(
                "DELETE FROM windows WHERE (device, seq) IN (SELECT device, seq FROM windows "
                "WHERE stored_at < ? ORDER BY stored_at LIMIT ?) RETURNING device, seq",
                (before, limit),
            ).fetchall()
            floors: dict[str, int] = {}
            for device, seq in purged:
                if seq > floors.get(device, -1):
                    floors[device] = seq
            conn.executemany(
                "UPDATE seq_stats SET purged_upto = max(coalesce(purged_upto, ?1), ?1) WHERE device = ?2",
                [(floor, device) for device, floor in floors.items()],
            )
            # At or below the floor every telemetry seq is a duplicate anyway (and none is claimed
            # again), so one range per device: it also takes the seqs of windows refused while
            # storing (shape_mismatch), which have no windows row.
            conn.executemany(
                "DELETE FROM seqs WHERE device = ? AND seq <= ? AND kind = 'telemetry'", list(floors.items())
            )
            return len(purged)

    def put_worker_stats(self, worker_id: str, pid: int, stats: dict[str, Any], now: float) -> None:
        with self._immediate() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO ingest_workers(worker_id, pid, updated_at, stats) VALUES (?,?,?,?)",
                (worker_id, pid, now, dumps(stats)),
            )
