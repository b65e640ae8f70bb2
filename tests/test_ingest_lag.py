"""Ingest lag means how far ingest is behind: from receiving a message off the broker to storing
it, on the server's own clock. Time a window spent elsewhere (buffered on a device while it was
offline, a fleet clock that runs ahead like the demo's simulated one) is delivery delay, reported
apart (`delivery_s`, `late_windows`).

The demo's overview showed a p99 "lag" of 16.5 s: sent_at -> stored on its 30x simulated clock,
where 0.5 s of real ingest time reads as 15 s. These tests give the server a clock an hour ahead,
and replay windows an outage held back, and check that neither shows up as ingest lag."""

from __future__ import annotations

import time

import pytest

from fleet_server.ingest import LATE_DELIVERY_S
from fleet_server.service import FleetServer
from tests.server_fixtures import (
    DeviceClient,
    ServerHandle,
    connected,
    make_config,
    shifted_window,
    wait_until,
)

pytestmark = [pytest.mark.broker]

EDGES = [[-1.0, 0.0, 1.0]] * 3
AHEAD_S = 3600.0


def _fleet(tmp_path, clock=time.time):
    server = connected(FleetServer(make_config(tmp_path / "server"), clock=clock).start())
    return server, ServerHandle(server)


def _stats(handle: ServerHandle, stored: int) -> dict:
    def ready():
        workers = handle.api("get", "/api/v1/ingest/stats", "viewer").json()["workers"]
        return workers and workers[0]["stats"].get("stored_windows") == stored and workers[0]["stats"]

    return wait_until(ready, 10, message="stats flushed")


def test_a_fleet_clock_ahead_of_the_devices_is_not_ingest_lag(tmp_path):
    server, handle = _fleet(tmp_path, clock=lambda: time.time() + AHEAD_S)  # like a simulated clock
    dev = DeviceClient(handle.config, "dev-a", handle.provision("dev-a")).wait_connected()
    try:
        for seq in range(1, 6):
            dev.publish("telemetry", shifted_window("dev-a", seq, EDGES))
        stats = _stats(handle, 5)
        # The old figure (sent_at -> stored on the fleet clock) would be an hour here.
        assert stats["lag_s"]["samples"] == 5 and stats["lag_s"]["max"] < AHEAD_S
        assert stats["delivery_s"]["samples"] == 5 and stats["delivery_s"]["p50"] >= AHEAD_S
        assert stats["late_windows"] == 5
    finally:
        dev.close()
        server.stop()


def test_windows_replayed_after_an_outage_are_late_deliveries_not_lag(tmp_path):
    server, handle = _fleet(tmp_path)
    dev = DeviceClient(handle.config, "dev-b", handle.provision("dev-b")).wait_connected()
    outage_s = 900.0
    try:
        for seq in (1, 2):  # held in the device's outbox for 15 minutes, sent after it reconnected
            w = shifted_window("dev-b", seq, EDGES, start=time.time() - outage_s - 60, length=60)
            w.sent_at = time.time() - outage_s
            dev.publish("telemetry", w)
        for seq in (3, 4, 5):  # live
            dev.publish("telemetry", shifted_window("dev-b", seq, EDGES))
        dev.publish("telemetry", shifted_window("dev-b", 3, EDGES))  # a duplicate: ingest work, no delivery
        stats = _stats(handle, 5)
        assert stats["duplicates"] == 1
        assert stats["lag_s"]["samples"] == 6 and stats["lag_s"]["max"] < outage_s
        assert stats["delivery_s"]["samples"] == 5 and stats["delivery_s"]["max"] >= outage_s
        assert stats["late_windows"] == 2 and outage_s > LATE_DELIVERY_S
        metrics = handle.api("get", "/metrics", "").text
        assert "edgefleet_delivery_delay_seconds" in metrics and 'outcome="late_windows"' in metrics
    finally:
        dev.close()
        server.stop()
