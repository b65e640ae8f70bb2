"""Delivery acknowledgements: ingest acknowledges what it stored on `ack`, and a device may read
only its own."""

from __future__ import annotations

import pytest

from edge_agent.protocol import DeliveryAck, decode
from fleet_server.acks import AckBuffer
from fleet_server.devices import provision_device
from fleet_server.service import FleetServer
from tests.server_fixtures import DeviceClient, make_config, shifted_window, wait_until

EDGES = [[-1.0, 0.0, 1.0]] * 3


# ------------------------------------------------------------------ the buffer alone


def test_ack_buffer_sends_each_device_once_an_interval_and_full_ones_at_once():
    buf = AckBuffer(10.0, batch=4, keep=8)
    buf.add([("a", 1), ("b", 7)])
    assert sorted(buf.due(0.0)) == [("a", [1]), ("b", [7])]  # the first call opens an interval
    buf.add([("a", 2), ("a", 3)])
    assert buf.due(5.0) == []  # within the interval: waits
    buf.add([("a", 4), ("a", 5), ("b", 8)])
    assert buf.due(6.0) == [("a", [2, 3, 4, 5])]  # four waiting: at once
    assert buf.due(10.0) == [("b", [8])]
    assert buf.due(30.0) == [] and len(buf) == 0


def test_ack_buffer_is_bounded_while_nothing_can_be_sent():
    buf = AckBuffer(10.0, batch=4, keep=8)
    buf.add(("a", seq) for seq in range(100))
    assert len(buf) == 8 and buf.dropped == 92  # the device resends what was forgotten
    due = buf.due(0.0)
    buf.put_back(due)  # not connected: kept for the next time
    assert buf.due(20.0) == [("a", list(range(92, 100)))]


# ------------------------------------------------------------------ through the managed broker


@pytest.fixture
def acking_fleet(tmp_path):
    server = FleetServer(make_config(tmp_path / "server", ack_interval_s=0.2)).start()
    wait_until(lambda: server.ingest.connected.is_set(), 10, message="ingest connected")
    yield server
    server.stop()


def count(svc, sql: str) -> int:
    return next(iter(svc.storage.db.query(sql)))["n"]


def acked(dev: DeviceClient) -> list[int]:
    out = []
    for m in list(dev.received):
        if m.topic.endswith("/ack"):
            ack = decode("ack", m.payload)
            assert isinstance(ack, DeliveryAck) and ack.device == dev.device_id
            out += ack.seqs
    return out


@pytest.mark.broker
def test_ingest_acknowledges_stored_and_duplicate_seqs_to_their_device_only(acking_fleet):
    svc = acking_fleet.svc
    pw_a = provision_device(svc, "dev-a").password
    pw_b = provision_device(svc, "dev-b").password
    a = DeviceClient(acking_fleet.config, "dev-a", pw_a).wait_connected()
    b = DeviceClient(acking_fleet.config, "dev-b", pw_b).wait_connected()
    try:
        a.client.subscribe(a.topic("ack"), qos=1)
        a.client.subscribe(a.topic("ack", "dev-b"), qos=1)  # denied by the ACL
        b.client.subscribe(b.topic("ack"), qos=1)
        wait_until(lambda: acking_fleet.ingest.connected.is_set(), 5)
        for seq in (0, 1, 2):
            a.publish("telemetry", shifted_window("dev-a", seq, EDGES))
        b.publish("telemetry", shifted_window("dev-b", 5, EDGES))
        wait_until(lambda: sorted(acked(a)) == [0, 1, 2], 10, message="dev-a's seqs acknowledged")
        wait_until(lambda: acked(b) == [5], 10, message="dev-b's seq acknowledged")
        a.publish("telemetry", shifted_window("dev-a", 1, EDGES))  # a resend: stored already, acked again
        wait_until(lambda: sorted(acked(a)) == [0, 1, 1, 2], 10, message="the duplicate acknowledged again")
        assert not any("dev-b" in m.topic for m in a.received)
        assert count(svc, "SELECT COUNT(*) n FROM windows WHERE device = 'dev-a'") == 3
    finally:
        a.close()
        b.close()
