"""The SQLite schema as numbered migrations (sqlite_utils.Migrations: one transaction each, recorded).

Never edit a migration that has shipped: add the next number to SCRIPTS. Counts are stored as
compact JSON arrays so that roll-ups are element-wise sums (DESIGN section 5).
"""

from __future__ import annotations

from collections.abc import Callable

from sqlite_utils import Database
from sqlite_utils.migrations import Migrations

from fleet_server.storage.base import StorageError

MIGRATIONS_TABLE = Migrations.migrations_table

SCRIPTS: list[tuple[str, str]] = []  # (name, SQL script), applied in this order

SCRIPTS.append(("0001_initial", """
        CREATE TABLE devices (
            id TEXT PRIMARY KEY,
            fleet TEXT NOT NULL,
            created_at REAL NOT NULL,
            revoked_at REAL,
            password_hash TEXT NOT NULL,          -- argon2id, for HTTP downloads
            broker_hash TEXT NOT NULL,            -- mosquitto $7$ PBKDF2-SHA512, for the password file
            status TEXT NOT NULL DEFAULT 'unknown',
            status_ts REAL,
            last_seen REAL,
            reported TEXT,                        -- latest ReportedState as JSON
            reported_ts REAL,
            model TEXT,
            active_version TEXT,
            agent_version TEXT,
            update_state TEXT
        );
        CREATE TABLE device_tags (
            device TEXT NOT NULL REFERENCES devices(id) ON DELETE CASCADE,
            key TEXT NOT NULL,
            value TEXT NOT NULL,
            PRIMARY KEY (device, key)
        ) WITHOUT ROWID;
        CREATE INDEX device_tags_kv ON device_tags(key, value);

        -- One row per (device, seq) over telemetry AND events: the dedupe key.
        CREATE TABLE seqs (
            device TEXT NOT NULL,
            seq INTEGER NOT NULL,
            kind TEXT NOT NULL,
            PRIMARY KEY (device, seq)
        ) WITHOUT ROWID;
        CREATE TABLE seq_stats (
            device TEXT PRIMARY KEY,
            first_seq INTEGER NOT NULL,
            max_seq INTEGER NOT NULL,
            received INTEGER NOT NULL,
            dropped_total INTEGER NOT NULL DEFAULT 0
        );
        CREATE TABLE windows (
            device TEXT NOT NULL,
            seq INTEGER NOT NULL,
            model TEXT NOT NULL,
            model_version TEXT NOT NULL,
            window_start REAL NOT NULL,
            window_end REAL NOT NULL,
            sent_at REAL NOT NULL,
            stored_at REAL NOT NULL,
            predictions INTEGER NOT NULL,
            requests INTEGER NOT NULL,
            errors INTEGER NOT NULL,
            PRIMARY KEY (device, seq)
        ) WITHOUT ROWID;
        CREATE INDEX windows_stored_at ON windows(stored_at);

        -- Per (model version, device, bucket) sums; every roll-up is a sum of these rows.
        CREATE TABLE buckets (
            model TEXT NOT NULL,
            model_version TEXT NOT NULL,
            device TEXT NOT NULL,
            bucket_start REAL NOT NULL,
            windows INTEGER NOT NULL,
            predictions INTEGER NOT NULL,
            requests INTEGER NOT NULL,
            errors TEXT NOT NULL,                 -- {"kind": count}
            latency TEXT NOT NULL,                -- [counts over LATENCY_EDGES_MS]
            latency_sum_ms REAL NOT NULL,
            features TEXT NOT NULL,               -- [[bins..., nan, below_min, above_max, unseen], ...]
            prediction TEXT,                      -- same packing, or null
            updated_at REAL NOT NULL,
            PRIMARY KEY (model, model_version, bucket_start, device)
        ) WITHOUT ROWID;
        CREATE INDEX buckets_device ON buckets(device, bucket_start);

        CREATE TABLE events (
            device TEXT NOT NULL,
            seq INTEGER NOT NULL,
            ts REAL NOT NULL,
            kind TEXT NOT NULL,
            from_state TEXT,
            to_state TEXT,
            event TEXT,
            version TEXT,
            rollout_id TEXT,
            outcome TEXT,
            reason TEXT,
            stored_at REAL NOT NULL,
            PRIMARY KEY (device, seq)
        ) WITHOUT ROWID;

        CREATE TABLE rejects (
            reason TEXT NOT NULL,
            device TEXT NOT NULL,                 -- '' when the topic names no valid device
            count INTEGER NOT NULL,
            last_at REAL NOT NULL,
            last_detail TEXT,
            PRIMARY KEY (reason, device)
        ) WITHOUT ROWID;
        CREATE TABLE ingest_workers (
            worker_id TEXT PRIMARY KEY,
            pid INTEGER,
            updated_at REAL NOT NULL,
            stats TEXT NOT NULL                   -- JSON: counters and lag percentiles
        );

        CREATE TABLE models (
            name TEXT NOT NULL,
            version TEXT NOT NULL,
            sha256 TEXT NOT NULL,
            size INTEGER NOT NULL,
            key_id TEXT,
            manifest TEXT NOT NULL,
            file TEXT NOT NULL,                   -- relative to the data dir
            uploaded_at REAL NOT NULL,
            policy TEXT,                          -- per-model drift policy override (JSON)
            PRIMARY KEY (name, version)
        );
        CREATE TABLE trusted_keys (
            key_id TEXT PRIMARY KEY,
            pem TEXT NOT NULL,
            comment TEXT,
            added_at REAL NOT NULL
        );
        CREATE TABLE tokens (
            id INTEGER PRIMARY KEY,
            name TEXT NOT NULL,
            role TEXT NOT NULL,
            token_hash TEXT NOT NULL UNIQUE,
            created_at REAL NOT NULL,
            revoked_at REAL
        );

        CREATE TABLE alerts (
            id INTEGER PRIMARY KEY,
            model TEXT NOT NULL,
            model_version TEXT NOT NULL,
            scope TEXT NOT NULL,                  -- fleet | device:ID | tag:KEY=VALUE
            target TEXT NOT NULL,                 -- feature name, or the prediction
            target_index INTEGER,                 -- feature index; null for the prediction
            severity TEXT NOT NULL,               -- warn | alert
            state TEXT NOT NULL,                  -- open | resolved
            value REAL,
            opened_at REAL NOT NULL,
            bucket_start REAL NOT NULL,
            resolved_at REAL,
            acknowledged_at REAL,
            acknowledged_by TEXT,
            details TEXT NOT NULL
        );
        CREATE INDEX alerts_state ON alerts(state, model, model_version, scope);
        -- The alert evaluator's state per series (scope x feature), so evaluation resumes
        -- after a restart without re-reading history.
        CREATE TABLE alert_series (
            model TEXT NOT NULL,
            model_version TEXT NOT NULL,
            scope TEXT NOT NULL,
            series TEXT NOT NULL,                 -- feature index, or 'prediction'
            last_bucket REAL,
            state TEXT NOT NULL,
            PRIMARY KEY (model, model_version, scope, series)
        ) WITHOUT ROWID;
        CREATE TABLE webhooks (
            id INTEGER PRIMARY KEY,
            url TEXT NOT NULL,
            secret TEXT NOT NULL,
            created_at REAL NOT NULL,
            enabled INTEGER NOT NULL DEFAULT 1
        );
        CREATE TABLE webhook_deliveries (
            id INTEGER PRIMARY KEY,
            webhook_id INTEGER NOT NULL,
            alert_id INTEGER NOT NULL,
            transition TEXT NOT NULL,
            ok INTEGER NOT NULL,
            attempts INTEGER NOT NULL,
            status_code INTEGER,
            error TEXT,
            at REAL NOT NULL
        );
        CREATE TABLE meta (
            key TEXT PRIMARY KEY,
            value TEXT NOT NULL
        );
        INSERT INTO meta(key, value) VALUES ('devices_generation', '0');
"""))

# Ingest appends one partial row per (key, batch) instead of read-modify-write of a single
# row (3x faster at thousands of windows a second); a loop compacts closed buckets later.
# Readers always sum, so partial rows and compacted rows mean the same numbers.
SCRIPTS.append(("0002_bucket_parts", """
        CREATE TABLE buckets_new (
            id INTEGER PRIMARY KEY,
            model TEXT NOT NULL,
            model_version TEXT NOT NULL,
            device TEXT NOT NULL,
            bucket_start REAL NOT NULL,
            windows INTEGER NOT NULL,
            predictions INTEGER NOT NULL,
            requests INTEGER NOT NULL,
            errors TEXT NOT NULL,
            latency TEXT NOT NULL,
            latency_sum_ms REAL NOT NULL,
            features TEXT NOT NULL,
            prediction TEXT,
            updated_at REAL NOT NULL,
            compacted INTEGER NOT NULL DEFAULT 0
        );
        INSERT INTO buckets_new(model, model_version, device, bucket_start, windows, predictions, requests,
            errors, latency, latency_sum_ms, features, prediction, updated_at, compacted)
            SELECT model, model_version, device, bucket_start, windows, predictions, requests, errors, latency,
            latency_sum_ms, features, prediction, updated_at, 1 FROM buckets;
        DROP TABLE buckets;
        ALTER TABLE buckets_new RENAME TO buckets;
        CREATE INDEX buckets_key ON buckets(model, model_version, bucket_start, device);
        CREATE INDEX buckets_device ON buckets(device, bucket_start);
        CREATE INDEX buckets_pending ON buckets(compacted, bucket_start);
"""))

# The rollout controller's whole state, so that a restarted server continues where it was.
# Windows keep their latency, prediction and shadow counts so that gates compare cohorts
# over exactly the windows received since a stage started (buckets are too coarse).
SCRIPTS.append(("0003_rollouts", """
        CREATE TABLE rollouts (
            id TEXT PRIMARY KEY,
            name TEXT NOT NULL DEFAULT '',
            model TEXT NOT NULL,
            version TEXT NOT NULL,
            spec TEXT NOT NULL,                   -- RolloutSpec as JSON
            state TEXT NOT NULL,                  -- running | paused | completed | aborting | aborted
            stage INTEGER NOT NULL DEFAULT 0,
            stage_started_at REAL NOT NULL,
            created_at REAL NOT NULL,
            created_by TEXT NOT NULL DEFAULT '',
            updated_at REAL NOT NULL,
            finished_at REAL,
            reason TEXT,                          -- why it is paused, aborting or aborted
            gates TEXT,                           -- latest gate results of the current stage (JSON)
            stages TEXT NOT NULL DEFAULT '[]',    -- per-stage history: started, ended, verdict, gates
            previous_target TEXT                  -- fleet target before completion (for blue-green undo)
        );
        CREATE INDEX rollouts_state ON rollouts(state);
        CREATE TABLE rollout_devices (
            rollout_id TEXT NOT NULL REFERENCES rollouts(id),
            device TEXT NOT NULL,
            stage INTEGER NOT NULL,               -- first stage whose cohort took the device
            mode TEXT NOT NULL,                   -- shadow | live: what it was last asked to run
            previous_version TEXT,                -- its active version when first assigned
            assigned_at REAL NOT NULL,
            desired_at REAL,                      -- last time its desired changed
            status TEXT NOT NULL DEFAULT 'pending', -- pending | updated | failed | timed_out | reverted
            status_at REAL,
            live_at REAL,                         -- first time it was asked to serve live
            PRIMARY KEY (rollout_id, device)
        ) WITHOUT ROWID;
        CREATE INDEX rollout_devices_device ON rollout_devices(device);
        CREATE TABLE rollout_audit (
            id INTEGER PRIMARY KEY,
            ts REAL NOT NULL,
            rollout_id TEXT NOT NULL,
            actor TEXT NOT NULL,                  -- 'controller' or the operator / token name
            action TEXT NOT NULL,
            detail TEXT NOT NULL DEFAULT '{}'
        );
        CREATE INDEX rollout_audit_rollout ON rollout_audit(rollout_id, id);
        -- What the server last published on each device's retained `desired` topic.
        CREATE TABLE device_desired (
            device TEXT PRIMARY KEY,
            model TEXT NOT NULL,
            version TEXT NOT NULL,
            mode TEXT NOT NULL,
            rollout_id TEXT,
            allow_downgrade INTEGER NOT NULL DEFAULT 0,
            published_at REAL NOT NULL
        );
        -- The fleet's current version per model and target, for devices that join later.
        CREATE TABLE fleet_targets (
            model TEXT NOT NULL,
            target TEXT NOT NULL,                 -- the rollout's Target as JSON
            version TEXT NOT NULL,
            rollout_id TEXT,
            updated_at REAL NOT NULL,
            PRIMARY KEY (model, target)
        );
        CREATE INDEX events_rollout ON events(rollout_id, stored_at);
        ALTER TABLE windows ADD COLUMN latency TEXT;
        ALTER TABLE windows ADD COLUMN prediction TEXT;
        ALTER TABLE windows ADD COLUMN shadow TEXT;
"""))

# Console accounts, server-side sessions (the cookie holds a random id, stored hashed, so
# logging out or disabling an operator ends the session at once) and the audit log.
SCRIPTS.append(("0004_operators", """
        CREATE TABLE operators (
            name TEXT PRIMARY KEY,
            role TEXT NOT NULL,                   -- viewer | operator
            password_hash TEXT NOT NULL,          -- argon2id
            created_at REAL NOT NULL,
            disabled_at REAL
        );
        CREATE TABLE console_sessions (
            id_hash TEXT PRIMARY KEY,             -- sha256 of the cookie value
            operator TEXT NOT NULL REFERENCES operators(name) ON DELETE CASCADE,
            csrf_token TEXT NOT NULL,
            created_at REAL NOT NULL,
            expires_at REAL NOT NULL
        ) WITHOUT ROWID;
        CREATE INDEX console_sessions_expiry ON console_sessions(expires_at);
        CREATE TABLE audit_log (
            id INTEGER PRIMARY KEY,
            at REAL NOT NULL,
            actor TEXT NOT NULL,                  -- operator or token name; '' when unknown
            role TEXT,
            action TEXT NOT NULL,                 -- e.g. login, alert.ack, rollout.pause
            target TEXT NOT NULL DEFAULT '',
            outcome TEXT NOT NULL,                -- ok | denied | failed
            detail TEXT NOT NULL DEFAULT '{}',
            remote_addr TEXT
        );
        CREATE INDEX audit_log_target ON audit_log(target, id);
"""))

# Each window's reservoir sample, newest first per device, bounded to the most recent
# `samples_per_device` rows: `upto` is the device's running count of sampled rows through
# this window, so one DELETE per device and batch drops what fell out of the bound. Rows are
# msgpack, not JSON: writing floats as text cost more than the rest of a window's storage.
# A rowid table, unlike the others: rows of a kilobyte or more make a WITHOUT ROWID B-tree
# split pages on almost every insert (measured 4x slower at 1 KB).
# `windows.bytes` is the MQTT payload size, for telemetry bandwidth per device.
SCRIPTS.append(("0005_samples", """
        CREATE TABLE samples (
            device TEXT NOT NULL,
            seq INTEGER NOT NULL,
            model TEXT NOT NULL,
            model_version TEXT NOT NULL,
            window_end REAL NOT NULL,
            upto INTEGER NOT NULL,
            rows BLOB NOT NULL,                   -- msgpack [[[x...], y], ...]; excluded features nil
            PRIMARY KEY (device, seq)
        );
        ALTER TABLE windows ADD COLUMN bytes INTEGER;
"""))

# API tokens may expire (`create-token --expires-in`; NULL never expires). A revoked signing
# key stays listed in `revoked_keys` even when its PEM also comes from `trusted_key_files`, so
# no bundle signed by it is registered again.
SCRIPTS.append(("0007_token_expiry_key_revocation", """
        ALTER TABLE tokens ADD COLUMN expires_at REAL;
        CREATE TABLE revoked_keys (
            key_id TEXT PRIMARY KEY,
            revoked_at REAL NOT NULL,
            reason TEXT NOT NULL DEFAULT ''
        );
"""))

# Ground-truth feedback counts per (model version, device, time bucket), one partial row per
# ingest batch like `buckets` before compaction; readers sum them. `stored_at` lets rollout
# gates take exactly the feedback received since a stage started. Performance alerts share
# the alerts table: `kind` tells them from drift alerts.
SCRIPTS.append(("0008_feedback", """
        CREATE TABLE feedback (
            id INTEGER PRIMARY KEY,
            model TEXT NOT NULL,
            model_version TEXT NOT NULL,          -- the version that made the joined predictions
            device TEXT NOT NULL,
            bucket_start REAL NOT NULL,
            stored_at REAL NOT NULL,
            joined INTEGER NOT NULL,
            unknown_label INTEGER NOT NULL,
            late INTEGER NOT NULL,
            unknown INTEGER NOT NULL,
            duplicate INTEGER NOT NULL,
            rejected INTEGER NOT NULL,
            confusion TEXT,                       -- JSON [true][predicted]
            abs_error_sum REAL NOT NULL,
            sq_error_sum REAL NOT NULL,
            error_bins TEXT,                      -- JSON
            calibration TEXT                      -- JSON [counts, hits, prob_sums]
        );
        CREATE INDEX feedback_key ON feedback(model, model_version, bucket_start, device);
        CREATE INDEX feedback_stored ON feedback(model, stored_at);
        ALTER TABLE alerts ADD COLUMN kind TEXT NOT NULL DEFAULT 'drift';
"""))

# Message accounting per install: a seq more than 2**19 above a device's highest starts a
# new install (a wiped outbox starts at its creation time << 20), which restarts first_seq,
# received and dropped_total; `reinstalls` counts them and `reinstalled_at` is the server time
# of the last one. Telemetry retention deletes old `windows` rows with their `seqs` rows;
# `purged_upto` is the highest telemetry seq purged for the device, and ingest takes a
# telemetry seq at or below it for a duplicate, so a replay of a purged window is not stored
# again. NULL: nothing purged (seqs may start at 0).
SCRIPTS.append(("0009_reinstalls_retention", """
        ALTER TABLE seq_stats ADD COLUMN reinstalls INTEGER NOT NULL DEFAULT 0;
        ALTER TABLE seq_stats ADD COLUMN reinstalled_at REAL;
        ALTER TABLE seq_stats ADD COLUMN purged_upto INTEGER;
"""))

# Device password rotations (fleet_server.rotation): one row per device, its latest rotation. The
# issued password's hashes wait here until the device confirms it, then move to `devices`.
SCRIPTS.append(("0010_device_rotations", """
        CREATE TABLE device_rotations (
            device TEXT PRIMARY KEY,
            rotation_id TEXT NOT NULL,
            requested_by TEXT NOT NULL DEFAULT '',
            requested_at REAL NOT NULL,
            expires_at REAL NOT NULL,
            notified_at REAL,
            issued_at REAL,
            confirmed_at REAL,
            password_hash TEXT,                   -- argon2id of the issued password, until confirmed
            broker_hash TEXT                      -- its Mosquitto $7$ hash, until confirmed
        ) WITHOUT ROWID;
"""))

# Server nodes (fleet_server.cluster): each `server run` upserts its row on every heartbeat; a
# row whose heartbeat is older than three of its intervals is a node that is gone.
SCRIPTS.append(("0011_nodes", """
        CREATE TABLE nodes (
            node_id TEXT PRIMARY KEY,
            host TEXT NOT NULL,
            pid INTEGER NOT NULL,
            version TEXT NOT NULL,
            url TEXT NOT NULL DEFAULT '',
            started_at REAL NOT NULL,
            heartbeat_at REAL NOT NULL,
            heartbeat_s REAL NOT NULL,
            leader INTEGER NOT NULL DEFAULT 0
        );
"""))

# Saved device groups (fleet_server.device_groups): a tag query; rollouts copy the query when
# they are created, so this table is read only to list, count and resolve groups.
SCRIPTS.append(("0012_device_groups", """
        CREATE TABLE device_groups (
            name TEXT PRIMARY KEY,
            query TEXT NOT NULL,
            description TEXT NOT NULL DEFAULT '',
            created_at REAL NOT NULL,
            created_by TEXT NOT NULL DEFAULT '',
            updated_at REAL NOT NULL
        );
"""))


# Monitoring sums per (model version, device, time bucket), one partial row per ingest batch like
# `feedback`: the label-free performance estimate, the PCA reconstruction errors and the refused
# rows' per-feature counts of its windows, as JSON of fleet_server.monitoring_sums.MonitoringSums.
# `stored_at` lets rollout gates take what arrived since a stage started.
SCRIPTS.append(("0013_monitoring", """
        CREATE TABLE monitoring (
            id INTEGER PRIMARY KEY,
            model TEXT NOT NULL,
            model_version TEXT NOT NULL,
            device TEXT NOT NULL,
            bucket_start REAL NOT NULL,
            stored_at REAL NOT NULL,
            sums TEXT NOT NULL                    -- JSON MonitoringSums
        );
        CREATE INDEX monitoring_key ON monitoring(model, model_version, bucket_start, device);
        CREATE INDEX monitoring_stored ON monitoring(model, stored_at);
"""))


# Failed console logins, one row per failure and key (`n:NAME` or `a:ADDRESS`), so every server
# process shares the rate limit and a restart does not reset it; rows older than the limit's
# window are deleted as new failures come in. Audit rows get an index on time for retention.
SCRIPTS.append(("0014_login_failures", """
        CREATE TABLE login_failures (
            key TEXT NOT NULL,
            at REAL NOT NULL
        );
        CREATE INDEX login_failures_key ON login_failures(key, at);
        CREATE INDEX login_failures_at ON login_failures(at);
        CREATE INDEX audit_log_at ON audit_log(at);
"""))


# What the rollout controller's incremental pass reads instead of every assigned device: a change
# number on each device, raised (from one counter: SQLite has one writer at a time, so numbers
# commit in order) whenever something a device's rollout status or desired state depends on
# changes: its reported state, online status, active version, update state or revocation, a
# failure event it sent, or what it was last told.
SCRIPTS.append(("0015_device_changes", """
        ALTER TABLE devices ADD COLUMN change_seq INTEGER NOT NULL DEFAULT 0;
        CREATE INDEX devices_change_seq ON devices(change_seq);
        CREATE TRIGGER devices_changed AFTER UPDATE OF reported, status, active_version, update_state, revoked_at
            ON devices
            WHEN OLD.reported IS NOT NEW.reported OR OLD.status IS NOT NEW.status
                 OR OLD.active_version IS NOT NEW.active_version OR OLD.update_state IS NOT NEW.update_state
                 OR OLD.revoked_at IS NOT NEW.revoked_at
        BEGIN
            UPDATE devices SET change_seq = (SELECT MAX(change_seq) FROM devices) + 1 WHERE id = NEW.id;
        END;
        CREATE TRIGGER device_events_changed AFTER INSERT ON events
            WHEN NEW.kind IN ('outcome', 'refused')
        BEGIN
            UPDATE devices SET change_seq = (SELECT MAX(change_seq) FROM devices) + 1 WHERE id = NEW.device;
        END;
        CREATE TRIGGER device_desired_inserted AFTER INSERT ON device_desired
        BEGIN
            UPDATE devices SET change_seq = (SELECT MAX(change_seq) FROM devices) + 1 WHERE id = NEW.device;
        END;
        CREATE TRIGGER device_desired_updated AFTER UPDATE ON device_desired
        BEGIN
            UPDATE devices SET change_seq = (SELECT MAX(change_seq) FROM devices) + 1 WHERE id = NEW.device;
        END;
"""))


def _runner(script: str) -> Callable[[Database], None]:
    def run(db: Database) -> None:
        db.executescript(script)
    return run


migrations = Migrations("edgefleet")
for _name, _script in SCRIPTS:
    migrations(name=_name)(_runner(_script))


def apply(db: Database) -> None:
    """Bring the schema up to date (idempotent; safe to call from every process). Refuses a
    database that a newer edgefleet migrated: this code cannot know what its tables mean."""
    known = {name for name, _ in SCRIPTS}
    unknown = [m.name for m in migrations.applied(db) if m.name not in known]
    if unknown:
        raise StorageError(
            f"the database has schema migration(s) {', '.join(unknown)}, newer than this edgefleet knows: "
            "upgrade edgefleet, or use another data dir"
        )
    migrations.apply(db)
