"""Delivery acknowledgements end to end: ingest acknowledges what it stored on `ack`, a device may
read only its own, and a real agent loses no window when the broker is killed -9 and restarted
before ingest has subscribed again (the restarted broker PUBACKs windows nobody receives)."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import tomllib
from collections import Counter

import pytest

from edge_agent import Agent
from edge_agent.config import config_from_dict
from edge_agent.protocol import DeliveryAck, decode
from fleet_server.acks import AckBuffer
from fleet_server.broker import MOSQUITTO
from fleet_server.devices import provision_device
from fleet_server.service import FleetServer
from tests.brokers import wait_for_port
from tests.postgres_fixtures import db_rows, every_backend, server_storage_url  # noqa: F401 - every backend
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
def acking_fleet(request, tmp_path, backend):
    storage_url = server_storage_url(request, backend)
    # The broker-kill test below restarts the broker itself, at a moment it chooses: no supervisor.
    server = FleetServer(make_config(tmp_path / "server", ack_interval_s=0.2, storage_url=storage_url,
                                     broker_restart_backoff_s=3600)).start()
    wait_until(lambda: server.ingest.connected.is_set(), 10, message="ingest connected")
    yield server
    server.stop()


def count(svc, sql: str) -> int:
    return db_rows(svc.storage, sql)[0][0]


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


# ------------------------------------------------------------------ the regression: broker kill -9


def _restart_broker(server: FleetServer) -> subprocess.Popen:
    broker = server.svc.broker
    return subprocess.Popen([MOSQUITTO, "-c", str(broker.conf_path)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


@pytest.mark.broker
@pytest.mark.slow
def test_windows_a_restarted_broker_took_before_ingest_resubscribed_are_resent_and_stored_once(
    acking_fleet, tmp_path
):
    server = acking_fleet
    svc = server.svc
    text = provision_device(svc, "dev-k", window_s=0.25).agent_config
    data = tomllib.loads(text)
    data["data_dir"] = str(tmp_path / "dev-k")
    data["outbox"] = {"resend_after_s": 2.0}
    agent = Agent(config_from_dict(data)).start()
    sends: Counter[int] = Counter()
    send = agent.link.send

    def counting_send(seq: int, kind: str, payload: bytes) -> bool:
        ok = send(seq, kind, payload)
        if ok:
            sends[seq] += 1
        return ok

    agent.link.send = counting_send  # type: ignore[method-assign]
    stop = threading.Event()

    def tick() -> None:
        while not stop.wait(0.05):
            agent.tick()

    ticker = threading.Thread(target=tick, daemon=True)
    ticker.start()
    restarted: subprocess.Popen | None = None
    ingest = server.ingest
    try:
        first = agent.outbox.first_seq
        wait_until(lambda: agent.outbox.next_seq >= first + 4 and agent.outbox.count() <= 1, 20,
                   message="windows stored and acknowledged before the kill")
        os.kill(svc.broker.pid, signal.SIGKILL)  # no autosave: the broker forgets its sessions
        wait_until(lambda: not ingest.connected.is_set() and not agent.link.connected, 10,
                   message="both clients notice the broker is gone")
        ingest.client.loop_stop()  # hold ingest back: devices reach the new broker first
        restarted = _restart_broker(server)
        wait_for_port(server.config.broker_host, server.config.broker_port)
        before = agent.outbox.next_seq
        # The restarted broker takes (PUBACKs) windows that no subscriber receives.
        lost_at_broker = set(range(before, before + 3))

        def broker_took() -> bool:  # sent to the restarted broker, and its PUBACK is back
            return all(sends[s] for s in lost_at_broker) and not agent.link.inflight_seqs & lost_at_broker

        wait_until(broker_took, 20, message="the restarted broker took windows nobody was subscribed to")
        ingest.client.loop_start()  # ingest reconnects and subscribes again
        wait_until(lambda: ingest.connected.is_set(), 20, message="ingest back")

        def stored() -> list[int]:
            return [r[0] for r in db_rows(svc.storage, "SELECT seq FROM seqs WHERE device = 'dev-k'")]

        # Not acknowledged by the server within resend_after_s: sent again, and stored.
        wait_until(lambda: lost_at_broker <= set(stored()), 30, message="the windows the broker dropped stored")
        agent.telemetry.window_s = 3600.0  # no new windows: let the outbox empty
        wait_until(lambda: agent.outbox.count() == 0, 30, message="every message acknowledged by the server")
        stop.set()
        ticker.join(5)
        next_seq, dropped = agent.outbox.next_seq, agent.outbox.dropped_total
        windows = [r[0] for r in db_rows(svc.storage, "SELECT seq FROM windows WHERE device = 'dev-k'")]
        assert dropped == 0
        # Every window or event the device made is stored exactly once: no gap, no double.
        assert sorted(stored()) == list(range(first, next_seq)), sorted(set(range(first, next_seq)) - set(stored()))
        assert len(windows) == len(set(windows)) and len(windows) >= 8
        summed = count(svc, "SELECT SUM(windows) n FROM buckets WHERE device = 'dev-k'")
        assert summed == len(windows)
        # The windows the restarted broker dropped were stored because they were sent again.
        assert all(sends[s] >= 2 for s in lost_at_broker), {s: sends[s] for s in sorted(lost_at_broker)}
        assert ingest.stats.snapshot()["acks_sent"] > 0
    finally:
        stop.set()
        agent.close()
        if restarted is not None:
            svc.broker.pid = restarted.pid  # the server's stop ends the broker it runs on
            svc.broker.proc = restarted
