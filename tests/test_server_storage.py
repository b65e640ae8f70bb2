"""Fleet server unit tests: storage, migrations, dedupe, roll-ups, credentials, agent config."""

from __future__ import annotations

import base64
import hashlib
import tomllib

import numpy as np
import pytest

from edge_agent.config import config_from_dict
from edge_agent.protocol import (
    LATENCY_EDGES_MS,
    FeatureCounts,
    Histogram,
    TelemetryWindow,
    UpdateEvent,
)
from fleet_server.auth import PasswordChecker, hash_password, mosquitto_hash
from fleet_server.config import ServerConfig
from fleet_server.devices import DeviceError, agent_config_toml, loss_summary, parse_tags
from fleet_server.storage import IngestBatch
from fleet_server.storage.sqlite import SqliteStorage
from fleet_server.telemetry import BucketSums, sum_rows


def window(device: str, seq: int, start: float = 100.0, bins=(1, 2, 3), dropped: int = 0) -> TelemetryWindow:
    return TelemetryWindow(
        device=device, seq=seq, model="m", model_version="1", window_start=start, window_end=start + 10,
        sent_at=start + 10, predictions=sum(bins), requests=sum(bins), errors={"invalid": 1},
        latency=Histogram(counts=[1] + [0] * len(LATENCY_EDGES_MS), sum_ms=0.01),
        features=[FeatureCounts(bins=list(bins), nan=1)], prediction=FeatureCounts(bins=[1, 1]),
        dropped_total=dropped,
    )


@pytest.fixture
def storage(tmp_path):
    s = SqliteStorage(tmp_path / "fleet.db")
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
