"""Ingest through the real managed Mosquitto: storage, dedupe, rejects, ACL, status and reported."""

from __future__ import annotations

import time

import pytest

from edge_agent.protocol import MAX_PAYLOAD_BYTES, Hardware, ReportedState, Status, UpdateEvent
from fleet_server.devices import revoke_device
from tests.postgres_fixtures import db_rows, every_backend  # noqa: F401 - every test on SQLite and PostgreSQL
from tests.server_fixtures import (
    DeviceClient,
    shifted_window,
    wait_until,
)

pytest_plugins = ["tests.server_fixtures"]

pytestmark = [pytest.mark.broker]

EDGES = [[-1.0, 0.0, 1.0]] * 3


def stored_seqs(fleet, device):
    return {r[0] for r in db_rows(fleet.svc.storage, "SELECT seq FROM windows WHERE device = ?", device)}


def rejects(fleet):
    return {(r["reason"], r["device"]): r["count"] for r in fleet.svc.storage.reject_counts()}


def test_telemetry_is_stored_once_and_bad_messages_are_counted(fleet):
    pw = fleet.provision("dev-a")
    dev = DeviceClient(fleet.config, "dev-a", pw).wait_connected()
    try:
        for seq in (1, 2, 3):
            dev.publish("telemetry", shifted_window("dev-a", seq, EDGES))
        dev.publish("telemetry", shifted_window("dev-a", 2, EDGES))  # a replay
        dev.publish("telemetry", b"{not json")
        dev.publish("telemetry", b'{"v": 1, "device": "dev-a"}')
        dev.publish("telemetry", shifted_window("someone-else", 9, EDGES))  # payload names another device
        dev.publish("telemetry", b"x" * (MAX_PAYLOAD_BYTES + 1))
        dev.publish("telemetry", shifted_window("dev-a", 4, EDGES))
        wait_until(lambda: stored_seqs(fleet, "dev-a") == {1, 2, 3, 4}, 10, message="windows stored")
        wait_until(lambda: len(rejects(fleet)) == 4, 5, message="rejects counted")
        assert rejects(fleet) == {
            ("malformed", "dev-a"): 1,
            ("invalid", "dev-a"): 1,
            ("device_mismatch", "dev-a"): 1,
            ("oversized", "dev-a"): 1,
        }
        stats = wait_until(lambda: fleet.api("get", "/api/v1/ingest/stats", "viewer").json()["workers"][0]["stats"]
                           .get("duplicates") and fleet.api("get", "/api/v1/ingest/stats", "viewer").json(), 5)
        assert stats["workers"][0]["stats"]["duplicates"] == 1
        assert stats["delivery"]["lost"] == 0
        assert stats["workers"][0]["stats"]["lag_s"]["p99"] < 5
    finally:
        dev.close()


def test_a_device_cannot_publish_or_read_for_another_device(fleet):
    pw_a = fleet.provision("dev-a")
    fleet.provision("dev-b")
    a = DeviceClient(fleet.config, "dev-a", pw_a).wait_connected()
    try:
        a.client.subscribe(a.topic("desired", "dev-b"), qos=1)
        a.client.subscribe(a.topic("desired"), qos=1)
        # Denied publishes are acknowledged and silently dropped by Mosquitto.
        a.publish("telemetry", shifted_window("dev-b", 1, EDGES), device="dev-b")
        a.publish("status", Status(device="dev-b", state="online", ts=time.time()), device="dev-b")
        a.publish("telemetry", shifted_window("dev-a", 1, EDGES))  # its own: allowed, a marker
        wait_until(lambda: stored_seqs(fleet, "dev-a") == {1}, 10)
        from edge_agent.protocol import DesiredState

        desired = DesiredState(model="m", version="1", url="http://x", sha256="0" * 64, size=1)
        assert fleet.svc.publisher.publish_desired("dev-b", desired)
        assert fleet.svc.publisher.publish_desired("dev-a", desired)
        wait_until(lambda: any(m.topic.endswith("dev-a/desired") for m in a.received), 5)
        assert not any("dev-b" in m.topic for m in a.received)
        assert stored_seqs(fleet, "dev-b") == set()
        assert fleet.svc.storage.get_device("dev-b")["status"] == "unknown"
    finally:
        a.close()


def test_wrong_password_and_revoked_devices_are_refused(fleet):
    pw = fleet.provision("dev-r")
    bad = DeviceClient(fleet.config, "dev-r", "wrong").wait_connected()
    assert bad.refused
    bad.close()
    ok = DeviceClient(fleet.config, "dev-r", pw).wait_connected()
    assert not ok.refused
    ok.close()
    revoke_device(fleet.svc, "dev-r")
    again = DeviceClient(fleet.config, "dev-r", pw).wait_connected()
    assert again.refused
    again.close()


def test_status_reported_and_events_update_the_registry(fleet):
    pw = fleet.provision("dev-s", {"site": "berlin"})
    dev = DeviceClient(fleet.config, "dev-s", pw).wait_connected()
    try:
        now = time.time()
        dev.publish("status", Status(device="dev-s", state="online", ts=now), retain=True)
        dev.publish("reported", ReportedState(device="dev-s", ts=now, model="m", active_version="2.0",
                                              agent_version="0.1", hardware=Hardware(arch="aarch64", ram_mb=4096)),
                    retain=True)
        dev.publish("reported", ReportedState(device="dev-s", ts=now - 10, active_version="old"), retain=True)
        dev.publish("events", UpdateEvent(device="dev-s", seq=1, ts=now, from_state="idle", to_state="download"))
        dev.publish("events", UpdateEvent(device="dev-s", seq=1, ts=now, from_state="idle", to_state="download"))

        def settled():
            d = fleet.svc.storage.get_device("dev-s")
            return d["status"] == "online" and d["active_version"] == "2.0" and fleet.svc.storage.events("dev-s")

        wait_until(settled, 10)
        d = fleet.api("get", "/api/v1/devices/dev-s", "viewer").json()["device"]
        assert d["reported"]["hardware"]["arch"] == "aarch64"
        assert len(fleet.api("get", "/api/v1/devices/dev-s/events", "viewer").json()["events"]) == 1
        online = fleet.api("get", "/api/v1/devices", "viewer", params={"online": "true", "tag": "site=berlin"})
        assert [x["id"] for x in online.json()["devices"]] == ["dev-s"]
        by_version = fleet.api("get", "/api/v1/devices", "viewer", params={"model_version": "2.0"})
        assert [x["id"] for x in by_version.json()["devices"]] == ["dev-s"]
    finally:
        dev.close()


def test_last_will_marks_a_device_offline(fleet):
    pw = fleet.provision("dev-w")
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    from edge_agent.protocol import encode, topic

    c = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id="dev-w", protocol=mqtt.MQTTv5)
    c.username_pw_set("dev-w", pw)
    t = topic(fleet.config.fleet, "dev-w", "status")
    c.will_set(t, encode(Status(device="dev-w", state="offline", ts=time.time())), qos=1, retain=True)
    c.connect(fleet.config.broker_host, fleet.config.broker_port, keepalive=5)
    c.loop_start()
    c.publish(t, encode(Status(device="dev-w", state="online", ts=time.time() + 1)), qos=1, retain=True).wait_for_publish(5)
    wait_until(lambda: fleet.svc.storage.get_device("dev-w")["status"] == "online", 10)
    c.loop_stop()
    c.socket().close()  # an unclean drop: the broker publishes the will
    wait_until(lambda: fleet.svc.storage.get_device("dev-w")["status"] == "offline", 15)
