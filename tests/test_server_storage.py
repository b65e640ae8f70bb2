"""Fleet server unit tests: storage, migrations, dedupe, roll-ups, credentials, agent config."""

from __future__ import annotations

import base64
import hashlib
import sqlite3
import threading
import tomllib

import numpy as np
import psycopg
import pytest
from click.testing import CliRunner

from edge_agent.config import config_from_dict
from edge_agent.protocol import (
    LATENCY_EDGES_MS,
    FeatureCounts,
    Histogram,
    TelemetryWindow,
    UpdateEvent,
)
from fleet_server.auth import PasswordChecker, hash_password, mosquitto_hash
from fleet_server.backup import BackupError, create_backup
from fleet_server.cli import server as server_cli
from fleet_server.config import ServerConfig
from fleet_server.devices import DeviceError, agent_config_toml, loss_summary, parse_tags
from fleet_server.storage import Conflict, IngestBatch, StorageError, StorageUnavailable
from fleet_server.storage.open import open_storage, sqlite_url
from fleet_server.storage.postgres.migrations import SCRIPTS as PG_SCRIPTS
from fleet_server.storage.sqlite import SqliteStorage
from fleet_server.telemetry import BucketSums, sum_rows
from tests.brokers import free_port, wait_until
from tests.postgres_fixtures import BACKENDS, backend_url


def window(device: str, seq: int, start: float = 100.0, bins=(1, 2, 3), dropped: int = 0) -> TelemetryWindow:
    return TelemetryWindow(
        device=device, seq=seq, model="m", model_version="1", window_start=start, window_end=start + 10,
        sent_at=start + 10, predictions=sum(bins), requests=sum(bins), errors={"invalid": 1},
        latency=Histogram(counts=[1] + [0] * len(LATENCY_EDGES_MS), sum_ms=0.01),
        features=[FeatureCounts(bins=list(bins), nan=1)], prediction=FeatureCounts(bins=[1, 1]),
        dropped_total=dropped,
    )


@pytest.fixture(params=BACKENDS)
def storage(request, tmp_path):
    """The same contract on every backend: a fresh store with three devices."""
    s = open_storage(backend_url(request, request.param, tmp_path))
    for d, tags in (("a", {"site": "x"}), ("b", {"site": "y"}), ("c", {"site": "x", "line": "2"})):
        s.insert_device(d, "default", tags, "h", "b", 1.0)
    yield s
    s.close()


def test_migrations_are_recorded_and_idempotent(tmp_path):
    s = SqliteStorage(tmp_path / "f.db")
    s.close()
    s = SqliteStorage(tmp_path / "f.db")
    names = [r["name"] for r in s.db.query("SELECT name FROM _sqlite_migrations")]
    assert names[:2] == ["0001_initial", "0002_bucket_parts"] and "0004_operators" in names
    assert len(names) == len(set(names))
    assert s.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    s.close()


def test_store_batch_dedupes_by_device_and_seq_across_telemetry_and_events(storage):
    event = UpdateEvent(device="a", seq=2, ts=1.0, kind="transition", from_state="idle", to_state="download")
    batch = IngestBatch(windows=[(window("a", 1), 1.0, 100), (window("a", 1), 1.0, 100)], events=[(event, 1.0)])
    r1 = storage.store_batch(batch, 60.0, 200.0)
    assert (r1.stored_windows, r1.stored_events, r1.duplicates) == (1, 1, 1)
    # seq 2 was used by an event: a window with seq 2 is a duplicate too.
    r2 = storage.store_batch(IngestBatch(windows=[(window("a", 2), 2.0, 100)], events=[(event, 2.0)]), 60.0, 201.0)
    assert (r2.stored_windows, r2.stored_events, r2.duplicates) == (0, 0, 2)
    rows = storage.bucket_rows("m", "1")
    assert len(rows) == 1 and rows[0]["windows"] == 1
    assert storage.get_device("a")["last_seen"] == 2.0


def test_bucket_sums_roll_up_exactly(storage):
    batch = IngestBatch(
        windows=[(window(d, s, start=100.0 + 5 * s, bins=(s, 1, 0)), 1.0, 100) for d in "abc" for s in (1, 2, 3)]
    )
    storage.store_batch(batch, 60.0, 300.0)
    rows = storage.bucket_rows("m", "1")
    fleet = sum_rows(rows)
    per_device = BucketSums()
    for d in "abc":
        per_device.add_sums(sum_rows(storage.bucket_rows("m", "1", devices=[d])))
    assert fleet.features == per_device.features == [[18, 9, 0, 9, 0, 0, 0]]
    assert fleet.predictions == 3 * (6 + 3)
    assert fleet.errors == {"invalid": 9}


def test_shape_mismatch_is_rejected_not_summed(storage):
    batch = IngestBatch(windows=[(window("a", 1), 1.0, 100), (window("a", 2, bins=(1, 2)), 1.0, 100)])
    r = storage.store_batch(batch, 60.0, 2.0)
    assert r.stored_windows == 1 and r.rejects[0].reason == "shape_mismatch"
    assert storage.reject_counts()[0]["reason"] == "shape_mismatch"


def test_partial_bucket_rows_compact_to_the_same_sums(storage):
    for s in (1, 2, 3):  # three batches: three partial rows of one bucket
        storage.store_batch(IngestBatch(windows=[(window("a", s, start=100.0 + s), 1.0, 100)]), 60.0, 1.0)
    before = sum_rows(storage.bucket_rows("m", "1"))
    assert len(storage.bucket_rows("m", "1")) == 3
    assert storage.compact_buckets(before=1e9, now=2.0) == 2
    rows = storage.bucket_rows("m", "1")
    assert len(rows) == 1 and sum_rows(rows).to_row() == before.to_row()


def test_loss_is_seq_gaps_minus_device_drops(storage):
    ws = [(window("a", s, dropped=1), 1.0, 100) for s in (1, 2, 4, 6)]
    storage.store_batch(IngestBatch(windows=ws), 60.0, 1.0)
    loss = loss_summary(storage.seq_stats("a")[0])
    assert loss["missing"] == 2 and loss["dropped_by_device"] == 1 and loss["lost"] == 1


def test_list_devices_filters(storage):
    assert [d["id"] for d in storage.list_devices(tags={"site": "x"})] == ["a", "c"]
    assert [d["id"] for d in storage.list_devices(tags={"site": "x", "line": "2"})] == ["c"]
    storage.revoke_device("c", 5.0)
    assert [d["id"] for d in storage.list_devices(tags={"site": "x"})] == ["a"]
    assert storage.devices_generation() == 4
    storage.store_batch(IngestBatch(windows=[(window("b", 1), 50.0, 100)]), 60.0, 50.0)
    assert [d["id"] for d in storage.list_devices(seen_after=10.0)] == ["b"]
    assert [d["id"] for d in storage.list_devices(seen_before=10.0)] == ["a"]


def test_mosquitto_hash_matches_mosquitto_passwd():
    # A line written by `mosquitto_passwd -b pw dev1 secret` (mosquitto 2.0.11).
    line = "$7$101$cgON0lE9p4VWxzaH$ZnoM3s4M9hFWtRwqk8IZwVZGCBjeK1xZ7GbAKHLusgUAXzCpvjbykqr3OGKFtJKVkAKY2CeurtzW6hp+qROGUg=="
    salt = base64.b64decode(line.split("$")[3])
    assert mosquitto_hash("secret", salt) == line
    assert hashlib.sha512  # PBKDF2-SHA512


def test_password_checker_caches_only_successes():
    stored = hash_password("right")
    checker = PasswordChecker()
    assert checker.check("a", "right", stored)
    assert checker.check("a", "right", stored)
    assert not checker.check("a", "wrong", stored)
    assert not checker.check("a", "right", None)  # revoked: no stored hash


def test_agent_config_is_read_by_the_agent(tmp_path):
    config = ServerConfig(data_dir=tmp_path, fleet="plant-1", public_url="http://fleet:8080", mqtt_url="mqtt://b:1883")
    pem = "-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEA\n-----END PUBLIC KEY-----\n"
    text = agent_config_toml(config, "pump-7", 'p"w\\', [pem], data_dir=str(tmp_path / "agent"))
    data = tomllib.loads(text)
    agent = config_from_dict(data)
    assert agent.device_id == "pump-7" and agent.fleet == "plant-1"
    assert agent.mqtt.username == "pump-7" and agent.mqtt.password == 'p"w\\'
    assert agent.mqtt.url == "mqtt://b:1883" and agent.server.url == "http://fleet:8080"
    assert agent.trust.public_keys_pem == [pem.strip()]


def test_parse_tags_explains_bad_pairs():
    assert parse_tags(["site=berlin", "line = 2"]) == {"site": "berlin", "line": "2"}
    with pytest.raises(DeviceError, match="key=value"):
        parse_tags(["berlin"])


def test_bucket_sums_refuse_misaligned_counts():
    s = BucketSums()
    s.add_window(window("a", 1))
    before = s.to_row()
    with pytest.raises(ValueError):
        s.add_window(window("a", 2, bins=(1, 2)))
    assert s.to_row() == before
    assert np.array_equal(s.latency[:1], [1])


# ---------------------------------------------------------------- the contract on every backend


def test_concurrent_writers_store_each_key_once(storage):
    """Several ingest writers with overlapping batches (QoS 1 redelivery to another member):
    every (device, seq) is stored once and counted once in the message accounting."""
    batches = [
        IngestBatch(windows=[(window(d, s), 1.0, 100) for d in "abc" for s in range(start, start + 20)])
        for start in (1, 11, 1, 6)
    ]
    results = []

    def write(batch):
        results.append(storage.store_batch(batch, 60.0, 5.0))

    threads = [threading.Thread(target=write, args=(b,)) for b in batches]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(r.stored_windows for r in results) == 3 * 30
    assert sum(r.duplicates for r in results) == 4 * 60 - 90
    assert sum_rows(storage.bucket_rows("m", "1")).windows == 90
    for st in storage.seq_stats():
        assert (st["first_seq"], st["max_seq"], st["received"]) == (1, 30, 30)


def test_retention_purges_windows_and_a_replay_stays_a_duplicate(storage):
    storage.store_batch(IngestBatch(windows=[(window("a", s), 1.0, 100) for s in (1, 2, 3)]), 60.0, 10.0)
    storage.store_batch(IngestBatch(windows=[(window("a", 4), 1.0, 100)]), 60.0, 20.0)
    assert storage.purge_telemetry(before=15.0, limit=2) == 2
    assert storage.purge_telemetry(before=15.0, limit=2) == 1
    assert storage.purge_telemetry(before=15.0) == 0
    assert storage.seq_stats("a")[0]["purged_upto"] == 3
    replay = storage.store_batch(IngestBatch(windows=[(window("a", 2), 1.0, 100)]), 60.0, 30.0)
    assert (replay.stored_windows, replay.duplicates) == (0, 1)
    assert storage.seq_stats("a")[0]["received"] == 4
    assert len(storage.window_lags(0.0)) == 1


def test_rollout_updates_are_compare_and_set(storage):
    row = {"id": "r1", "name": "", "model": "m", "version": "2", "spec": {"stages": [1]}, "state": "running",
           "stage": 0, "stage_started_at": 1.0, "created_at": 1.0, "created_by": "op", "updated_at": 1.0,
           "stages": []}
    storage.insert_rollout(row, ("op", "create", {"n": 1}))
    with pytest.raises(Conflict):
        storage.insert_rollout(row, ("op", "create", {}))
    assert storage.update_rollout("r1", {"stage": 1, "gates": {"ok": True}}, 2.0, expect={"stage": 0},
                                  audit=[("controller", "advance", {"to": 1})])
    # A second writer that read stage 0 loses, and its audit entry is not written.
    assert not storage.update_rollout("r1", {"stage": 1}, 3.0, expect={"stage": 0},
                                      audit=[("controller", "advance", {"to": 1})])
    got = storage.get_rollout("r1")
    assert (got["stage"], got["gates"], got["spec"], got["updated_at"]) == (1, {"ok": True}, {"stages": [1]}, 2.0)
    assert [a["action"] for a in storage.rollout_audit("r1")] == ["create", "advance"]
    assert [r["id"] for r in storage.list_rollouts(states=["running"])] == ["r1"]
    assert storage.list_rollouts(states=[]) == []
    dev = {"rollout_id": "r1", "device": "a", "stage": 0, "mode": "shadow", "assigned_at": 1.0}
    storage.put_rollout_devices([dev])
    storage.put_rollout_devices([{**dev, "mode": "live", "status": "updated"}])
    assert [(d["mode"], d["status"]) for d in storage.rollout_devices("r1", active=True)] == [("live", "updated")]
    storage.put_device_desired("a", {"model": "m", "version": "2", "mode": "live", "published_at": 4.0,
                                     "allow_downgrade": True})
    storage.put_device_desired("a", {"model": "m", "version": "3", "mode": "live", "published_at": 5.0})
    assert storage.device_desired()["a"]["version"] == "3"
    storage.set_fleet_target("m", {"tags": {}}, "2", "r1", 6.0)
    storage.set_fleet_target("m", {"tags": {}}, "3", "r1", 7.0)
    assert [(t["version"], t["target"]) for t in storage.fleet_targets()] == [("3", {"tags": {}})]
    storage.set_fleet_target("m", {"tags": {}}, None, None, 8.0)
    assert storage.fleet_targets() == []


def test_console_alerts_models_and_tokens_round_trip(storage):
    storage.insert_operator("ann", "operator", "hash", 1.0)
    with pytest.raises(Conflict):
        storage.insert_operator("ann", "viewer", "hash", 1.0)
    storage.insert_session("sid", "ann", "csrf", 1.0, 100.0)
    assert storage.find_session("sid", 2.0)["role"] == "operator"
    assert storage.set_operator("ann", role="viewer")
    assert storage.find_session("sid", 2.0) is None  # a changed account starts over
    assert storage.insert_audit({"at": 1.0, "actor": "ann", "action": "login", "target": "rollout:r1",
                                 "outcome": "ok", "detail": {"x": 1}}) > 0
    assert [a["detail"] for a in storage.list_audit(target_prefix="rollout:")] == [{"x": 1}]
    assert storage.list_audit(target_prefix="device:") == []
    rows, total = storage.search_devices(query="a", sort="last_seen")
    assert total == 1 and rows[0]["id"] == "a" and rows[0]["tags"] == {"site": "x"}
    assert storage.fleet_counts()["total"] == 3
    token_id = storage.insert_token("ci", "viewer", "th", 1.0)
    assert storage.find_token("th")["id"] == token_id
    alert_id = storage.insert_alert({"model": "m", "model_version": "1", "scope": "fleet", "target": "f0",
                                     "severity": "warn", "state": "open", "opened_at": 1.0, "bucket_start": 0.0,
                                     "details": {"psi": 0.2}})
    storage.update_alert(alert_id, state="resolved", details={"psi": 0.01})
    assert storage.get_alert(alert_id)["details"] == {"psi": 0.01}
    assert storage.open_alerts("m", "1", "fleet") == []
    storage.put_series_states("m", "1", "fleet", {"0": {"last_seen": 1.0}})
    storage.put_series_states("m", "1", "fleet", {"0": {"last_seen": 2.0}})
    assert storage.series_states("m", "1", "fleet") == {"0": {"last_seen": 2.0}}
    hook = storage.add_webhook("http://127.0.0.1:9/h", "s", 1.0)
    storage.record_delivery({"webhook_id": hook, "alert_id": alert_id, "transition": "opened", "ok": True,
                             "attempts": 1, "status_code": 200, "at": 2.0})
    assert storage.deliveries()[0]["ok"] == 1
    model = {"name": "m", "version": "1", "sha256": "0" * 64, "size": 1, "key_id": None, "manifest": {"a": 1},
             "file": "bundles/m-1.tar", "uploaded_at": 1.0}
    storage.insert_model(model)
    with pytest.raises(Conflict):
        storage.insert_model(model)
    assert storage.set_model_policy("m", "1", {"warn_psi": 0.2})
    assert storage.get_model("m", "1")["policy"] == {"warn_psi": 0.2}
    storage.add_trusted_key("k", "pem", "", 1.0)
    storage.add_trusted_key("k", "pem", "", 2.0)
    assert storage.revoke_key("k", 3.0, "leaked") and not storage.revoke_key("k", 4.0, "again")
    assert [k["key_id"] for k in storage.trusted_keys()] == ["k"]


def test_samples_bandwidth_and_events(storage):
    w = window("a", 1)
    w.sample = [[[1.0, 2.0], 1.0], [[3.0, None], 0.0]]
    storage.store_batch(IngestBatch(windows=[(w, 1.0, 300), (window("a", 2, start=125.0), 1.0, 200)]), 60.0, 5.0)
    assert [s["x"] for s in storage.recent_samples("a")] == [[1.0, 2.0], [3.0, None]]
    assert [(b["start"], b["messages"], b["bytes"]) for b in storage.device_bandwidth("a", None, 60.0)] == [
        (60.0, 1, 300), (120.0, 1, 200)]
    event = UpdateEvent(device="b", seq=7, ts=1.0, kind="transition", from_state="idle", to_state="download",
                        rollout_id="r9")
    storage.store_batch(IngestBatch(events=[(event, 1.0)]), 60.0, 6.0)
    assert [e["seq"] for e in storage.events("b")] == [7]
    assert [e["device"] for e in storage.rollout_events("r9")] == ["b"]


# Each case: a device, its member mode, what it reports (None: nothing yet), online or offline,
# its update events for the rollout as (kind, outcome), whether it was revoked, and its desired_at.
ROLLOUT_STATUS_CASES = [
    ("committed", "live", {"active_version": "2", "update_state": "Idle", "update_outcome": "success"},
     "online", [("outcome", "success")], False, 100.0),
    ("installing", "live", {"active_version": "1", "candidate_version": "2", "update_state": "Download"},
     "online", [], False, 100.0),
    ("probation", "live", {"active_version": "2", "candidate_version": "2", "update_state": "Probation"},
     "online", [], False, 100.0),
    ("probation-offline", "live", {"active_version": "2", "candidate_version": "2", "update_state": "Probation"},
     "offline", [], False, 100.0),
    ("shadowing", "shadow", {"active_version": "1", "candidate_version": "2", "update_state": "Shadow"},
     "online", [], False, 100.0),
    ("shadow-state-live-member", "live", {"active_version": "1", "candidate_version": "2",
                                          "update_state": "Shadow"}, "online", [], False, 100.0),
    ("failed", "live", {"active_version": "1", "update_state": "Idle", "update_outcome": "failure",
                        "rollout_id": "r1"}, "online", [("outcome", "failure")], False, 100.0),
    ("failed-reported-only", "live", {"active_version": "1", "update_state": "Idle", "update_outcome": "disk_full",
                                      "rollout_id": "r1"}, "online", [], False, 100.0),
    ("retrying", "live", {"active_version": "1", "update_state": "Idle", "update_outcome": "rolled_back",
                          "update_retry": True, "rollout_id": "r1"}, "online", [("outcome", "rolled_back")],
     False, 100.0),
    ("retry-other-rollout", "live", {"active_version": "1", "update_state": "Idle", "update_outcome": "rolled_back",
                                     "update_retry": True, "rollout_id": "r0"}, "online",
     [("outcome", "rolled_back")], False, 100.0),
    ("refused", "live", {"active_version": "1", "update_state": "Idle"}, "online", [("refused", None)], False, 100.0),
    ("failure-then-success", "live", {"active_version": "1", "update_state": "Idle"}, "online",
     [("outcome", "failure"), ("outcome", "success")], False, 100.0),
    ("success-then-failure", "live", {"active_version": "1", "update_state": "Idle"}, "online",
     [("outcome", "success"), ("outcome", "failure")], False, 100.0),
    ("silent", "live", None, "online", [], False, 100.0),
    ("silent-no-desired-at", "live", None, "online", [], False, None),
    ("revoked", "live", {"active_version": "2", "update_state": "Idle"}, "online", [], True, 100.0),
    ("revoked-failed", "live", {"active_version": "1", "update_state": "Idle"}, "online",
     [("outcome", "failure")], True, 100.0),
]


@pytest.mark.parametrize("now", [110.0, 500.0])
def test_rollout_status_changes_derive_what_device_status_derives(storage, now):
    """The controller asks the database for the statuses that change; they must be the ones the
    Python definition (`device_status`) gives, on every backend."""
    from edge_agent.protocol import ReportedState, Status
    from fleet_server.rollouts import FAILED_OUTCOMES, PROBATION_STATES
    from fleet_server.rollouts.device_status import device_status, failed_devices, on_probation

    storage.insert_rollout({"id": "r1", "model": "m", "version": "2", "spec": {}, "state": "running",
                            "stage_started_at": 1.0, "created_at": 1.0, "updated_at": 1.0}, ("op", "create", {}))
    batch, members = IngestBatch(), []
    for i, (name, mode, reported, online, events, _revoked, desired_at) in enumerate(ROLLOUT_STATUS_CASES):
        storage.insert_device(name, "default", {}, "h", "b", 1.0)
        if reported is not None:
            batch.reported.append((ReportedState(device=name, ts=50.0 + i, model="m", **reported), 50.0))
        batch.statuses.append((Status(device=name, state=online, ts=50.0), 50.0, False))
        batch.events += [(UpdateEvent(device=name, seq=seq, ts=60.0, kind=kind, version="2", rollout_id="r1",
                                      outcome=outcome, reason=f"{kind} {outcome}"), 60.0)
                         for seq, (kind, outcome) in enumerate(events, start=1)]
        members.append({"rollout_id": "r1", "device": name, "stage": 0, "mode": mode, "assigned_at": 90.0,
                        "desired_at": desired_at, "status": "pending", "status_at": 90.0})
    storage.store_batch(batch, 60.0, 70.0)
    for name, *_, revoked, _ in ROLLOUT_STATUS_CASES:
        if revoked:
            storage.revoke_device(name, 80.0)
    storage.put_rollout_devices(members)
    registered = {d["id"]: d for d in storage.list_devices(limit=1000)}
    failures = failed_devices(storage.rollout_events("r1"), "2")
    expected = {}
    for m in members:
        device = registered.get(m["device"]) or {}
        status = device_status("r1", "2", m, device, failures.get(m["device"]), now, 60.0)
        probation = status == "updated" and m["mode"] == "live" and on_probation(device, "2")
        if status != m["status"] or probation:
            expected[m["device"]] = (status, probation)
    got = storage.rollout_status_changes("r1", "2", now, 60.0, failed_outcomes=FAILED_OUTCOMES,
                                         probation_states=PROBATION_STATES)
    assert {d: (s, p) for d, s, p in got} == expected
    # The cases cover every status and both sides of probation.
    assert {s for s, _ in expected.values()} | {"pending"} >= {"updated", "failed", "pending"}
    assert any(p for _, p in expected.values())
    storage.set_rollout_device_statuses("r1", [(d, s) for d, (s, _) in expected.items()], now)
    assert {d: (s, p) for d, s, p in storage.rollout_status_changes(
        "r1", "2", now, 60.0, failed_outcomes=FAILED_OUTCOMES, probation_states=PROBATION_STATES)} == {
        d: v for d, v in expected.items() if v[1]}  # stored now: only the devices on probation remain
    assert {d: st for d, _, _, st, _ in storage.rollout_assignments("r1")} == {
        m["device"]: expected.get(m["device"], ("pending",))[0] for m in members}
    # Asked about some devices, the database answers for those only, as it would for all.
    some = [name for name, *_ in ROLLOUT_STATUS_CASES[::2]]
    storage.put_rollout_devices(members)
    assert {d: (s, p) for d, s, p in storage.rollout_status_changes(
        "r1", "2", now, 60.0, failed_outcomes=FAILED_OUTCOMES, probation_states=PROBATION_STATES,
        devices=some)} == {d: v for d, v in expected.items() if d in some}
    assert storage.rollout_status_changes("r1", "2", now, 60.0, failed_outcomes=FAILED_OUTCOMES,
                                          probation_states=PROBATION_STATES, devices=[]) == []


def test_rollout_pass_reads_ids_tags_reports_and_devices_to_tell(storage):
    from edge_agent.protocol import ReportedState

    assert sorted(storage.device_ids()) == ["a", "b", "c"]
    assert sorted(storage.device_ids(tags={"site": "x"})) == ["a", "c"]
    assert storage.device_ids(tags={"site": "x", "line": "2"}) == ["c"]
    assert storage.device_tag_map() == {"a": {"site": "x"}, "b": {"site": "y"}, "c": {"site": "x", "line": "2"}}
    assert storage.device_tag_map(["c", "zz"]) == {"c": {"site": "x", "line": "2"}}
    storage.store_batch(IngestBatch(reported=[(ReportedState(device=d, ts=5.0, model="m", active_version="1"), 5.0)
                                              for d in ("a", "b")]), 60.0, 5.0)
    reports = storage.device_reports(["a", "c", "zz"])
    assert sorted(reports) == ["a", "c"] and reports["a"]["active_version"] == "1"
    assert reports["a"]["reported"]["active_version"] == "1" and reports["c"]["reported"] is None
    storage.insert_rollout({"id": "r1", "model": "m", "version": "2", "spec": {}, "state": "running",
                            "stage_started_at": 1.0, "created_at": 1.0, "updated_at": 1.0}, ("op", "create", {}))
    storage.put_rollout_devices([{"rollout_id": "r1", "device": d, "stage": 0, "mode": "live", "assigned_at": 6.0,
                                  "desired_at": 6.0, "previous_version": prev, "status": "pending"}
                                 for d, prev in (("a", "1"), ("b", None), ("c", None))])
    assert sorted(storage.rollout_assignments("r1")) == [(d, 0, "live", "pending", 6.0) for d in "abc"]
    assert [m["device"] for m in storage.rollout_devices("r1", devices=["c", "a"])] == ["a", "c"]
    # c has not reported: not told yet. a was never told; b also lacks its previous version.
    tell = storage.rollout_devices_to_tell("r1", "m", "2")
    assert [(m["device"], m["told"], m["active_version"]) for m in tell] == [("a", None, "1"), ("b", None, "1")]
    assert [m["device"] for m in storage.rollout_devices_to_tell("r1", "m", "2", devices=["b", "c"])] == ["b"]
    assert storage.rollout_devices_to_tell("r1", "m", "2", devices=[]) == []
    assert storage.devices_without_desired() == ["a", "b", "c"]
    storage.put_device_desired("a", {"model": "m", "version": "2", "mode": "live", "rollout_id": "r1",
                                     "published_at": 7.0})
    storage.put_device_desired("b", {"model": "m", "version": "2", "mode": "live", "rollout_id": "r1",
                                     "published_at": 7.0})
    assert storage.devices_without_desired() == ["c"]
    tell = storage.rollout_devices_to_tell("r1", "m", "2")
    assert [(m["device"], m["told"]["version"], m["previous_version"]) for m in tell] == [("b", "2", None)]
    fixed = {k: v for k, v in tell[0].items() if k not in ("told", "active_version")}
    storage.put_rollout_devices([{**fixed, "previous_version": "1"}])
    assert storage.rollout_devices_to_tell("r1", "m", "2") == []  # nothing differs: nothing to do
    storage.put_device_desired("a", {"model": "m", "version": "2", "mode": "shadow", "rollout_id": "r1",
                                     "published_at": 8.0})
    assert [m["device"] for m in storage.rollout_devices_to_tell("r1", "m", "2")] == ["a"]
    assert [m["device"] for m in storage.rollout_devices_to_tell("r1", "m", "2", every_reported=True)] == ["a", "b"]
    storage.revoke_device("a", 9.0)
    assert sorted(storage.device_ids()) == ["b", "c"] and "a" not in storage.device_tag_map()
    assert storage.rollout_devices_to_tell("r1", "m", "2") == []



def test_device_changes_name_every_device_whose_rollout_status_or_desired_may_have_changed(storage):
    """The controller's incremental pass looks only at the devices this names: a report, an
    online status, a failure event, a new desired state and a revocation each name the device;
    a progress event and a tag do not; nothing comes back unless it changed again."""
    from edge_agent.protocol import ReportedState, Status

    for d in ("d", "e"):
        storage.insert_device(d, "default", {}, "h", "b", 1.0)
    cursor, none = storage.device_changes(None)
    assert none == []
    named: set[str] = set()
    clock = iter(range(100, 200))

    def check(expected: set[str]) -> None:
        nonlocal cursor
        cursor, devices = storage.device_changes(cursor)
        got = set(devices)
        if isinstance(storage, SqliteStorage):
            assert got == expected
        else:  # PostgreSQL may name a device again (its change committed while another
            # transaction of the cluster ran, an autovacuum's ANALYZE say), never one unchanged
            assert expected <= got <= expected | named
        named.update(got)

    def report(device: str, **fields) -> None:
        ts = float(next(clock))
        storage.store_batch(IngestBatch(reported=[(ReportedState(device=device, ts=ts, model="m", **fields), ts)]),
                            60.0, ts)

    check(set())
    report("a", active_version="1")
    check({"a"})
    check(set())  # read once
    report("a", active_version="1", update_state="Downloading", candidate_version="2")
    report("b", active_version="1")
    check({"a", "b"})
    storage.store_batch(IngestBatch(statuses=[(Status(device="c", state="offline", ts=6.0), 6.0, False)]), 60.0, 6.0)
    check({"c"})
    storage.store_batch(IngestBatch(events=[
        (UpdateEvent(device="d", seq=1, ts=7.0, kind="transition", version="2", rollout_id="r1"), 7.0)]), 60.0, 7.0)
    check(set())  # progress: the reported state says it
    storage.store_batch(IngestBatch(events=[
        (UpdateEvent(device="d", seq=2, ts=7.0, kind="outcome", version="2", rollout_id="r1", outcome="failure",
                     reason="x"), 7.0)]), 60.0, 7.0)
    check({"d"})
    storage.put_device_desired("c", {"model": "m", "version": "2", "mode": "live", "rollout_id": "r1",
                                     "published_at": 8.0})
    check({"c"})
    storage.put_device_desired("c", {"model": "m", "version": "1", "mode": "live", "rollout_id": "r1",
                                     "published_at": 9.0})
    check({"c"})
    storage.set_device_tags("e", {"site": "z"})
    check(set())
    storage.revoke_device("e", 10.0)
    check({"e"})
    check(set())


# ---------------------------------------------------------------- PostgreSQL only


def test_postgres_nodes_starting_together_migrate_once(pg_url):
    opened, errors = [], []

    def start():
        try:
            opened.append(open_storage(pg_url))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(opened) == 4
    with psycopg.connect(pg_url) as conn:
        versions = [r[0] for r in conn.execute("SELECT version FROM schema_migrations")]
    assert versions == [number for number, _ in enumerate(PG_SCRIPTS, start=1)]  # each applied once
    for s in opened:
        s.close()


def test_postgres_device_changes_forget_change_numbers_of_another_cluster(pg_url):
    """A dump restored into another cluster carries transaction ids this one has not given out:
    a pass over every device clears them, or they would name their device at every pass."""
    s = open_storage(pg_url)
    try:
        s.insert_device("a", "default", {}, "h", "b", 1.0)
        s.insert_device("b", "default", {}, "h", "b", 1.0)
        with psycopg.connect(pg_url, autocommit=True) as conn:
            conn.execute("UPDATE devices SET change_seq = '999999999999'::xid8 WHERE id = 'a'")
        cursor, _ = s.device_changes(None)
        s.put_device_desired("b", {"model": "m", "version": "1", "mode": "live", "published_at": 2.0})
        cursor, changed = s.device_changes(cursor)
        assert changed == ["b"]
        assert s.device_changes(cursor)[1] == []
    finally:
        s.close()


def test_postgres_refuses_a_newer_schema(pg_url):
    open_storage(pg_url).close()
    with psycopg.connect(pg_url) as conn:
        conn.execute("INSERT INTO schema_migrations(version, name, applied_at) VALUES (999, '0999_future', 0)")
    with pytest.raises(StorageError, match="newer than this edgefleet knows"):
        open_storage(pg_url)


def test_postgres_open_errors_say_what_to_check(pg_cluster):
    cases = [
        (pg_cluster.url("postgres", password="wrong"), "password"),
        (pg_cluster.url("no_such_db"), "create the database"),
        (f"postgresql://edgefleet:x@127.0.0.1:{free_port()}/x", "PostgreSQL runs there"),
    ]
    for url, hint in cases:
        with pytest.raises(StorageError) as info:
            open_storage(url)
        message = str(info.value)
        assert hint in message and "\n" not in message and "wrong" not in message.split("(")[0]
    with pytest.raises(StorageError, match="sqlite:///"):
        open_storage("mysql://x")


def test_server_run_with_an_unusable_storage_url_says_what_to_check_and_writes_nothing(pg_cluster, tmp_path):
    data_dir = tmp_path / "server"
    for url, hint in ((pg_cluster.url("postgres", password="wrong"), "password"),
                      (pg_cluster.url("no_such_db"), "CREATE DATABASE")):
        result = CliRunner().invoke(server_cli, ["run", "--data-dir", str(data_dir), "--storage-url", url])
        assert result.exit_code != 0
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and hint in lines[0] and "wrong" not in lines[0], result.output
        assert not data_dir.exists()
    result = CliRunner().invoke(server_cli, ["run", "--data-dir", str(data_dir)],
                                env={"EDGEFLEET_STORAGE_URL": "mysql://somewhere"})
    assert result.exit_code != 0 and "storage_url" in result.output and not data_dir.exists()
    result = CliRunner().invoke(server_cli, ["ingest", "--data-dir", str(data_dir), "--storage-url",
                                             pg_cluster.url("postgres", password="wrong")])
    assert result.exit_code != 0 and len(result.output.strip().splitlines()) == 1 and "password" in result.output
    assert not data_dir.exists()


def test_backup_of_a_postgresql_deployment_points_to_postgresql_tooling(tmp_path):
    data_dir = tmp_path / "server"
    data_dir.mkdir()
    (data_dir / "server.toml").write_text('storage_url = "postgresql://fleet@db.example:5432/fleet"\n')
    with pytest.raises(BackupError, match="pg_dump"):
        create_backup(data_dir, tmp_path / "backup.tar.gz")
    assert not (tmp_path / "backup.tar.gz").exists()


def test_bundle_bytes_are_kept_by_a_shared_database_only(storage):
    data = bytes(range(256)) * 10
    sha = hashlib.sha256(data).hexdigest()
    storage.put_bundle(sha, data)
    storage.put_bundle(sha, data)  # idempotent (two nodes, one upload retried)
    shared = not isinstance(storage, SqliteStorage)
    assert storage.bundle_bytes(sha) == (data if shared else None)
    assert storage.bundle_bytes("0" * 64) is None


def test_storage_url_comes_from_the_option_then_the_environment_then_server_toml(tmp_path, monkeypatch):
    from fleet_server.config import load_config

    (tmp_path / "server.toml").write_text('storage_url = "postgresql://file@db:5432/fleet"\n')
    assert load_config(tmp_path).storage_location == "postgresql://file@db:5432/fleet"
    monkeypatch.setenv("EDGEFLEET_STORAGE_URL", "postgresql://env@db:5432/fleet")
    assert load_config(tmp_path).storage_location == "postgresql://env@db:5432/fleet"
    assert load_config(tmp_path, storage_url="sqlite:///x/fleet.db").storage_location == "sqlite:///x/fleet.db"
    monkeypatch.delenv("EDGEFLEET_STORAGE_URL")
    (tmp_path / "server.toml").write_text("")
    assert load_config(tmp_path).storage_location == sqlite_url(tmp_path / "fleet.db")


def test_postgres_storage_carries_on_after_the_database_restarts(pg_cluster, pg_url):
    s = open_storage(pg_url)
    try:
        s.insert_device("a", "default", {}, "h", "b", 1.0)
        assert s.store_batch(IngestBatch(windows=[(window("a", 1), 1.0, 100)]), 60.0, 1.0).stored_windows == 1
        pg_cluster.restart()  # every pooled connection is now dead
        result = s.store_batch(IngestBatch(windows=[(window("a", 1), 1.0, 100), (window("a", 2), 1.0, 100)]),
                               60.0, 2.0)
        assert (result.stored_windows, result.duplicates) == (1, 1)
        assert s.seq_stats("a")[0]["received"] == 2
    finally:
        s.close()


def test_sqlite_refuses_a_database_a_newer_edgefleet_migrated(tmp_path):
    SqliteStorage(tmp_path / "fleet.db").close()
    with sqlite3.connect(tmp_path / "fleet.db") as conn:
        conn.execute("INSERT INTO _sqlite_migrations(migration_set, name, applied_at) "
                     "VALUES ('edgefleet', '0999_future', '2030-01-01')")
    with pytest.raises(StorageError, match="newer than this edgefleet knows") as info:
        open_storage(sqlite_url(tmp_path / "fleet.db"))
    assert "permissions" not in str(info.value)


def test_postgres_device_password_rotation_and_told_versions(pg_url):
    s = open_storage(pg_url)
    try:
        s.insert_device("a", "default", {}, "old-hash", "old-broker", 1.0)
        s.put_rotation("a", "rot-1", "olga", 2.0, 100.0)
        assert [r["rotation_id"] for r in s.rotations_to_announce(3.0)] == ["rot-1"]
        s.mark_rotation_notified("a", "rot-1", 3.0)
        assert s.rotations_to_announce(3.0) == []
        assert not s.confirm_rotation("a", "rot-1", 4.0)  # nothing issued yet
        assert s.issue_rotation("a", "rot-1", "new-hash", "new-broker", 4.0)
        generation = s.devices_generation()
        assert s.confirm_rotation("a", "rot-1", 5.0)
        assert not s.confirm_rotation("a", "rot-1", 6.0)  # once
        assert s.device_password_hash("a") == "new-hash" and dict(s.broker_accounts())["a"] == "new-broker"
        assert s.devices_generation() == generation + 1
        row = s.get_rotation("a")
        assert row["confirmed_at"] == 5.0 and row["password_hash"] is None
        s.put_rotation("a", "rot-2", "olga", 7.0, 100.0)  # a new rotation replaces the row
        assert s.get_rotation("a")["confirmed_at"] is None
        s.put_device_desired("a", {"model": "m", "version": "2", "mode": "live", "published_at": 8.0})
        assert s.device_told_versions("a") == {("m", "2")}
    finally:
        s.close()


def test_postgres_down_is_storage_unavailable_naming_the_database_and_stores_nothing(pg_cluster, pg_url):
    s = open_storage(pg_url)
    try:
        s.insert_device("a", "default", {}, "h", "b", 1.0)
        s.pool.timeout = 2.0  # how long a call waits for a connection while the database is down
        pg_cluster.stop()
        try:
            with pytest.raises(StorageUnavailable) as info:
                s.store_batch(IngestBatch(windows=[(window("a", 1), 1.0, 100)]), 60.0, 1.0)
            assert pg_url.rsplit("/", 1)[1] in str(info.value) and "\n" not in str(info.value)
            with pytest.raises(StorageUnavailable):
                s.get_device("a")
        finally:
            pg_cluster.restart()

        def answers() -> bool:  # the pool reconnects with a backoff of its own
            try:
                return s.seq_stats("a") == []  # the refused batch left nothing
            except StorageUnavailable:
                return False

        wait_until(answers, 30, interval=0.2, message="storage answers again after the restart")
        assert s.store_batch(IngestBatch(windows=[(window("a", 1), 1.0, 100)]), 60.0, 2.0).stored_windows == 1
    finally:
        s.close()


def test_postgres_advisory_lock_session_is_held_by_one_and_released_with_its_session(pg_url):
    from fleet_server.storage.postgres.session import AdvisoryLockSession

    first, second = AdvisoryLockSession(pg_url, 4242, name="node-1"), AdvisoryLockSession(pg_url, 4242, name="node-2")
    try:
        assert first.try_lock() and not second.try_lock()
        first.ping()
        with psycopg.connect(pg_url, autocommit=True) as admin:  # the holder's session dies
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s "
                          "AND pid <> pg_backend_pid()", ("node-1",))
        with pytest.raises(StorageUnavailable):
            first.ping()
        wait_until(second.try_lock, 10, interval=0.05, message="the lock freed with its session")
        assert not first.try_lock()  # reconnects, and waits its turn
    finally:
        first.close()
        second.close()


def _same_history(s) -> dict:
    """The same writes on a backend, and what its reads return."""
    for d, tags in (("a", {"site": "x"}), ("b", {"site": "y"})):
        s.insert_device(d, "default", tags, "h", "b", 1.0)
    w = window("a", 3, start=130.0)
    w.sample = [[[1.0, None], 1.0]]
    event = UpdateEvent(device="b", seq=9, ts=1.0, kind="transition", from_state="idle", to_state="download",
                        rollout_id="r1")
    s.store_batch(IngestBatch(windows=[(window("a", 1), 1.0, 100), (window("a", 2), 2.0, 120), (w, 3.0, 90),
                                       (window("b", 1), 1.0, 80), (window("b", 1), 1.0, 80)],
                              events=[(event, 2.0)]), 60.0, 10.0)
    s.store_batch(IngestBatch(windows=[(window("a", 7, start=200.0), 4.0, 100)]), 60.0, 11.0)
    s.compact_buckets(before=150.0, now=12.0)
    s.purge_telemetry(before=10.5, limit=1)
    s.revoke_device("b", 13.0)
    alert = s.insert_alert({"model": "m", "model_version": "1", "scope": "fleet", "target": "f0", "target_index": 0,
                            "severity": "alert", "state": "open", "value": 0.3, "opened_at": 14.0,
                            "bucket_start": 60.0, "details": {"psi": 0.3}})
    s.update_alert(alert, acknowledged_at=15.0, acknowledged_by="olga")
    s.insert_rollout({"id": "r1", "model": "m", "version": "2", "spec": {"s": 1}, "state": "running",
                      "stage_started_at": 1.0, "created_at": 1.0, "updated_at": 1.0}, ("olga", "create", {}))
    s.update_rollout("r1", {"stage": 1, "gates": [{"name": "g", "ok": True}]}, 16.0, expect={"stage": 0})
    s.put_rollout_devices([{"rollout_id": "r1", "device": "a", "stage": 0, "mode": "live", "assigned_at": 2.0}])
    s.insert_operator("olga", "operator", "ph", 1.0)
    s.insert_audit({"at": 17.0, "actor": "olga", "action": "alert.ack", "target": "alert:1", "outcome": "ok"})
    return {
        "devices": s.list_devices(include_revoked=True), "search": s.search_devices(sort="last_seen"),
        "counts": s.fleet_counts(), "seq_stats": s.seq_stats(), "events": s.events("b"),
        "buckets": s.bucket_rows("m", "1"), "device_buckets": s.device_bucket_rows("a"),
        "versions": s.bucketed_versions(), "feedback": s.feedback_versions(), "rejects": s.reject_counts(),
        "lags": sorted(s.window_lags(0.0)), "samples": s.recent_samples("a"),
        "bandwidth": s.device_bandwidth("a", None, 60.0), "alerts": s.list_alerts(),
        "rollout": s.get_rollout("r1"), "rollout_devices": s.rollout_devices("r1"), "audit": s.rollout_audit("r1"),
        "rollout_events": s.rollout_events("r1"), "windows": s.windows_since(0.0, "m"),
        "operators": s.list_operators(), "console_audit": s.list_audit(), "accounts": s.broker_accounts(),
        "generation": s.devices_generation(),
    }


def test_sqlite_and_postgres_return_the_same_rows_for_the_same_writes(tmp_path, pg_url):
    results = []
    for url in (sqlite_url(tmp_path / "fleet.db"), pg_url):
        s = open_storage(url)
        try:
            results.append(_same_history(s))
        finally:
            s.close()
    on_sqlite, on_postgres = results
    for key in on_sqlite:
        assert on_postgres[key] == on_sqlite[key], key


def test_device_search_takes_like_wildcards_literally(storage):
    for d in ("dev_1", "devx1", "50%-off"):
        storage.insert_device(d, "default", {}, "h", "b", 1.0)
    assert [d["id"] for d in storage.search_devices(query="dev_")[0]] == ["dev_1"]
    assert [d["id"] for d in storage.search_devices(query="0%")[0]] == ["50%-off"]
    assert storage.search_devices(query="x", limit=1)[1] == 1


def test_a_window_stored_while_buckets_compact_is_neither_lost_nor_counted_twice(pg_url, monkeypatch):
    """On PostgreSQL an ingest process may commit a late window of a bucket while another node
    compacts that bucket (READ COMMITTED): compaction removes exactly the rows it summed."""
    import fleet_server.storage.postgres.buckets as pg_buckets

    compacting, ingesting = open_storage(pg_url), open_storage(pg_url)
    try:
        for seq in (1, 2):
            compacting.store_batch(IngestBatch(windows=[(window("a", seq, start=101.0), 1.0, 100)]), 60.0, 1.0)
        real_sum = pg_buckets.sum_rows
        late: list[int] = []

        def a_late_window_arrives_then_sum(rows):
            if not late:  # between compaction's read and its delete
                ingesting.store_batch(IngestBatch(windows=[(window("a", 3, start=102.0), 1.0, 100)]), 60.0, 1.5)
                late.append(3)
            return real_sum(rows)

        monkeypatch.setattr(pg_buckets, "sum_rows", a_late_window_arrives_then_sum)
        compacting.compact_buckets(before=1e9, now=2.0)
        assert late == [3]
        rows = compacting.bucket_rows("m", "1")
        assert sum(r["windows"] for r in rows) == 3 and len(rows) == 2  # the merged row and the late one
        monkeypatch.setattr(pg_buckets, "sum_rows", real_sum)
        compacting.compact_buckets(before=1e9, now=3.0)
        rows = compacting.bucket_rows("m", "1")
        assert [r["windows"] for r in rows] == [3]
    finally:
        compacting.close()
        ingesting.close()
