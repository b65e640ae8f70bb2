"""A server that runs for months: device reinstalls in the message accounting, and telemetry
retention (old windows and their seqs purged in batches, events kept, purged seqs still
duplicates) — through the managed Mosquitto and real SQLite files, with the server's clock moved
forward instead of waiting."""

from __future__ import annotations

import time

import pytest

from edge_agent.protocol import DeliveryAck, UpdateEvent, decode
from fleet_server.devices import provision_device
from fleet_server.service import FleetServer
from fleet_server.storage import IngestBatch
from fleet_server.storage.accounting import NEW_INSTALL_JUMP
from fleet_server.storage.open import open_storage
from tests.postgres_fixtures import backend_url, db_rows, every_backend, server_storage_url  # noqa: F401
from tests.server_fixtures import DeviceClient, connected, make_config, shifted_window, wait_until

pytest_plugins = ["tests.server_fixtures"]

EDGES = [[-1.0, 0.0, 1.0]] * 3
DAY = 86400.0


class Clock:
    """Real time plus an offset a test moves forward (the server's injectable clock)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


def window(device: str, seq: int, dropped: int = 0):
    w = shifted_window(device, seq, EDGES)
    w.dropped_total = dropped
    return w


def event(device: str, seq: int) -> UpdateEvent:
    return UpdateEvent(device=device, seq=seq, ts=time.time(), from_state="idle", to_state="download")


def column(storage, sql: str, *params) -> list:
    return [r[0] for r in db_rows(storage, sql, *params)]


def windows(storage, device: str) -> set[int]:
    return set(column(storage, "SELECT seq FROM windows WHERE device = ?", device))


def seqs(storage, device: str, kind: str) -> set[int]:
    return set(column(storage, "SELECT seq FROM seqs WHERE device = ? AND kind = ?", device, kind))


def acked(dev: DeviceClient) -> list[int]:
    out: list[int] = []
    for m in list(dev.received):
        if m.topic.endswith("/ack"):
            ack = decode("ack", m.payload)
            assert isinstance(ack, DeliveryAck)
            out += ack.seqs
    return out


def started(request, tmp_path, backend: str, clock: Clock, **overrides) -> FleetServer:
    storage_url = server_storage_url(request, backend)
    server = connected(FleetServer(make_config(tmp_path / "server", storage_url=storage_url, **overrides), clock=clock).start())
    return server


def passes(server: FleetServer) -> int:
    with server.ingest.stats.lock:
        return server.ingest.stats.counters["maintenance_passes"]


# ------------------------------------------------------------------ reinstalls


@pytest.mark.broker
def test_a_reinstalled_device_is_stored_and_its_accounting_starts_over(fleet):
    pw = fleet.provision("dev-r")
    dev = DeviceClient(fleet.config, "dev-r", pw).wait_connected()
    storage = fleet.svc.storage
    new = int(time.time()) << 20  # what a fresh outbox starts at
    try:
        for seq in range(5):  # the old install, which dropped 2 messages of its own
            dev.publish("telemetry", window("dev-r", seq, dropped=2))
        wait_until(lambda: windows(storage, "dev-r") == set(range(5)), 10, message="old install stored")
        for seq in range(new, new + 3):  # data dir wiped: new seqs, a new dropped_total
            dev.publish("telemetry", window("dev-r", seq))
        dev.publish("events", event("dev-r", new + 3))
        dev.publish("telemetry", window("dev-r", 5, dropped=2))  # a straggler of the old install
        wait_until(lambda: windows(storage, "dev-r") == {*range(6), new, new + 1, new + 2}
                   and storage.events("dev-r"), 10, message="both installs stored")
        delivery = fleet.api("get", "/api/v1/devices/dev-r", "viewer").json()["device"]["delivery"]
        assert delivery["first_seq"] == new and delivery["max_seq"] == new + 3
        assert delivery["received"] == 4 and delivery["missing"] == 0 and delivery["lost"] == 0
        assert delivery["dropped_by_device"] == 0
        assert delivery["reinstalls"] == 1 and delivery["reinstalled_at"] is not None
        stats = fleet.api("get", "/api/v1/ingest/stats", "viewer").json()["delivery"]
        assert stats["lost"] == 0 and stats["reinstalls"] == 1
    finally:
        dev.close()


@pytest.fixture
def storage(request, tmp_path, backend):
    s = open_storage(backend_url(request, backend, tmp_path))
    s.insert_device("a", "default", {}, "h", "b", 1.0)
    yield s
    s.close()


def store(storage, now: float, items) -> None:
    batch = IngestBatch()
    for item in items:
        if isinstance(item, UpdateEvent):
            batch.events.append((item, now))
        else:
            batch.windows.append((item, now, 100))
    storage.store_batch(batch, 60.0, now)


def test_old_and_new_install_seqs_in_any_order_keep_missing_sane(storage):
    new = 1_780_000_000 << 20
    # One batch holds the end of the old install and the start of the new one, out of order.
    store(storage, 1.0, [window("a", new + 1), window("a", 8, dropped=3), window("a", new + 3), window("a", 7)])
    # Another ingest process stores the rest later: the new install's first seqs, an old straggler.
    store(storage, 2.0, [window("a", new), window("a", 9, dropped=3), event("a", new + 2)])
    row = storage.seq_stats("a")[0]
    assert (row["first_seq"], row["max_seq"], row["received"]) == (new, new + 3, 4)
    assert row["dropped_total"] == 0 and row["reinstalls"] == 1 and row["reinstalled_at"] == 1.0
    assert windows(storage, "a") == {7, 8, 9, new, new + 1, new + 3}
    # A gap of exactly the jump is loss within one install, not a reinstall.
    store(storage, 3.0, [window("a", new + 3 + NEW_INSTALL_JUMP)])
    row = storage.seq_stats("a")[0]
    assert row["reinstalls"] == 1 and row["max_seq"] - row["first_seq"] + 1 - row["received"] == NEW_INSTALL_JUMP - 1


# ------------------------------------------------------------------ retention


def test_purge_deletes_old_windows_and_their_seqs_in_batches_and_keeps_events(storage):
    store(storage, 100.0, [window("a", s) for s in range(1, 11)] + [event("a", 11)])
    store(storage, 300.0, [window("a", 12)])
    assert [storage.purge_telemetry(200.0, limit=4) for _ in range(4)] == [4, 4, 2, 0]
    assert windows(storage, "a") == {12}
    assert seqs(storage, "a", "telemetry") == {12} and seqs(storage, "a", "events") == {11}
    assert [e["seq"] for e in storage.events("a")] == [11]
    row = storage.seq_stats("a")[0]
    assert row["purged_upto"] == 10 and row["received"] == 12 and row["first_seq"] == 1
    # A replay of a purged window is a duplicate; a new seq above the floor is stored.
    batch = IngestBatch(windows=[(window("a", 5), 400.0, 100), (window("a", 13), 400.0, 100)])
    result = storage.store_batch(batch, 60.0, 400.0)
    assert (result.stored_windows, result.duplicates) == (1, 1)
    assert windows(storage, "a") == {12, 13} and seqs(storage, "a", "telemetry") == {12, 13}
    assert storage.seq_stats("a")[0]["received"] == 13


@pytest.mark.broker
def test_retention_purges_old_telemetry_and_a_replay_is_acknowledged_not_stored(request, tmp_path, backend):
    clock = Clock()
    server = started(request, tmp_path, backend, clock, telemetry_retention_days=1)
    storage = server.svc.storage
    pw = provision_device(server.svc, "dev-p").password
    dev = DeviceClient(server.config, "dev-p", pw).wait_connected()
    try:
        dev.client.subscribe(dev.topic("ack"), qos=1)
        for seq in range(1, 11):
            dev.publish("telemetry", window("dev-p", seq))
        dev.publish("events", event("dev-p", 11))
        wait_until(lambda: sorted(acked(dev)) == list(range(1, 12)), 10, message="acknowledged")
        assert windows(storage, "dev-p") == set(range(1, 11))

        clock.offset += 2 * DAY  # two days later; kept one day
        dev.publish("telemetry", window("dev-p", 12))
        wait_until(lambda: windows(storage, "dev-p") == {12} and seqs(storage, "dev-p", "telemetry") == {12}, 10,
                   message=lambda: f"purged: windows {windows(storage, 'dev-p')}")
        assert seqs(storage, "dev-p", "events") == {11} and [e["seq"] for e in storage.events("dev-p")] == [11]
        assert storage.seq_stats("dev-p")[0]["purged_upto"] == 10
        assert server.ingest.stats.counters["purged_windows"] == 10

        dev.publish("telemetry", window("dev-p", 5))  # a replay of a purged window
        wait_until(lambda: acked(dev).count(5) == 2, 10, message="the replay acknowledged again")
        assert windows(storage, "dev-p") == {12} and 5 not in seqs(storage, "dev-p", "telemetry")
        wait_until(lambda: server.ingest.stats.counters["duplicates"] == 1, 5, message="counted as a duplicate")
        delivery = server.svc.storage.seq_stats("dev-p")[0]
        assert (delivery["first_seq"], delivery["max_seq"], delivery["received"]) == (1, 12, 12)
    finally:
        dev.close()
        server.stop()


@pytest.mark.broker
def test_retention_zero_keeps_everything(request, tmp_path, backend):
    clock = Clock()
    server = started(request, tmp_path, backend, clock, telemetry_retention_days=0)
    storage = server.svc.storage
    pw = provision_device(server.svc, "dev-k").password
    dev = DeviceClient(server.config, "dev-k", pw).wait_connected()
    try:
        for seq in range(1, 4):
            dev.publish("telemetry", window("dev-k", seq))
        wait_until(lambda: windows(storage, "dev-k") == {1, 2, 3}, 10, message="stored")
        clock.offset += 400 * DAY
        dev.publish("telemetry", window("dev-k", 4))
        wait_until(lambda: windows(storage, "dev-k") == {1, 2, 3, 4}, 10, message="stored")
        seen = passes(server)
        wait_until(lambda: passes(server) >= seen + 2, 10, message="two maintenance passes")
        assert windows(storage, "dev-k") == {1, 2, 3, 4} and seqs(storage, "dev-k", "telemetry") == {1, 2, 3, 4}
        assert storage.seq_stats("dev-k")[0]["purged_upto"] is None
        assert server.ingest.stats.counters["purged_windows"] == 0
    finally:
        dev.close()
        server.stop()
